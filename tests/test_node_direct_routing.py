"""Direct routing (`directRouting: true`) with the real node components and pods (kernel tests).

A lab of its own (harness/nodelab.py, prefix `tdr<hex>`), dual-stack: underlay 198.18.0.0/16,
overlay 241.0.0.0/8, overlay6 fd41::/48. Two underlay segments joined by a router namespace:

    segment A (switch br0): n1 198.18.1.11/24, n2 198.18.1.12/24, router 198.18.1.254
    segment B (switch br1): n3 198.18.2.13/24, router 198.18.2.254

The router forwards underlay traffic only (it has no route into the overlay), so a packet for
n3's pods that left n1 unencapsulated would die there. Every node starts with a strict
`all.rp_filter` (RHEL's default) to show that the agent's loose setting on the underlay
interface is what lets direct packets in.

Seen on the wire (AF_PACKET on n1's switch port, which receives what n1 sends): pod-to-pod
traffic within segment A is plain IPv4 / IPv6 carrying the pods' own addresses (no masquerade),
traffic to n3's pod is VXLAN to 198.18.2.13. The receiving side drops unencapsulated overlay
packets whose source is the node's own slice or a node's outside the segment, and counts them.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Iterator

import pytest

from harness import nodelab
from harness.frames import IcmpWatcher, checksum, drain, packet_socket
from harness.system import in_netns

pytestmark = pytest.mark.kernel

PREFIX = nodelab.new_prefix("dr")
OVERLAY6 = "fd41::/48"
VXLAN_PORT = 4789
DIRECT = True


class Cluster:
    def __init__(self, lab: nodelab.FanLab) -> None:
        self.lab = lab
        under = lab.under
        under.ip("link", "add", "br1", "type", "bridge")
        under.ip("link", "set", "br1", "up")
        self.router = lab.new_netns("r")
        for port, dev, cidr, bridge in (("ra", "eth0", "198.18.1.254/24", "br0"),
                                        ("rb", "eth1", "198.18.2.254/24", "br1")):
            under.ip("link", "add", port, "type", "veth", "peer", "name", dev, "netns", self.router.name)
            under.ip("link", "set", port, "master", bridge, "up")
            self.router.ip("addr", "add", cidr, "dev", dev)
            self.router.ip("link", "set", dev, "up")
        self.router.set_sysctl("net.ipv4.ip_forward", "1")
        self.nodes = []
        for cidr, via in (("198.18.1.11/24", "198.18.1.254"), ("198.18.1.12/24", "198.18.1.254"),
                          ("198.18.2.13/24", "198.18.2.254")):
            node = lab.add_node(cidr, directRouting=DIRECT)
            if cidr.startswith("198.18.2."):
                under.ip("link", "set", f"n{node.index}", "master", "br1")
            other = "198.18.2.0/24" if cidr.startswith("198.18.1.") else "198.18.1.0/24"
            node.ns.ip("route", "add", other, "via", via)
            node.ns.set_sysctl("net.ipv4.conf.all.rp_filter", "1")
            self.nodes.append(node)
        for node in self.nodes:
            node.up()
        self.pods = [node.add_pod() for node in self.nodes]

    def ipv6(self, pod: nodelab.Pod) -> str:
        return next(ip["address"].split("/")[0] for ip in pod.result["ips"] if ":" in ip["address"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    nodelab.require_root_and_tools()
    lab = nodelab.FanLab(PREFIX, tmp_path_factory.mktemp("nodes"), overlay6=OVERLAY6)
    try:
        yield Cluster(lab)
    finally:
        lab.close()


def paths(frames: list[bytes], src: str, dst: str) -> set[str]:
    """How the packets from `src` to `dst` (pod addresses, either family) crossed the wire:
    "direct" (the inner packet itself), "vxlan <outer destination>" (encapsulated)."""
    out = set()
    for frame in frames:
        kind, ip = struct.unpack_from("!H", frame, 12)[0], frame[14:]
        if kind == 0x0800 and ip[9] == 17 and struct.unpack_from("!H", ip, 22)[0] == VXLAN_PORT:
            inner = ip[20 + 8 + 8:]
            if _addresses(struct.unpack_from("!H", inner, 12)[0], inner[14:]) == (src, dst):
                out.add(f"vxlan {ipaddress.IPv4Address(ip[16:20])}")
        elif _addresses(kind, ip) == (src, dst):
            out.add("direct")
    return out


def _addresses(kind: int, ip: bytes) -> tuple[str, str] | None:
    if kind == 0x0800 and len(ip) >= 20:
        return str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
    if kind == 0x86DD and len(ip) >= 40:
        return str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
    return None


def ping(pod: nodelab.Pod, dst: str, count: int = 3) -> bool:
    return pod.ns.run("ping", "-c", count, "-i", "0.2", "-W", "2", dst, check=False, timeout=30).returncode == 0


def test_every_pod_reaches_every_other_in_both_families(cluster) -> None:
    pods = cluster.pods
    for a in pods:
        for b in pods:
            if a is not b:
                assert ping(a, b.address, count=1), f"{a.address} -> {b.address}"
                assert ping(a, cluster.ipv6(b), count=1), f"{cluster.ipv6(a)} -> {cluster.ipv6(b)}"


@pytest.mark.parametrize("family", [4, 6])
def test_within_the_segment_unencapsulated_across_it_vxlan(cluster, family) -> None:
    p1, p2, p3 = cluster.pods
    addr = (lambda p: p.address) if family == 4 else cluster.ipv6
    sock = packet_socket(cluster.lab.under.path, "n1")   # the switch receives what n1 sends
    try:
        assert ping(p1, addr(p2)) and ping(p1, addr(p3))
        frames = drain(sock, 0.3)
    finally:
        sock.close()
    # The pod's own source on the wire: the masquerade rule does not catch direct traffic.
    assert paths(frames, addr(p1), addr(p2)) == {"direct"}
    assert paths(frames, addr(p1), addr(p3)) == {"vxlan 198.18.2.13"}


def test_node_show_says_which_path(cluster) -> None:
    n1, (p1, p2, p3) = cluster.nodes[0], cluster.pods
    assert ping(p1, p2.address, count=1) and ping(p1, p3.address, count=1)
    info = n1.show()
    assert info["direct_routing"] is True and info["segment"] == "198.18.1.0/24"
    assert info["direct_sources"] == ["241.1.0.0/16", "fd41:0:0:100::/56"]
    assert info["program_packets"]["direct"] > 0 and info["program_packets"]["encapsulated"] > 0
    assert "direct    on in segment 198.18.1.0/24" in n1.cni_fan("node", "show", "--conflist", n1.conflist).stdout


def test_the_agents_metrics_and_health_say_it(cluster) -> None:
    n1, (p1, p2, _) = cluster.nodes[0], cluster.pods
    agent = n1.start_agent("--no-plugin-server")
    try:
        agent.wait_health()
        assert ping(p1, p2.address, count=1)
        code, health = agent.http("/healthz")
        assert code == 200 and "direct routing: on in segment 198.18.1.0/24 (eth0)" in health
        code, metrics = agent.http("/metrics")
        assert 'cni_fan_direct_routing_info{segment="198.18.1.0/24"} 1.0' in metrics
        assert 'cni_fan_program_packets_total{verdict="direct"}' in metrics
        assert "cni_fan_direct_source_dropped_packets_total" in metrics
    finally:
        agent.stop()


def test_the_agent_sets_the_underlay_reverse_path_filter_loose(cluster) -> None:
    for node in cluster.nodes:
        assert node.ns.sysctl("net.ipv4.conf.eth0.rp_filter") == "2"
        assert node.ns.sysctl("net.ipv4.conf.all.rp_filter") == "1"


def test_no_per_peer_routes_or_neighbours(cluster) -> None:
    n1 = cluster.nodes[0]
    peers = [ipaddress.ip_network(s) for s in ("241.1.12.0/24", "241.2.13.0/24", "fd41:0:0:10c::/64",
                                               "fd41:0:0:20d::/64")]
    for family in ("-4", "-6"):
        for route in n1.ns.ip_json(family, "route", "show", "table", "all"):
            dst = route.get("dst", "")
            if dst and dst[0].isdigit() or ":" in dst:
                net = ipaddress.ip_network(dst, strict=False)
                assert not any(net.version == p.version and net.subnet_of(p) for p in peers), route
    # Permanent entries off the bridge (whose are the pods' own): the overlay next hops, one per family.
    permanent = [n for n in n1.ns.ip_json("neigh", "show", "nud", "permanent") if n["dev"] != n1.show()["bridge"]]
    assert sorted(n["dev"] for n in permanent) == ["fan-vxlan", "fan-vxlan"], permanent


IDENT = 0x4a17


def spoofed_echo(cluster, source: str, dst: str) -> None:
    """From a host in segment A that is no node (198.18.1.50), one echo request with an overlay
    `source`, sent unencapsulated to n1, which owns `dst`."""
    lab = cluster.lab
    if not hasattr(cluster, "intruder"):
        intruder = lab.add_node("198.18.1.50/24", write_conflist=False)
        lab.nodes.remove(intruder)
        intruder.ns.ip("route", "add", "241.1.11.0/24", "via", "198.18.1.11")
        cluster.intruder = intruder
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, IDENT, 1) + b"direct" * 4)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0,
                                   ipaddress.IPv4Address(source).packed, ipaddress.IPv4Address(dst).packed))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            sock.sendto(bytes(header) + bytes(icmp), (dst, 0))
    in_netns(cluster.intruder.ns.path, send)


@pytest.mark.parametrize("source, from_what, delivered", [
    ("241.1.12.50", "a node's slice in the segment (n2's)", True),
    ("241.2.13.50", "a node's slice outside the segment (n3's)", False),
    ("241.1.11.50", "the receiving node's own slice", False),
])
def test_unencapsulated_overlay_sources_only_from_the_segment(cluster, source, from_what, delivered) -> None:
    n1, p1 = cluster.nodes[0], cluster.pods[0]
    before = n1.show()["dropped_direct_source_packets"]
    watcher = IcmpWatcher(p1.ns.path, IDENT)
    try:
        spoofed_echo(cluster, source, p1.address)
        nodelab.wait_until(lambda: watcher.seen, 1.0)
    finally:
        seen = watcher.stop()
    dropped = n1.show()["dropped_direct_source_packets"] - before
    assert (seen >= 1, dropped) == (delivered, 0 if delivered else 1), from_what


def test_node_down_restores_rp_filter_and_removes_the_chain(tmp_path) -> None:
    nodelab.require_root_and_tools()
    lab = nodelab.FanLab(nodelab.new_prefix("dd"), tmp_path)
    try:
        node = lab.add_node("198.18.1.11/24", directRouting=True)
        node.ns.set_sysctl("net.ipv4.conf.eth0.rp_filter", "1")
        node.up()
        assert node.ns.sysctl("net.ipv4.conf.eth0.rp_filter") == "2"
        assert "iifname \"eth0\" ip saddr 241.1.11.0/24" in node.ns.run("nft", "list", "chain", "ip", "cni-fan",
                                                                       "direct").stdout
        node.down()
        assert node.ns.sysctl("net.ipv4.conf.eth0.rp_filter") == "1"
        assert node.ns.run("nft", "list", "tables", check=False).stdout.strip() == ""
    finally:
        lab.close()


