"""Neighbour suppression and anti-spoofing on the fan bridge (cni_fan/net/portguard.py).

Real kernel: a node namespace with `cni-fan serve` in it, pods added by the
real `fan` executable, frames crafted with AF_PACKET sockets. Everything
lives in namespaces named `tpg-<hex>-...` and is removed at the end, also
when a test fails.

The lab is harness/podlab.py's; the crafted frames are harness/frames.py's.
"""
from __future__ import annotations

import json
import os
import secrets
import struct
import time
from pathlib import Path

import pytest

from cni_fan.bpf import guardprog
from cni_fan.net import portguard, rtnl_links
from cni_fan.net.rtnl import Rtnl
from harness.frames import (BROADCAST, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, arp, drain, eth, ipv4_udp,
                            packet_socket)
from harness.podlab import Lab, Pod, module_lab
from harness.system import inside, require_kernel_lab, run


# == pure ===================================================================================

def test_gateway_mac_is_locally_administered_unicast_and_derived_from_the_gateway():
    mac = portguard.gateway_mac("241.1.10.1")
    assert mac == "02:fc:f1:01:0a:01"
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_alias_round_trip_and_foreign_aliases():
    assert portguard.parse_alias(portguard.port_alias("241.1.10.7", "AA:BB:CC:DD:EE:0F")) == \
        ("241.1.10.7", "aa:bb:cc:dd:ee:0f")
    for foreign in (None, "", "uplink", "cni-fan", "cni-fan 241.1.10.7", "cni-fan x y", "cni-fan 1.2.3.4 zz"):
        assert portguard.parse_alias(foreign) is None


# == the program, run by the kernel on crafted frames ===========================================

PASS, DROP = guardprog.TC_ACT_UNSPEC & 0xFFFFFFFF, guardprog.TC_ACT_SHOT
POD_MAC, POD_IP = "0a:00:00:00:00:05", "241.1.10.5"
OTHER_MAC, OTHER_IP = "0a:00:00:00:00:06", "241.1.10.6"
GW_MAC, GW_IP = "02:fc:f1:01:0a:01", "241.1.10.1"


@pytest.fixture(scope="module")
def guard_fd():
    require_kernel_lab()
    from cni_fan.bpf.syscall import load_sched_cls

    fd = load_sched_cls(guardprog.guard_program(POD_MAC, POD_IP), name="tpg_guard")
    yield fd
    os.close(fd)


CASES = {
    "honest IPv4": (eth(GW_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(POD_IP, "8.8.8.8", b"x"), PASS),
    "honest IPv4 to a pod": (eth(OTHER_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(POD_IP, OTHER_IP, b"x"), PASS),
    "honest ARP request": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD_IP, "00:00:00:00:00:00", OTHER_IP), PASS),
    "honest ARP reply": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, POD_MAC, POD_IP, GW_MAC, GW_IP), PASS),
    "IPv4 from another pod's address": (eth(GW_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(OTHER_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 from another pod's MAC": (eth(GW_MAC, OTHER_MAC, ETH_P_IP) + ipv4_udp(POD_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 as another pod": (eth(GW_MAC, OTHER_MAC, ETH_P_IP) + ipv4_udp(OTHER_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 from 0.0.0.0 (DHCP)": (eth(BROADCAST, POD_MAC, ETH_P_IP) + ipv4_udp("0.0.0.0", "255.255.255.255", b"x", 67), DROP),
    "ARP reply claiming another pod's address": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, POD_MAC, OTHER_IP, GW_MAC, GW_IP), DROP),
    "gratuitous ARP for another pod's address": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, OTHER_IP, BROADCAST, OTHER_IP), DROP),
    "ARP with another sender MAC": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, OTHER_MAC, POD_IP, GW_MAC, GW_IP), DROP),
    "ARP from another Ethernet source": (eth(GW_MAC, OTHER_MAC, ETH_P_ARP) + arp(2, POD_MAC, POD_IP, GW_MAC, GW_IP), DROP),
    "ARP probe (sender 0.0.0.0)": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, "0.0.0.0", "00:00:00:00:00:00", POD_IP), DROP),
    "non-Ethernet ARP": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + b"\x00\x06" + arp(1, POD_MAC, POD_IP, BROADCAST, OTHER_IP)[2:], DROP),
    "IPv6": (eth("33:33:00:00:00:02", POD_MAC, ETH_P_IPV6) + bytes(40), DROP),
    "VLAN tag": (eth(GW_MAC, POD_MAC, ETH_P_8021Q) + b"\x00\x05\x08\x00" + ipv4_udp(POD_IP, "8.8.8.8", b"x"), DROP),
    "truncated ARP": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD_IP, BROADCAST, OTHER_IP)[:20], DROP),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES))
def test_guard_program_verdict(guard_fd, case):
    from cni_fan.bpf.syscall import test_run

    frame, want = CASES[case]  # (the test-run refuses IPv4 frames shorter than an IPv4 header)
    assert test_run(guard_fd, frame).retval == want


# == a node with pods ========================================================================

lab = module_lab("portguard")


@pytest.fixture(scope="module")
def pods(lab: Lab) -> list[Pod]:
    return lab.add_pods(5)


@pytest.mark.kernel
def test_add_installs_the_guard(lab: Lab, pods: list[Pod]):
    bridge = lab.bridge_name()
    links = {link["ifname"]: link for link in lab.ip_json("-d", "link", "show")}
    assert links[bridge]["address"] == portguard.gateway_mac("241.1.10.1")
    neighbours = lab.our_neighbours()
    fdb = lab.static_fdb()
    for pod in pods:
        port = links[pod.veth]["linkinfo"]["info_slave_data"]
        assert (port["learning"], port["flood"], port["mcast_flood"], port["bcast_flood"]) == (False,) * 4, port
        assert port["proxy_arp_wifi"] and port["hairpin"] and not port["neigh_suppress"], port
        assert links[pod.veth]["ifalias"] == f"cni-fan {pod.ip} {pod.mac}"
        assert neighbours[pod.ip] == pod.mac
        assert fdb[pod.mac] == pod.veth
        filters = run(["tc", "-n", lab.node, "filter", "show", "dev", pod.veth, "ingress"]).stdout
        assert "cni-fan-guard" in filters and "direct-action" in filters, filters
        inside_pod = run(["ip", "-j", "-n", pod.name, "neigh", "show", "dev", "eth0"]).stdout
        gateway = [n for n in json.loads(inside_pod) if n["dst"] == "241.1.10.1"]
        assert gateway and gateway[0]["lladdr"] == portguard.gateway_mac("241.1.10.1")
        assert "PERMANENT" in gateway[0]["state"]


@pytest.mark.kernel
def test_pods_reach_each_other_the_gateway_and_the_node(lab: Lab, pods: list[Pod]):
    a, b = pods[0], pods[1]
    for pod in pods:
        run(["ip", "-n", pod.name, "neigh", "flush", "dev", "eth0"])  # drops dynamic entries only
    assert lab.ping(a, b.ip), "pod to pod"
    assert lab.ping(b, a.ip), "pod to pod, back"
    assert lab.ping(a, "241.1.10.1"), "pod to gateway"
    assert lab.ping(None, a.ip), "node to pod"
    run(["ip", "-n", a.name, "link", "set", "lo", "up"])  # a runtime's loopback plugin does this
    assert lab.ping(a, a.ip), "pod to itself"


@pytest.mark.kernel
def test_hairpin_through_a_service_address(lab: Lab, pods: list[Pod]):
    """A pod reaches itself through a DNAT'ed service address, as kube-proxy sets it up."""
    a = pods[2]
    service = "10.96.0.10"
    ruleset = f"""table ip tpg-svc {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept; ip daddr {service} dnat to {a.ip}; }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept; ip saddr {a.ip} ip daddr {a.ip} masquerade; }}
}}
"""
    lab.in_node("sysctl", "-qw", "net.ipv4.ip_forward=1")
    lab.in_node("nft", "-f", "-", input=ruleset)
    try:
        assert lab.ping(a, service, count=2), "hairpin through the service address"
        assert lab.ping(pods[3], service), "another pod through the service address"
    finally:
        lab.in_node("nft", "delete", "table", "ip", "tpg-svc", check=False)


@pytest.mark.kernel
def test_resolving_every_pod_floods_no_other_pod(lab: Lab, pods: list[Pod]):
    """Each ARP request is answered by the bridge on the requester's port: no
    other pod sees it, and each target only gets the ping itself."""
    asker, others = pods[0], pods[1:]
    run(["ip", "-n", asker.name, "neigh", "flush", "dev", "eth0"])
    before = lab.veth_tx(p.veth for p in others)
    for pod in others:
        assert lab.ping(asker, pod.ip)
    after = lab.veth_tx(p.veth for p in others)
    neighbours = json.loads(run(["ip", "-j", "-n", asker.name, "neigh", "show", "dev", "eth0"]).stdout)
    learned = {n["dst"]: n["lladdr"] for n in neighbours}
    for pod in others:
        assert learned[pod.ip] == pod.mac  # the proxy's answer is the pod's real MAC
        # The echo request, plus at most a unicast ARP probe of the target later on.
        assert after[pod.veth] - before[pod.veth] <= 2, (pod.name, before[pod.veth], after[pod.veth])


def _spoof_suite(lab: Lab, sender: Pod, victim: Pod, target: Pod) -> dict[str, tuple[int, int]]:
    """Send forged and honest frames from `sender`; count what reaches `target` and the node.

    Returns {case: (frames seen by the target pod, frames seen by the node's bridge device)}.
    """
    bridge = lab.bridge_name()
    gw_mac, gw_ip = portguard.gateway_mac("241.1.10.1"), "241.1.10.1"
    out = packet_socket(sender.path, "eth0")
    at_target = packet_socket(target.path, "eth0")
    at_node = packet_socket(lab.node_path, bridge)
    s, v, t = sender, victim, target
    cases = {
        "honest to pod": lambda m: eth(t.mac, s.mac, ETH_P_IP) + ipv4_udp(s.ip, t.ip, m),
        "honest to node": lambda m: eth(gw_mac, s.mac, ETH_P_IP) + ipv4_udp(s.ip, gw_ip, m),
        "honest ARP reply to node": lambda m: eth(gw_mac, s.mac, ETH_P_ARP) + arp(2, s.mac, s.ip, gw_mac, gw_ip) + m,
        "victim's address to pod": lambda m: eth(t.mac, s.mac, ETH_P_IP) + ipv4_udp(v.ip, t.ip, m),
        "victim's MAC to pod": lambda m: eth(t.mac, v.mac, ETH_P_IP) + ipv4_udp(s.ip, t.ip, m),
        "victim's MAC and address to pod": lambda m: eth(t.mac, v.mac, ETH_P_IP) + ipv4_udp(v.ip, t.ip, m),
        "victim's address to node": lambda m: eth(gw_mac, s.mac, ETH_P_IP) + ipv4_udp(v.ip, gw_ip, m),
        "ARP reply for the victim to node": lambda m: eth(gw_mac, s.mac, ETH_P_ARP) + arp(2, s.mac, v.ip, gw_mac, gw_ip) + m,
        "ARP reply for the victim to pod": lambda m: eth(t.mac, s.mac, ETH_P_ARP) + arp(2, s.mac, v.ip, t.mac, t.ip) + m,
        "gratuitous ARP for the victim": lambda m: eth(BROADCAST, s.mac, ETH_P_ARP) + arp(1, s.mac, v.ip, BROADCAST, v.ip) + m,
        "IPv6 to node": lambda m: eth(gw_mac, s.mac, ETH_P_IPV6) + struct.pack("!IHBB", 6 << 28, len(m), 59, 64) + bytes(32) + m,
        "VLAN-tagged to pod": lambda m: eth(t.mac, s.mac, ETH_P_8021Q) + b"\x00\x05\x08\x00" + ipv4_udp(s.ip, t.ip, m),
    }
    markers = {case: f"tpg-{secrets.token_hex(6)}".encode() for case in cases}
    try:
        drain(at_target)
        drain(at_node)
        for case, build in cases.items():
            frame = build(markers[case])
            out.send(frame + bytes(max(0, 60 - len(frame))))
        time.sleep(0.3)
        seen_target = drain(at_target, 0.5)
        seen_node = drain(at_node, 0.2)
    finally:
        for sock in (out, at_target, at_node):
            sock.close()
    return {case: (sum(markers[case] in f for f in seen_target), sum(markers[case] in f for f in seen_node))
            for case in cases}


@pytest.mark.kernel
def test_a_pod_cannot_impersonate_another_honest_frames_pass(lab: Lab, pods: list[Pod]):
    sender, victim, target = pods[0], pods[1], pods[2]
    before = lab.our_neighbours()
    seen = _spoof_suite(lab, sender, victim, target)
    assert seen["honest to pod"][0] == 1, seen
    assert seen["honest to node"][1] == 1, seen
    assert seen["honest ARP reply to node"][1] == 1, seen
    forged = {case: counts for case, counts in seen.items() if not case.startswith("honest")}
    assert all(counts == (0, 0) for counts in forged.values()), forged
    assert lab.our_neighbours() == before
    drops = run(["tc", "-s", "-n", lab.node, "qdisc", "show", "dev", sender.veth, "ingress"]).stdout
    assert " dropped 0," not in drops, drops


@pytest.mark.kernel
def test_without_anti_spoofing_forged_frames_get_through(lab: Lab, pods: list[Pod]):
    """The control of the test above: the same frames from a pod added with `antiSpoof: false`."""
    [open_pod] = lab.add_pods(1, lab.conf(antiSpoof=False))
    try:
        assert "bpf" not in run(["tc", "-n", lab.node, "filter", "show", "dev", open_pod.veth, "ingress"]).stdout
        seen = _spoof_suite(lab, open_pod, pods[1], pods[2])
        assert seen["victim's address to pod"][0] == 1, seen
        assert seen["victim's MAC and address to pod"][0] == 1, seen
        assert seen["ARP reply for the victim to node"][1] == 1, seen
    finally:
        lab.del_pods([open_pod], lab.conf(antiSpoof=False))


@pytest.mark.kernel
def test_guard_hands_honest_frames_on_to_later_filters(lab: Lab, pods: list[Pod]):
    """The guard passes with TC_ACT_UNSPEC, so a filter behind it (here one that
    drops everything, at prio 2) still sees the frames; after it is gone, they flow."""
    from cni_fan.bpf.insn import R0, Assembler
    from cni_fan.bpf.syscall import load_sched_cls
    from cni_fan.net import tc

    asm = Assembler()
    asm.mov64_imm(R0, guardprog.TC_ACT_SHOT)
    asm.exit()
    fd = load_sched_cls(asm.assemble(), name="tpg_drop_all")
    a = pods[3]
    sock = Rtnl.in_netns(lab.node_path)
    try:
        index = lab.ip_json("link", "show", a.veth)[0]["ifindex"]
        tc.attach(sock, index, fd, "ingress", name="tpg-drop-all", prio=2, handle=1)
        run(["ip", "-n", a.name, "neigh", "flush", "dev", "eth0"])
        assert not lab.ping(a, pods[0].ip, wait=1)
        tc.detach(sock, index, "ingress", prio=2, handle=1)
        assert lab.ping(a, pods[0].ip)
    finally:
        sock.close()
        os.close(fd)


@pytest.mark.kernel
def test_switches_off(lab: Lab, pods: list[Pod]):
    conf = lab.conf(neighSuppress=False, antiSpoof=False)
    [plain] = lab.add_pods(1, conf)
    try:
        link = {link["ifname"]: link for link in lab.ip_json("-d", "link", "show")}[plain.veth]
        port = link["linkinfo"]["info_slave_data"]
        assert port["learning"] and port["flood"] and port["bcast_flood"] and not port["proxy_arp_wifi"]
        assert "ifalias" not in link
        assert plain.ip not in lab.our_neighbours()
        assert plain.mac not in lab.static_fdb()
        assert "bpf" not in run(["tc", "-n", lab.node, "filter", "show", "dev", plain.veth, "ingress"]).stdout
        gateway = json.loads(run(["ip", "-j", "-n", plain.name, "neigh", "show", "241.1.10.1"]).stdout)
        assert not gateway or "PERMANENT" not in gateway[0]["state"]
        assert lab.ping(plain, pods[0].ip) and lab.ping(pods[0], plain.ip) and lab.ping(plain, "241.1.10.1")
    finally:
        lab.del_pods([plain], conf)
    assert plain.ip not in lab.our_neighbours()


@pytest.mark.kernel
def test_del_leaves_nothing_and_repeats(lab: Lab):
    [pod] = lab.add_pods(1)
    assert pod.ip in lab.our_neighbours()
    lab.del_pods([pod], delete_netns=False)
    assert pod.ip not in lab.our_neighbours()
    assert pod.mac not in lab.static_fdb()
    assert pod.veth not in lab.host_veths()
    again = lab.call("DEL", pod.cid, pod.path)
    assert again.code == 0, again
    lab.delete_netns([pod])


@pytest.mark.kernel
def test_del_after_the_pod_namespace_is_gone(lab: Lab):
    """The veth (and its alias) went with the namespace: DEL finds the address in the IPAM record."""
    [pod] = lab.add_pods(1)
    run(["ip", "netns", "del", pod.name])
    deadline = time.monotonic() + 5
    while pod.veth in lab.host_veths() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pod.ip in lab.our_neighbours()
    outcome = lab.call("DEL", pod.cid, pod.path)
    assert outcome.code == 0, outcome
    assert pod.ip not in lab.our_neighbours()
    assert pod.ip not in lab.records()
    lab.pods.pop(pod.name, None)


@pytest.mark.kernel
def test_gc_removes_what_ports_that_are_gone_left(lab: Lab, pods: list[Pod]):
    [doomed] = lab.add_pods(1)
    lab.ip("link", "del", doomed.veth)  # as if the pod vanished without a DEL
    # An entry of ours that no port claims, and one that is not ours: GC takes only the first.
    lab.ip("neigh", "replace", "241.1.10.250", "lladdr", "0a:00:00:00:00:fa", "dev", lab.bridge_name(),
           "nud", "permanent", "proto", str(portguard.NEIGH_PROTOCOL))
    lab.ip("neigh", "replace", "241.1.10.251", "lladdr", "0a:00:00:00:00:fb", "dev", lab.bridge_name(),
           "nud", "permanent")
    conf = lab.conf(cniVersion="1.1.0")
    conf["cni.dev/valid-attachments"] = [{"containerID": p.cid, "ifname": "eth0"} for p in pods]
    outcome = lab.call("GC", conf=conf)
    assert outcome.code == 0, outcome
    left = lab.our_neighbours()
    assert doomed.ip not in left and "241.1.10.250" not in left
    assert {p.ip for p in pods} <= set(left)
    plain = json.loads(run(["ip", "-j", "-n", lab.node, "neigh", "show", "241.1.10.251"]).stdout)
    assert plain, "GC deleted a neighbour entry that is not ours"
    lab.ip("neigh", "del", "241.1.10.251", "dev", lab.bridge_name())
    assert doomed.ip not in lab.records()
    lab.delete_netns([doomed])


@pytest.mark.kernel
def test_install_again_changes_nothing(lab: Lab, pods: list[Pod]):
    """install is idempotent: run it twice more on a pod's port, one filter and one entry remain."""
    from cni_fan.config import FanConfig

    pod = pods[4]
    before = (lab.our_neighbours(), lab.static_fdb())
    with inside(lab.node_path), Rtnl() as rtnl:
        bridge_index = rtnl_links.get_link(rtnl, lab.bridge_name()).index
    veth_index = lab.ip_json("link", "show", pod.veth)[0]["ifindex"]
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        for _ in range(2):
            with inside(lab.node_path):
                portguard.install(FanConfig.from_dict(lab.conf()), bridge_index=bridge_index, veth_index=veth_index,
                                  pod_netns_fd=fd, pod_ifname="eth0", pod_ip=f"{pod.ip}/24", pod_mac=pod.mac,
                                  gateway="241.1.10.1")
    finally:
        os.close(fd)
    assert (lab.our_neighbours(), lab.static_fdb()) == before
    filters = run(["tc", "-n", lab.node, "filter", "show", "dev", pod.veth, "ingress"]).stdout
    assert filters.count("cni-fan-guard") == 1, filters
    assert lab.ping(pod, pods[0].ip)


@pytest.mark.kernel
def test_install_failing_half_way_leaves_no_neighbour_entry(lab: Lab, pods: list[Pod]):
    """The host side succeeds, the pod side fails (no such interface): the bridge entry is taken back."""
    from cni_fan.config import FanConfig
    from cni_fan.net.errors import GuardError

    [pod] = lab.new_pods(1)
    with inside(lab.node_path), Rtnl() as rtnl:
        bridge_index = rtnl_links.get_link(rtnl, lab.bridge_name()).index
    veth = "tpgfail0"
    lab.ip("link", "add", veth, "master", lab.bridge_name(), "type", "veth", "peer", "name", "eth9", "netns", pod.name)
    veth_index = lab.ip_json("link", "show", veth)[0]["ifindex"]
    cfg = FanConfig.from_dict(lab.conf())
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        with inside(lab.node_path), pytest.raises(GuardError, match="in the pod"):
            portguard.install(cfg, bridge_index=bridge_index, veth_index=veth_index, pod_netns_fd=fd,
                              pod_ifname="eth0", pod_ip="241.1.10.249/24", pod_mac="0a:00:00:00:00:f9",
                              gateway="241.1.10.1")
    finally:
        os.close(fd)
    assert "241.1.10.249" not in lab.our_neighbours()
    with inside(lab.node_path):
        assert portguard.remove(veth) is None  # the alias is there, the entry is already gone
    lab.ip("link", "del", veth)
    lab.delete_netns([pod])


def _flood_count(lab: Lab, asker: Pod, others: list[Pod]) -> int:
    """Frames the other pods received while `asker` resolved and pinged each once, minus the pings."""
    run(["ip", "-n", asker.name, "neigh", "flush", "dev", "eth0"])
    before = lab.veth_tx(p.veth for p in others)
    for pod in others:
        assert lab.ping(asker, pod.ip)
    after = lab.veth_tx(p.veth for p in others)
    return sum(after[v] - before[v] for v in after) - len(others)


@pytest.mark.kernel
def test_without_neighbour_suppression_every_pod_sees_every_request(tmp_path: Path):
    """The control of the flood count: with `neighSuppress: false` the bridge floods."""
    lab = Lab(tmp_path, neighSuppress=False)
    try:
        pods = lab.add_pods(4)
        assert _flood_count(lab, pods[0], pods[1:]) >= 3 * 2  # each request reached the two bystanders
        lab.del_pods(pods)
    finally:
        lab.close()


@pytest.mark.kernel
def test_kernel_neigh_suppress_on_pod_ports_would_flood(lab: Lab, pods: list[Pod]):
    """Why the guard uses proxyarp_wifi and not neigh_suppress (EVPN's knob):
    the bridge does not answer requests arriving on a neigh_suppress port and
    floods them (shown with bcast_flood on, which the guard turns off)."""
    asker, others = pods[0], pods[1:]
    try:
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "bcast_flood", "on")
        assert _flood_count(lab, asker, others) == 0  # answered by the bridge, not flooded
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "neigh_suppress", "on")
        assert _flood_count(lab, asker, others) >= len(others) * (len(others) - 1)  # flooded
    finally:
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "neigh_suppress", "off",
                   "bcast_flood", "off")
