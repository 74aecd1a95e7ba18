"""`cni-fan node up|down|show` on real network namespaces (kernel tests).

A lab of its own (harness/nodelab.py, prefix `tnd<hex>`): an underlay bridge
namespace, nodes with `eth0` on it (198.18.<i>.<10+i>/16, overlay
241.0.0.0/8, so node 198.18.1.11 owns 241.1.11.0/24), pods added with
cnitool and the real `fan` plugin.

Covered: `node up` is idempotent (a second run changes nothing and says so);
`node down` removes exactly what `up` made (links, addresses, routes,
permanent neighbours, FDB, tc, nftables, sysctls compared with the state
before `up`); `node show --json`; full-size don't-fragment pings between
pods on two nodes; the tunnel input filter against encapsulated packets
from outside the underlay; the eBPF-free `fanmap: routes` mapping end to
end; the plugin's STATUS before and after `node up`.
Pod-to-outside NAT is tested by the lab (tests/test_lab.py).
"""
from __future__ import annotations

import json
import socket
import time

import netaddr
import pytest

from harness import nodelab
from harness.frames import IcmpWatcher, icmp_echo_frame, vxlan_header
from harness.state import state_diff
from harness.system import in_netns, run
from cni_fan.config import FanConfig
from cni_fan.node import fanmap_routes
from cni_fan.plan import inner_source_mac, make_plan, peer_mac, shared_tunnel_mac

pytestmark = pytest.mark.kernel

PREFIX = nodelab.new_prefix("nd")
VNI = 0xF10000
SYSCTLS = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables", "net.ipv4.conf.all.rp_filter",
           "net.ipv4.conf.default.rp_filter", "net.ipv4.conf.eth0.rp_filter")


lab = nodelab.lab_fixture(PREFIX)


@pytest.fixture(scope="module")
def pair(lab):
    """Two nodes up, one pod on each."""
    return nodelab.two_nodes_up(lab)


# -- up, down, show ----------------------------------------------------------------------

def test_up_is_idempotent_and_down_removes_exactly_what_up_made(lab) -> None:
    node = lab.add_node("198.18.3.13/16")
    # Values `up` must change (and `down` put back), whatever a new namespace starts with.
    node.ns.set_sysctl("net.ipv4.ip_forward", "0")
    node.ns.set_sysctl("net.bridge.bridge-nf-call-iptables", "0")
    before = node.ns.snapshot(SYSCTLS)

    first = node.up()
    assert "set up" in first.stderr, first.stderr
    after_up = node.ns.snapshot(SYSCTLS)
    made = state_diff(before, after_up)
    # What up makes, roughly: the pieces are there.
    links = after_up["links"]
    assert links["fan-241-3-13"][0] == "bridge" and links["fan-241-3-13"][2] == 1450
    assert links["fan-vxlan"][0] == "vxlan" and links["fan-vxlan"][3] == shared_tunnel_mac(VNI)
    assert "fan-241-3-13 241.3.13.1/24" in after_up["addrs"]
    # The tunnel carries the gateway as a /32: what kube-proxy's MASQUERADE picks (docs/datapath.md).
    assert "fan-vxlan 241.3.13.1/32" in after_up["addrs"]
    assert any('"dst": "241.0.0.0/8"' in r and '"gateway": "241.0.0.0"' in r and '"prefsrc": "241.3.13.1"' in r
               for r in after_up["routes"])
    assert any('"dst": "241.0.0.0"' in n and shared_tunnel_mac(VNI) in n for n in after_up["neigh"])
    assert "bpf" in after_up["tc"]["fan-vxlan"][1] and "direct-action" in after_up["tc"]["fan-vxlan"][1]
    assert "table ip cni-fan" in after_up["nft"]
    assert after_up["sysctls"]["net.ipv4.ip_forward"] == "1"
    assert after_up["sysctls"]["net.bridge.bridge-nf-call-iptables"] == "1"
    assert node.ns.sysctl("net.ipv4.conf.fan-vxlan.rp_filter") == "2"
    assert made, "node up changed nothing"

    second = node.up()
    assert "already up" in second.stderr, second.stderr
    changed = state_diff(after_up, node.ns.snapshot(SYSCTLS))
    assert changed == [], "a second `node up` changed the node:\n" + "\n".join(changed)

    down = node.down()
    assert "removed" in down.stderr
    left = state_diff(before, node.ns.snapshot(SYSCTLS))
    assert left == [], "node down left differences:\n" + "\n".join(left)
    assert not (node.dir / "state" / "node-state.json").exists()

    again = node.down()  # nothing left to remove: still fine
    assert again.returncode == 0 and "removed" not in again.stderr
    assert state_diff(before, node.ns.snapshot(SYSCTLS)) == []


def test_show_json(pair) -> None:
    n1, _n2, p1, _p2 = pair
    info = n1.show()
    assert info["up"] is True and info["problems"] == []
    assert {k: info[k] for k in ("overlay", "underlay", "host", "underlay_interface", "slice", "gateway",
                                 "capacity", "bridge", "mtu", "tunnel", "encap", "vni", "vxlan_port", "fanmap",
                                 "firewall")} == {
        "overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16", "host": "198.18.1.11", "underlay_interface": "eth0",
        "slice": "241.1.11.0/24", "gateway": "241.1.11.1", "capacity": 253, "bridge": "fan-241-1-11",
        "mtu": 1450, "tunnel": "fan-vxlan", "encap": "vxlan", "vni": VNI, "vxlan_port": 4789, "fanmap": "bpf",
        "firewall": "nftables"}
    assert info["conflist"] == str(n1.conflist)
    program = info["program"]
    assert program["name"] == "cni-fan" and program["direct_action"] is True
    assert isinstance(program["id"], int) and len(program["tag"]) == 16
    assert isinstance(info["dropped_foreign_tunnel_packets"], int)
    assert info["bridge_ports"] == 1
    assert info["pods"] == [{"address": p1.address, "containerID": p1.container_id, "ifname": "eth0"}]
    text = n1.cni_fan("node", "show", "--conflist", n1.conflist).stdout
    assert "node 198.18.1.11 (eth0): UP" in text and p1.address in text

    # A broken node says what is wrong, and `up` fixes it.
    n1.ns.ip("route", "del", "241.0.0.0/8")
    try:
        broken = n1.show()
        assert broken["up"] is False
        assert any("route to 241.0.0.0/8 is missing" in p for p in broken["problems"]), broken["problems"]
    finally:
        n1.up()
    assert n1.show()["up"] is True


def test_a_tunnel_without_its_address_is_a_problem_and_up_puts_it_back(pair) -> None:
    n1, _n2, _p1, _p2 = pair
    n1.ns.ip("addr", "del", "241.1.11.1/32", "dev", "fan-vxlan")
    try:
        broken = n1.show()
        assert broken["up"] is False
        assert "tunnel fan-vxlan lacks 241.1.11.1/32" in broken["problems"], broken["problems"]
    finally:
        n1.up()
    assert "241.1.11.1/32" in n1.ns.ipv4_addrs("fan-vxlan")
    assert n1.show()["up"] is True


# -- traffic ------------------------------------------------------------------------------

def test_pods_on_two_nodes_reach_each_other(pair) -> None:
    _n1, _n2, p1, p2 = pair
    assert p1.address.startswith("241.1.11.") and p2.address.startswith("241.2.12.")
    assert p1.reaches(p2.address), p1.ping(p2.address).stdout
    assert p2.reaches(p1.address), p2.ping(p1.address).stdout


def test_full_size_dont_fragment_ping_passes_and_one_byte_more_does_not(pair) -> None:
    _n1, _n2, p1, p2 = pair
    mtu = p1.mtu
    assert mtu == p2.mtu == 1450
    full = mtu - 28  # IPv4 + ICMP headers
    for src, dst in ((p1, p2), (p2, p1)):
        out = src.ping(dst.address, count=3, size=full, dont_fragment=True)
        assert out.returncode == 0, f"full-size DF ping {src.address} -> {dst.address} failed:\n{out.stdout}"
        assert "3 received" in out.stdout
    too_big = p1.ping(p2.address, size=full + 1, dont_fragment=True)
    assert too_big.returncode != 0, too_big.stdout
    assert "0 received" in too_big.stdout or "message too long" in (too_big.stdout + too_big.stderr).lower()
    # The full-size packet left the node as one underlay frame: the encapsulated
    # size is exactly the underlay MTU (1450 + 50 = 1500), which eth0 carries.
    assert int(_n1.ns.link("eth0")["mtu"]) == mtu + 50


def send_udp(ns: nodelab.Netns, src: str, dst: str, port: int, payload: bytes, count: int = 1) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((src, 0))
            for _ in range(count):
                sock.sendto(payload, (dst, port))
    in_netns(ns.path, send)


def test_tunnel_input_filter_drops_encapsulated_packets_from_outside_the_underlay(pair) -> None:
    n1, n2, p1, p2 = pair
    outside = "198.19.0.66"  # in 198.18.0.0/15, outside the underlay 198.18.0.0/16
    n2.ns.ip("addr", "add", f"{outside}/16", "dev", "eth0")
    try:
        assert n2.ns.run("ping", "-c", "1", "-W", "2", n1.address, check=False).returncode == 0  # ARP settled
        ident = 0x4242

        def frame(seq: int) -> bytes:
            inner = icmp_echo_frame(shared_tunnel_mac(VNI), inner_source_mac(VNI), p2.address,
                                            p1.address, ident, seq)
            return vxlan_header(VNI) + inner

        # Control: the same packet from an underlay address is delivered to the pod.
        watcher = IcmpWatcher(p1.ns.path, ident)
        dropped = n1.nft_drop_counter()
        try:
            send_udp(n2.ns, n2.address, n1.address, 4789, frame(1), count=3)
            nodelab.wait_until(lambda: watcher.seen >= 3, timeout=3)
        finally:
            delivered = watcher.stop()
        assert delivered == 3, "the crafted VXLAN packet is not delivered even from inside the underlay"
        assert n1.nft_drop_counter() == dropped

        # From outside the underlay: counted and dropped, never delivered.
        watcher = IcmpWatcher(p1.ns.path, ident)
        try:
            send_udp(n2.ns, outside, n1.address, 4789, frame(2), count=5)
            rose = nodelab.wait_until(lambda: n1.nft_drop_counter() >= dropped + 5, timeout=3)
            time.sleep(0.3)
        finally:
            leaked = watcher.stop()
        assert rose, f"nft counter {n1.nft_drop_counter()}, was {dropped}"
        assert n1.nft_drop_counter() == dropped + 5
        assert leaked == 0, f"{leaked} inner packets from outside the underlay reached the pod"
        assert n1.show()["dropped_foreign_tunnel_packets"] == dropped + 5
    finally:
        n2.ns.ip("addr", "del", f"{outside}/16", "dev", "eth0", check=False)


# -- fanmap: routes ------------------------------------------------------------------------

def test_fanmap_routes_end_to_end(tmp_path) -> None:
    nodelab.require_root_and_tools()
    lab = nodelab.FanLab(PREFIX + "r", tmp_path, underlay="198.18.0.0/24")
    try:
        n1 = lab.add_node("198.18.0.11/24", fanmap="routes")
        n2 = lab.add_node("198.18.0.12/24", fanmap="routes")
        for node in (n1, n2):
            out = node.up()
            assert "set up" in out.stderr, out.stderr
        p1, p2 = n1.add_pod(), n2.add_pod()
        assert p1.address.startswith("241.11.") and p2.address.startswith("241.12.")
        assert p1.reaches(p2.address, count=3), p1.ping(p2.address).stdout
        assert p2.reaches(p1.address, count=3), p2.ping(p1.address).stdout

        cfg = FanConfig.from_dict(n1.conflist_data()["plugins"][0] | {"name": "fan"})
        want = fanmap_routes.expected_entries(make_plan(cfg, netaddr.IPAddress(n1.address), "eth0", 2, 1500))
        assert want == 253
        for node in (n1, n2):
            info = node.show()
            assert info["up"] is True and info["fanmap"] == "routes" and info["program"] is None, info
            assert node.ns.run("tc", "filter", "show", "dev", "fan-vxlan", "egress").stdout.strip() == ""
            routes = node.ns.ip_json("-4", "route", "show", "proto", "250", "dev", "fan-vxlan")
            assert len(routes) == want
            assert len({r["metric"] for r in routes}) == want
            fdb = json.loads(run(["bridge", "-n", node.ns.name, "-j", "fdb", "show", "dev",
                                          "fan-vxlan"]).stdout)
            assert len([f for f in fdb if f.get("dst")]) == want
            assert node.ns.link("fan-vxlan")["address"] == peer_mac(netaddr.IPAddress(node.address))
        # A second up finds everything in place.
        assert "already up" in n1.up().stderr
        n1.down()
        assert n1.ns.link("fan-vxlan") is None
        assert n1.ns.ip_json("-4", "route", "show", "proto", "250") == []
        assert not p1.reaches(p2.address, wait=1)
    finally:
        lab.close()


# -- STATUS ---------------------------------------------------------------------------------

def test_status_answers_50_before_node_up_and_success_after(lab) -> None:
    node = lab.add_node("198.18.4.14/16")
    plugin = node.conflist_data()["plugins"][0]
    config = {"cniVersion": "1.1.0", "name": "fan", **plugin}

    code, out, err = nodelab.run_plugin(node, "STATUS", config)
    assert code != 0 and out is not None and out["code"] == 50, (code, out, err)
    assert out["cniVersion"] == "1.1.0" and out["msg"]

    node.up()
    code, out, err = nodelab.run_plugin(node, "STATUS", config)
    assert (code, out) == (0, None), (code, out, err)

    node.ns.ip("link", "del", "fan-vxlan")  # the datapath broken again
    code, out, _ = nodelab.run_plugin(node, "STATUS", config)
    assert code != 0 and out["code"] == 50 and "fan-vxlan" in out.get("details", "")
    node.up()
    assert nodelab.run_plugin(node, "STATUS", config)[0] == 0
    node.down()
    assert nodelab.run_plugin(node, "STATUS", config)[1]["code"] == 50
