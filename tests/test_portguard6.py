"""The port guard for dual-stack pods (cni_fan/net/portguard.py with `pod_ip6`, cni_fan/bpf/guardprog6.py).

The program's verdicts on crafted frames (BPF_PROG_TEST_RUN), then a real
bridge with three dual-stack pods and the guard installed by
`portguard.install`: ping6, neighbour discovery delivered only to the pod
that owns the address, forged frames sent from inside a pod with an
AF_PACKET socket and looked for on the other side. The lab is
harness/guard6lab.py's, the frames harness/frames6.py's.
"""
from __future__ import annotations

import json
import os

import pytest

from cni_fan.bpf import guardprog
from cni_fan.net import portguard
from harness.frames import ETH_P_IP, ETH_P_IPV6, eth, ipv4_udp
from harness.frames6 import (ICMPV6, NO_NEXT, echo_body, icmp6, icmp6_frame, ipv6, ipv6_with_hop_by_hop,
                             multicast_mac, na_body, ns_body, ns_frame, packed, ra_body, redirect_body, solicited_node,
                             udp6)
from harness.system import require_kernel_lab

PASS, DROP = guardprog.TC_ACT_UNSPEC & 0xFFFFFFFF, guardprog.TC_ACT_SHOT
MAC, IP, IP6 = "0a:00:00:00:00:05", "241.1.10.5", "fd50:0:0:1c::5"
OTHER_MAC, OTHER6 = "0a:00:00:00:00:06", "fd50:0:0:1c::6"
GW_MAC, GW6 = "02:fc:f1:01:0a:01", "fd50:0:0:1c::1"
LL, OTHER_LL = "fe80::800:ff:fe00:5", "fe80::800:ff:fe00:6"


# == pure ===================================================================================

def test_alias_carries_the_ipv6_address_and_old_aliases_still_parse():
    alias = portguard.port_alias("241.1.10.7", "AA:BB:CC:DD:EE:0F", "fd50:0:0:1c:0:0:0:7")
    assert alias == "cni-fan 241.1.10.7 aa:bb:cc:dd:ee:0f fd50:0:0:1c::7"
    assert portguard.parse_alias(alias) == ("241.1.10.7", "aa:bb:cc:dd:ee:0f")
    assert portguard.alias_ip6(alias) == "fd50:0:0:1c::7"
    old = portguard.port_alias("241.1.10.7", "aa:bb:cc:dd:ee:0f")
    assert portguard.parse_alias(old) == ("241.1.10.7", "aa:bb:cc:dd:ee:0f") and portguard.alias_ip6(old) is None
    longest = portguard.port_alias("255.255.255.255", "aa:bb:cc:dd:ee:ff", "ffff:" * 7 + "ffff")
    assert len(longest.encode()) < 256  # IFALIASZ, with its NUL
    for foreign in ("cni-fan 241.1.10.7 aa:bb:cc:dd:ee:0f 241.1.10.8", "cni-fan 241.1.10.7 aa:bb:cc:dd:ee:0f x",
                    "cni-fan 241.1.10.7 aa:bb:cc:dd:ee:0f fd50::7 y"):
        assert portguard.parse_alias(foreign) is None and portguard.alias_ip6(foreign) is None


def test_the_ipv6_program_patches_the_same_code_the_assembler_builds():
    import socket

    built = guardprog.assemble_guard_program(bytes.fromhex(MAC.replace(":", "")), socket.inet_aton(IP),
                                             socket.inet_pton(socket.AF_INET6, IP6))
    assert guardprog.guard_program(MAC, IP, IP6) == built
    assert guardprog.guard_program(MAC, IP) != guardprog.guard_program(MAC, IP, IP6)


# == the program, run by the kernel on crafted frames ===========================================

@pytest.fixture(scope="module")
def guard6_fd():
    require_kernel_lab(plugins=False)
    from cni_fan.bpf.syscall import load_sched_cls

    fd = load_sched_cls(guardprog.guard_program(MAC, IP, IP6), name="tpg_guard6")
    yield fd
    os.close(fd)


def _echo(src: str, dst: str = OTHER6, src_mac: str = MAC) -> bytes:
    return icmp6_frame(OTHER_MAC, src_mac, src, dst, 128, echo_body(7, b"x" * 8))


def _with_hop_by_hop(kind: int, body: bytes, src: str = IP6, dst: str = "ff02::1") -> bytes:
    upper = icmp6(src, dst, kind, 0, body)
    return eth(multicast_mac(dst), MAC, ETH_P_IPV6) + ipv6_with_hop_by_hop(src, dst, ICMPV6, upper)


CASES6 = {
    "honest echo": (_echo(IP6), PASS),
    "honest UDP": (eth(GW_MAC, MAC, ETH_P_IPV6) + udp6(IP6, "fd50:0:0:2a::9", 40000, 53, b"q"), PASS),
    "DHCPv6 client message": (eth("33:33:00:01:00:02", MAC, ETH_P_IPV6) + udp6(LL, "ff02::1:2", 546, 547, b"s"), DROP),
    "honest NS": (ns_frame(MAC, IP6, OTHER6), PASS),
    "NS without option": (ns_frame(MAC, IP6, OTHER6, with_option=False), PASS),
    "NS from link-local": (ns_frame(MAC, LL, OTHER_LL), PASS),
    "DAD NS from ::": (ns_frame(MAC, "::", IP6), PASS),
    "honest NA": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 136, na_body(IP6, MAC)), PASS),
    "NA for its link-local": (icmp6_frame(OTHER_MAC, MAC, LL, OTHER_LL, 136, na_body(LL, MAC)), PASS),
    "router solicitation": (icmp6_frame("33:33:00:00:00:02", MAC, LL, "ff02::2", 133, bytes(4)), PASS),
    "MLDv2 report from link-local": (icmp6_frame("33:33:00:00:00:16", MAC, LL, "ff02::16", 143, bytes(4)), PASS),
    "echo from another pod's address": (_echo(OTHER6), DROP),
    "echo from another MAC": (_echo(IP6, src_mac=OTHER_MAC), DROP),
    "echo from link-local": (_echo(LL, OTHER_LL), DROP),
    "echo from ::": (_echo("::"), DROP),
    "UDP from link-local": (eth(GW_MAC, MAC, ETH_P_IPV6) + udp6(LL, OTHER_LL, 40000, 53, b"q"), DROP),
    "NS with another MAC as option": (icmp6_frame("33:33:ff:00:00:06", MAC, IP6, "ff02::1:ff00:6", 135,
                                                  ns_body(OTHER6, OTHER_MAC)), DROP),
    "NA claiming another pod's address": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 136, na_body(OTHER6, MAC)), DROP),
    "NA with another MAC as option": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 136, na_body(IP6, OTHER_MAC)), DROP),
    "NA with two options": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 136,
                                        na_body(IP6, MAC) + bytes([2, 1]) + bytes(6)), DROP),
    "NA from ::": (icmp6_frame(OTHER_MAC, MAC, "::", OTHER6, 136, na_body(IP6, MAC)), DROP),
    "router advertisement": (icmp6_frame("33:33:00:00:00:01", MAC, LL, "ff02::1", 134, ra_body(MAC)), DROP),
    "router advertisement from its address": (icmp6_frame("33:33:00:00:00:01", MAC, IP6, "ff02::1", 134,
                                                          ra_body(MAC)), DROP),
    "redirect": (icmp6_frame(OTHER_MAC, MAC, LL, OTHER6, 137, redirect_body(LL, "fd50:0:0:2a::9")), DROP),
    "redirect from its address": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 137, redirect_body(IP6, "fd50::9")), DROP),
    "MLD query": (icmp6_frame("33:33:00:00:00:01", MAC, LL, "ff02::1", 130, bytes(20)), DROP),
    "DHCPv6 server reply": (eth(OTHER_MAC, MAC, ETH_P_IPV6) + udp6(IP6, OTHER6, 547, 546, b"\x07advertise"), DROP),
    "DHCPv6 reply from link-local": (eth(OTHER_MAC, MAC, ETH_P_IPV6) + udp6(LL, OTHER_LL, 547, 546, b"\x07r"), DROP),
    "RA behind hop-by-hop": (_with_hop_by_hop(134, ra_body(MAC), LL), DROP),
    "echo behind hop-by-hop": (_with_hop_by_hop(128, echo_body(7, b"x" * 8), IP6, OTHER6), DROP),
    "MLDv2 report behind router alert": (_with_hop_by_hop(143, bytes(4), LL, "ff02::16"), PASS),
    "MLDv1 report behind router alert from ::": (_with_hop_by_hop(131, bytes(20), "::", "ff02::1:ff00:5"), PASS),
    "MLDv2 report behind router alert from its address": (_with_hop_by_hop(143, bytes(4), IP6, "ff02::16"), PASS),
    "MLD report behind router alert from another address": (_with_hop_by_hop(143, bytes(4), OTHER6, "ff02::16"),
                                                            DROP),
    "MLD query behind router alert": (_with_hop_by_hop(130, bytes(20), LL), DROP),
    "MLD report behind 16 bytes of options": (eth("33:33:00:00:00:16", MAC, ETH_P_IPV6) + ipv6(
        LL, "ff02::16", 0, bytes([ICMPV6, 1]) + bytes(14) + icmp6(LL, "ff02::16", 143, 0, bytes(4))), DROP),
    "MLD report behind a routing header": (eth("33:33:00:00:00:16", MAC, ETH_P_IPV6) + ipv6(
        LL, "ff02::16", 43, bytes([ICMPV6, 0]) + bytes(6) + icmp6(LL, "ff02::16", 143, 0, bytes(4))), DROP),
    "fragment header": (eth(OTHER_MAC, MAC, ETH_P_IPV6)
                        + ipv6(IP6, OTHER6, 44, bytes([ICMPV6, 0, 0, 1]) + bytes(12)), DROP),
    "no next header": (eth(OTHER_MAC, MAC, ETH_P_IPV6) + ipv6(IP6, OTHER6, NO_NEXT, bytes(8)), PASS),
    "not version 6": (eth(OTHER_MAC, MAC, ETH_P_IPV6) + b"\x45" + _echo(IP6)[15:], DROP),
    "truncated ICMPv6": (_echo(IP6)[:56], DROP),
    "IPv4 still passes": (eth(GW_MAC, MAC, ETH_P_IP) + ipv4_udp(IP, "8.8.8.8", b"x"), PASS),
    "IPv4 from another address": (eth(GW_MAC, MAC, ETH_P_IP) + ipv4_udp("241.1.10.6", "8.8.8.8", b"x"), DROP),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES6))
def test_guard6_program_verdict(guard6_fd, case):
    from cni_fan.bpf.syscall import test_run

    frame, want = CASES6[case]
    assert test_run(guard6_fd, frame).retval == want


@pytest.mark.kernel
def test_without_an_ipv6_address_the_program_drops_all_ipv6():
    require_kernel_lab(plugins=False)
    from cni_fan.bpf.syscall import load_sched_cls, test_run

    fd = load_sched_cls(guardprog.guard_program(MAC, IP), name="tpg_guard4")
    try:
        assert test_run(fd, CASES6["honest echo"][0]).retval == DROP
        assert test_run(fd, CASES6["IPv4 still passes"][0]).retval == PASS
    finally:
        os.close(fd)


# == a bridge with dual-stack pods and the real guard ============================================

@pytest.fixture(scope="module")
def lab6():
    require_kernel_lab(tools=("bridge",), plugins=False)
    from harness.guard6lab import Guard6Lab

    made = Guard6Lab()
    try:
        for index in (5, 6, 7):
            made.add_pod(index)
        yield made
    finally:
        made.close()


@pytest.mark.kernel
def test_install_puts_the_ipv6_pieces_in_place(lab6):
    from harness.guard6lab import BRIDGE, GATEWAY6
    from harness.system import run

    neighbours = lab6.neighbours6()
    groups = {(e["port"], e["grp"]): e for e in lab6.mdb()}
    for pod in lab6.pods:
        link = json.loads(lab6.ip("-j", "link", "show", pod.veth).stdout)[0]
        assert link["ifalias"] == f"cni-fan {pod.ip} {pod.mac} {pod.ip6}"
        mac, state, _proto = neighbours[pod.ip6]
        assert mac == pod.mac and "PERMANENT" in state
        entry = groups[(pod.veth, solicited_node(pod.ip6))]
        assert entry["state"] == "permanent", entry
        inside_pod = json.loads(run(["ip", "-j", "-n", pod.name, "-6", "neigh", "show", GATEWAY6]).stdout)
        assert inside_pod[0]["lladdr"] == portguard.gateway_mac("241.1.10.1") and "PERMANENT" in inside_pod[0]["state"]
    info = json.loads(lab6.ip("-j", "-d", "link", "show", BRIDGE).stdout)[0]["linkinfo"]["info_data"]
    assert info["mcast_snooping"] == 1 and info["mcast_querier"] == 1
    assert info["mcast_query_response_intvl"] == 100, "1 s, so the querier is ready after 1 s, not 10"


@pytest.mark.kernel
def test_pods_ping6_each_other_and_the_gateway(lab6):
    from harness.guard6lab import GATEWAY, GATEWAY6, wait_for

    a, b, c = lab6.pods
    # The bridge forwards by its MDB once it is the querier: one response interval (1 s) after that is turned on.
    assert wait_for(lambda: lab6.ping(a, b.ip6), 30), "pod to pod over IPv6"
    assert lab6.ping(b, a.ip6) and lab6.ping(c, a.ip6) and lab6.ping(a, c.ip6)
    assert lab6.ping(a, GATEWAY6) and lab6.ping(c, GATEWAY6), "pod to its IPv6 gateway"
    assert lab6.ping(a, b.ip) and lab6.ping(a, GATEWAY), "IPv4 still"


def _send_and_watch(lab6, sender, frames: dict, watch) -> dict[str, int]:
    """Send each frame (built around its marker) from inside `sender`; count the frames carrying
    the marker that `watch`'s eth0 received. The marker is inside the IPv6 payload: the node's
    bridge netfilter trims what lies past the payload length."""
    import secrets
    import time

    from harness.frames import drain, packet_socket

    out, seen_at = packet_socket(sender.path, "eth0"), packet_socket(watch.path, "eth0")
    markers = {case: f"tg6-{secrets.token_hex(6)}".encode() for case in frames}
    try:
        drain(seen_at)
        for case, build in frames.items():
            out.send(build(markers[case]))
        time.sleep(0.3)
        seen = drain(seen_at, 0.5)
    finally:
        out.close()
        seen_at.close()
    return {case: sum(markers[case] in f for f in seen) for case in frames}


def _forgeries(a, b) -> dict:
    """Frames from pod `a` to pod `b`'s MAC (unicast: without the guard the bridge delivers them all)."""
    ll = "fe80::1:2:3:4"
    return {
        "honest echo": lambda m: icmp6_frame(b.mac, a.mac, a.ip6, b.ip6, 128, echo_body(9, m)),
        "another source address": lambda m: icmp6_frame(b.mac, a.mac, "fd50:0:0:1c::99", b.ip6, 128,
                                                        echo_body(9, m)),
        "the other pod's address": lambda m: icmp6_frame(b.mac, a.mac, b.ip6, b.ip6, 128, echo_body(9, m)),
        "router advertisement": lambda m: icmp6_frame(b.mac, a.mac, ll, "ff02::1", 134, ra_body(a.mac) + m),
        "redirect": lambda m: icmp6_frame(b.mac, a.mac, ll, b.ip6, 137, redirect_body(ll, "fd50:0:0:2a::9") + m),
        "DHCPv6 server reply": lambda m: eth(b.mac, a.mac, ETH_P_IPV6) + udp6(a.ip6, b.ip6, 547, 546, b"\x07" + m),
        "RA behind hop-by-hop": lambda m: eth(b.mac, a.mac, ETH_P_IPV6) + ipv6_with_hop_by_hop(
            ll, "ff02::1", ICMPV6, icmp6(ll, "ff02::1", 134, 0, ra_body(a.mac) + m)),
    }


@pytest.mark.kernel
def test_a_pod_cannot_send_forged_ipv6_and_the_guard_is_why(lab6):
    from harness.system import run

    a, b, _c = lab6.pods
    seen = _send_and_watch(lab6, a, _forgeries(a, b), b)
    assert seen["honest echo"] == 1, seen
    assert all(count == 0 for case, count in seen.items() if case != "honest echo"), seen
    # The control: the same frames with the guard's filter taken off the port all arrive.
    run(["tc", "-n", lab6.node, "filter", "del", "dev", a.veth, "ingress", "prio", str(portguard.GUARD_PRIO),
         "handle", hex(portguard.GUARD_HANDLE), "bpf"])
    try:
        unguarded = _send_and_watch(lab6, a, _forgeries(a, b), b)
        assert all(count == 1 for count in unguarded.values()), unguarded
    finally:
        lab6.install(a)


def _solicit(lab6, asker, target, bystander) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """`asker` solicits `target`'s address; the frames each of the three pods received."""
    import time

    from harness.frames import drain, packet_socket

    socks = [packet_socket(p.path, "eth0") for p in (asker, target, bystander)]
    try:
        for sock in socks:
            drain(sock)
        socks[0].send(ns_frame(asker.mac, asker.ip6, target.ip6))
        time.sleep(0.3)
        return drain(socks[0], 0.5), drain(socks[1], 0.2), drain(socks[2], 0.2)
    finally:
        for sock in socks:
            sock.close()


def _nd(frames: list[bytes], kind: int, target: str) -> list[bytes]:
    return [f for f in frames if f[12:14] == b"\x86\xdd" and f[20] == ICMPV6 and f[54] == kind
            and f[62:78] == packed(target)]


@pytest.mark.kernel
def test_a_solicitation_reaches_only_the_pod_that_owns_the_address(lab6):
    """Pod a resolves pod b: b answers, pod c's port never sees the solicitation."""
    from harness.guard6lab import wait_for

    a, b, c = lab6.pods
    assert wait_for(lambda: lab6.ping(a, b.ip6), 30)  # the bridge is the querier
    got_a, got_b, got_c = _solicit(lab6, a, b, c)
    assert _nd(got_b, 135, b.ip6), "b got the solicitation"
    answers = _nd(got_a, 136, b.ip6)
    assert answers and answers[0][80:86] == bytes.fromhex(b.mac.replace(":", "")), "b's advertisement reached a"
    assert not _nd(got_c, 135, b.ip6) and not _nd(got_c, 136, b.ip6), "c saw the neighbour discovery"


@pytest.mark.kernel
def test_check_reports_missing_ipv6_pieces_and_repair_puts_them_back(lab6):
    from cni_fan.net import portguard_check
    from cni_fan.net.portguard_repair import repair
    from harness.guard6lab import BRIDGE, GATEWAY, GATEWAY6, guard_cfg
    from harness.system import inside, run

    pod = lab6.pods[2]

    def problems() -> list[str]:
        fd = os.open(pod.path, os.O_RDONLY)
        try:
            with inside(lab6.node_path):
                return portguard_check.problems(guard_cfg(), veth=pod.veth, pod_ip=pod.ip, pod_mac=pod.mac,
                                                gateway=GATEWAY, pod_netns_fd=fd, pod_ifname="eth0",
                                                pod_ip6=pod.ip6, gateway6=GATEWAY6)
        finally:
            os.close(fd)

    assert problems() == []
    lab6.ip("-6", "neigh", "del", pod.ip6, "dev", BRIDGE)
    run(["bridge", "-n", lab6.node, "mdb", "del", "dev", BRIDGE, "port", pod.veth, "grp", solicited_node(pod.ip6)])
    run(["ip", "-n", pod.name, "-6", "neigh", "del", GATEWAY6, "dev", "eth0"])
    found = problems()
    assert any(f"neighbour entry {pod.ip6} on the bridge" in p for p in found), found
    assert any(f"MDB entry {solicited_node(pod.ip6)}" in p for p in found), found
    assert any(f"gateway {GATEWAY6} in the pod" in p for p in found), found
    with inside(lab6.node_path):
        repaired = repair(guard_cfg(), bridge_index=lab6.bridge_index(), gateway=GATEWAY)
    assert len(repaired) == 2, repaired  # the node side; the pod's gateway entry is CHECK's to report
    assert [p for p in problems() if "in the pod" not in p] == []
    lab6.install(pod)
    assert problems() == []
    lab6.install(pod, ip6=False)  # an IPv4-only guard on a dual-stack pod: its program drops all IPv6
    found = problems()
    assert any(portguard.GUARD_NAME6 in p and "not the anti-spoofing program" in p for p in found), found
    lab6.install(pod)
    assert problems() == []


@pytest.mark.kernel
def test_remove_and_gc_take_the_ipv6_entries(lab6):
    from harness.system import inside

    pod = lab6.add_pod(9)
    assert pod.ip6 in lab6.neighbours6()
    with inside(lab6.node_path):
        assert portguard.remove(pod.veth) == pod.ip
    assert pod.ip6 not in lab6.neighbours6() and pod.ip not in lab6.neighbours6()
    lab6.install(pod)
    lab6.ip("link", "del", pod.veth)  # as if the pod vanished without a DEL
    with inside(lab6.node_path):
        gone = portguard.gc(lab6.bridge_index())
    assert set(gone) == {pod.ip, pod.ip6}, gone
    assert all(p.ip6 in lab6.neighbours6() for p in lab6.pods if p is not pod)


def test_the_ipv6_address_of_a_pod_follows_from_its_ipv4_address():
    from cni_fan.config import FanConfig

    conf = {"cniVersion": "1.0.0", "name": "fan", "type": "fan", "overlay": "250.0.0.0/8",
            "underlay": "172.30.0.0/16", "overlay6": "fd50::/48", "dataDir": "/nonexistent"}
    dual = FanConfig.from_dict(conf).params
    assert portguard.paired_ip6(dual, "250.0.28.7") == "fd50:0:0:1c::7"
    assert portguard.paired_ip6(dual, "250.0.28.0") is None  # no pod's
    assert portguard.paired_ip6(FanConfig.from_dict({**conf, "overlay6": None}).params, "250.0.28.7") is None


@pytest.mark.kernel
def test_a_pods_mld_reports_pass_the_guard(lab6):
    """A pod's MLD report (behind its Router Alert hop-by-hop header) reaches the bridge's snooping:
    a group the pod joins after the guard is installed appears, learned, on its port."""
    from harness.guard6lab import wait_for
    from harness.system import run

    pod = lab6.pods[1]
    extra = "fd50:0:0:1c::b:1"
    run(["ip", "-n", pod.name, "addr", "add", f"{extra}/64", "dev", "eth0", "nodad"])
    try:
        group = solicited_node(extra)
        assert wait_for(lambda: any(e["port"] == pod.veth and e["grp"] == group for e in lab6.mdb()), 10), \
            lab6.mdb()
    finally:
        run(["ip", "-n", pod.name, "addr", "del", f"{extra}/64", "dev", "eth0"])


@pytest.mark.kernel
def test_install_failing_half_way_leaves_no_ipv6_neighbour_entry(lab6):
    """The node side succeeds, the pod side fails (no eth0 in the pod): both bridge entries are taken back."""
    from cni_fan.net.errors import GuardError
    from harness.guard6lab import BRIDGE, GATEWAY, GATEWAY6, guard_cfg
    from harness.podlab import ip_batch
    from harness.system import inside

    name = lab6.prefix + "fail"
    ip_batch([f"netns add {name}"])
    lab6.ip("link", "add", "tg6fail", "master", BRIDGE, "type", "veth", "peer", "name", "eth9", "netns", name)
    veth_index = json.loads(lab6.ip("-j", "link", "show", "tg6fail").stdout)[0]["ifindex"]
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        with inside(lab6.node_path), pytest.raises(GuardError, match="in the pod"):
            portguard.install(guard_cfg(), bridge_index=lab6.bridge_index(), veth_index=veth_index,
                              pod_netns_fd=fd, pod_ifname="eth0", pod_ip="241.1.10.249/24",
                              pod_mac="0a:00:00:00:00:f9", gateway=GATEWAY, pod_ip6="fd50:0:0:1c::f9/64",
                              gateway6=GATEWAY6)
    finally:
        os.close(fd)
    assert "fd50:0:0:1c::f9" not in lab6.neighbours6() and "241.1.10.249" not in lab6.neighbours6()
    four = json.loads(lab6.ip("-j", "-4", "neigh", "show", "dev", BRIDGE).stdout or "[]")
    assert "241.1.10.249" not in {n["dst"] for n in four}
    lab6.ip("link", "del", "tg6fail")


@pytest.mark.kernel
def test_a_pod_joining_many_groups_cannot_turn_the_bridges_snooping_off(lab6):
    """The bridge turns snooping off (for every pod) when its MDB is full; each pod port's cap keeps
    one pod from filling it. Shown with a small table: 3 pods x the cap fit, as many groups from one pod would not."""
    from harness.guard6lab import BRIDGE, wait_for
    from harness.system import run

    pod, other = lab6.pods[0], lab6.pods[1]
    small = 3 * portguard.POD_MAX_GROUPS + 8
    lab6.ip("link", "set", BRIDGE, "type", "bridge", "mcast_hash_max", str(small))
    extra = [f"fd50:0:0:1c::{i + 1:x}:5" for i in range(small)]
    try:
        ip_lines = "".join(f"addr add {a}/64 dev eth0 nodad\n" for a in extra)
        run(["ip", "-n", pod.name, "-batch", "-"], input=ip_lines)
        wait_for(lambda: sum(e["port"] == pod.veth for e in lab6.mdb()) >= portguard.POD_MAX_GROUPS, 5)
        info = json.loads(lab6.ip("-j", "-d", "link", "show", BRIDGE).stdout)[0]["linkinfo"]["info_data"]
        assert info["mcast_snooping"] == 1, "one pod turned the bridge's snooping off"
        assert sum(e["port"] == pod.veth for e in lab6.mdb()) <= portguard.POD_MAX_GROUPS
        assert wait_for(lambda: lab6.ping(other, lab6.pods[2].ip6), 30), "pods still resolve each other"
    finally:
        run(["ip", "-n", pod.name, "-batch", "-"], input="".join(f"addr del {a}/64 dev eth0\n" for a in extra),
            check=False)
        lab6.install(pod)  # the bridge's table size back


@pytest.mark.kernel
def test_without_snooping_the_same_solicitation_is_flooded(lab6):
    """The control of the test above (last in the module: it restarts the bridge's querier): with
    snooping off and multicast flooding on for pod c's port, c sees the solicitation."""
    from harness.guard6lab import BRIDGE, wait_for

    a, b, c = lab6.pods[:3]
    lab6.ip("link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0")
    lab6.ip("link", "set", "dev", c.veth, "type", "bridge_slave", "mcast_flood", "on")
    try:
        _got_a, got_b, got_c = _solicit(lab6, a, b, c)
        assert _nd(got_c, 135, b.ip6), "flooded to c"
    finally:
        lab6.ip("link", "set", "dev", c.veth, "type", "bridge_slave", "mcast_flood", "off")
        lab6.install(a)  # snooping back on
    assert wait_for(lambda: lab6.ping(a, b.ip6), 30)
