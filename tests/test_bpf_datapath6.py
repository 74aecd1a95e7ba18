"""Inner IPv6 through the Fan program in the real kernel (dual-stack nodes).

The lab of tests/test_bpf_datapath.py (harness/bpflab.py) with
``overlay6=True``: the IPv4 underlay 198.18.0.0/16 and, beside the IPv4
overlay, the IPv6 overlay fd41::/48, each node's IPv6 slice named by the
same host bits of its underlay address:

    node n1 198.18.1.10   owns fd41:0:0:10a::/64   pod p1 fd41:0:0:10a::5
    node n2 198.18.2.20   owns fd41:0:0:214::/64   pod p2 fd41:0:0:214::5
    node n3 198.18.3.30   owns fd41:0:0:31e::/64   pod p3 fd41:0:0:31e::5

Each node routes ``fd41::/48 via fd41::1 dev fanvx onlink`` with a permanent
neighbour to the shared tunnel MAC; the program encapsulates in IPv4/UDP/
VXLAN. Run egress-only (the product) and with the bridge fast path.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time

import pytest

from harness.bpflab import NEXT_HOP6, OVERLAY6, POD_MTU, TUNNEL_MAC, UNDERLAY_MTU, Lab, Pod, ip_json, sh
from harness.ping import echo
from harness.ping6 import echo6, icmp6_socket
from harness.system import inside
from harness.tcpflow import tcp_transfer

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


@pytest.fixture(scope="module", params=["none", "bridge"])
def lab(request):
    lab = Lab(nodes=3, attach_point=request.param, overlay6=True)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
    from pyroute2 import netns
    assert not [n for n in netns.listnetns() if n.startswith(lab.prefix)]


def pod(lab: Lab, name: str) -> Pod:
    return next(p for p in lab.pods if p.name == name)


def worker(lab: Lab) -> str:
    """The hook that encapsulates pods' traffic in this lab."""
    return "ingress" if lab.attach_point == "bridge" else "egress"


def test_slices_follow_the_ipv4_host_bits(lab) -> None:
    assert [str(n.slice6) for n in lab.nodes] == \
        ["fd41:0:0:10a::/64", "fd41:0:0:214::/64", "fd41:0:0:31e::/64"]
    assert str(pod(lab, "p2").address6) == "fd41:0:0:214::5"


def test_pod_to_pod_over_ipv6_across_nodes_and_back(lab) -> None:
    p1, p2, p3 = pod(lab, "p1"), pod(lab, "p2"), pod(lab, "p3")
    before = lab.counters(p1.node)
    for src, dst in ((p1, p2), (p2, p1), (p1, p3), (p3, p2)):
        answer, _ = echo6(src.path, str(dst.address6))
        assert answer is not None and answer.kind == "reply", (src, dst)
        assert answer.src == str(dst.address6)
    after = lab.counters(p1.node)
    key = (worker(lab), "ENCAPSULATED")
    assert after[key] - before[key] >= 2
    # IPv4 still works beside it.
    answer, _ = echo(p1.path, str(p2.address))
    assert answer is not None and answer.kind == "reply"


def test_hop_limit_is_decremented_once_per_node(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    with icmp6_socket(p2.path) as watch:
        answer, seen = echo6(p1.path, str(p2.address6), hops=64, watch=watch)
    assert seen is not None and seen.hop_limit == 62
    assert answer is not None and answer.hop_limit == 62


def test_hop_limit_expiry_is_reported_like_a_router(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    answer, _ = echo6(p1.path, str(p2.address6), hops=1)
    assert answer is not None and answer.kind == "time-exceeded"
    assert answer.src == str(p1.node.gateway6)
    answer, _ = echo6(p1.path, str(p2.address6), hops=2)
    assert answer is not None and answer.kind == "time-exceeded"
    assert ipaddress.IPv6Address(answer.src) in p2.node.slice6


def test_node_to_remote_pod_over_ipv6(lab) -> None:
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    before = lab.counters(n1)
    with icmp6_socket(p2.path) as watch:
        answer, seen = echo6(n1.path, str(p2.address6), watch=watch)
    assert answer is not None and answer.kind == "reply"
    assert seen is not None and seen.src == str(n1.gateway6)
    assert seen.hop_limit == 63
    after = lab.counters(n1)
    assert after[("egress", "ENCAPSULATED")] > before[("egress", "ENCAPSULATED")]
    # And a remote pod reaches a node's gateway.
    answer, _ = echo6(pod(lab, "p3").path, str(n1.gateway6))
    assert answer is not None and answer.kind == "reply"


def test_full_size_packet_passes_and_one_byte_more_does_not(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    full = POD_MTU - 40 - 8
    answer, _ = echo6(p1.path, str(p2.address6), payload=full)
    assert answer is not None and answer.kind == "reply"
    assert answer.size == POD_MTU - 40
    with pytest.raises(OSError) as info:
        echo6(p1.path, str(p2.address6), payload=full + 1)
    assert info.value.errno == errno.EMSGSIZE


def test_pod_ignoring_the_mtu_gets_packet_too_big(lab) -> None:
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    big = next((p for p in lab.pods if p.name == "p16"), None) or lab.add_pod(n1, mtu=UNDERLAY_MTU, index=6)
    answer, _ = echo6(big.path, str(p2.address6), payload=POD_MTU + 1 - 48)
    assert answer is not None and answer.kind == "too-big" and answer.mtu == POD_MTU
    assert answer.src == str(n1.gateway6)


def test_fragments_are_mapped_like_any_packet(lab) -> None:
    # The sender splits a 3000-byte echo (fragment headers after the fixed
    # header); every fragment is encapsulated and the far pod reassembles.
    p1, p3 = pod(lab, "p1"), pod(lab, "p3")
    before = lab.counters(p1.node)
    answer, _ = echo6(p1.path, str(p3.address6), payload=3000, fragment=True)
    assert answer is not None and answer.kind == "reply" and answer.size == 3008
    after = lab.counters(p1.node)
    key = (worker(lab), "ENCAPSULATED")
    assert after[key] - before[key] >= 3
    assert after[("ingress", "PUNTED")] == before[("ingress", "PUNTED")]


def test_hop_by_hop_header_is_delivered(lab) -> None:
    # On the bridge fast path the program punts it (a router must read it);
    # the kernel forwards it and the egress program encapsulates it.
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    before = lab.counters(p1.node)
    with inside(p2.path):
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with inside(p1.path):
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("::", 7777))
        rx.settimeout(3)
        # Hop-by-hop header: next header (set by the kernel), length 0, PadN.
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, b"\0\0\x01\x04\0\0\0\0")
        tx.sendto(b"hbh", (str(p2.address6), 7777))
        data, addr = rx.recvfrom(100)
    assert data == b"hbh" and addr[0] == str(p1.address6)
    after = lab.counters(p1.node)
    if lab.attach_point == "bridge":
        assert after[("ingress", "PUNTED")] == before[("ingress", "PUNTED")] + 1
    assert after[("egress", "ENCAPSULATED")] == before[("egress", "ENCAPSULATED")] + 1


def test_tcp6_bulk_transfer_and_segments_fit_the_underlay(lab) -> None:
    # GSO super-packets with an IPv6 inner header through adjust_room
    # (FIXED_GSO): with UDP-tunnel segmentation offload off on node 1's
    # underlay the kernel segments in software, and every segment fits.
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    n1 = p1.node
    _transfer(p1, pod(lab, "p3"), 16, 5301)
    sh(n1.ns, "ethtool", "-K", "ul0", "tx-udp_tnl-segmentation", "off", "tx-udp_tnl-csum-segmentation", "off")
    with inside(lab.switch_path):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sizes: list[int] = []
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            try:
                frame, addr = cap.recvfrom(70000)
            except socket.timeout:
                continue
            if addr[2] != socket.PACKET_OUTGOING and frame[12:14] == b"\x08\x00" and frame[23] == 17 \
                    and frame[36:38] == struct.pack("!H", 4789) and frame[62:64] == b"\x86\xdd":
                sizes.append(len(frame))

    try:
        cap.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
        cap.bind((n1.name, 0))
        cap.settimeout(0.2)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        _transfer(p1, p2, 8, 5302)
        time.sleep(0.5)
        done.set()
        reader.join(timeout=5)
    finally:
        done.set()
        cap.close()
        sh(n1.ns, "ethtool", "-K", "ul0", "tx-udp_tnl-segmentation", "on", "tx-udp_tnl-csum-segmentation", "on")
    assert len(sizes) > 5000     # 8 MiB in ~1400-byte segments
    assert max(sizes) == 14 + UNDERLAY_MTU


def test_ipv6_adds_no_per_peer_state(lab) -> None:
    for src in lab.pods[:3]:
        for dst in lab.pods[:3]:
            if src is not dst:
                echo6(src.path, str(dst.address6))
    for node in lab.nodes:
        others = [n.slice6 for n in lab.nodes if n is not node]
        for r in ip_json(node.ns, "ip", "-j", "-6", "route", "show", "table", "all"):
            dst = r.get("dst", "")
            if dst not in ("default", "") and ":" in dst:
                net = ipaddress.IPv6Network(dst if "/" in dst else dst + "/128")
                assert not any(net.subnet_of(o) for o in others), r
        overlay = sorted(r["dst"] for r in ip_json(node.ns, "ip", "-j", "-6", "route", "show")
                         if r["dst"].startswith("fd41:"))
        assert overlay == sorted([str(OVERLAY6), str(node.slice6)])
        vx = [(n["dst"], n.get("lladdr")) for n in ip_json(node.ns, "ip", "-j", "-6", "neigh", "show", "dev", "fanvx")]
        assert vx == [(NEXT_HOP6, TUNNEL_MAC)], vx
        assert ip_json(node.ns, "bridge", "-j", "fdb", "show", "dev", "fanvx") == []


def test_veth_attach_point_and_onlink_next_hop_variants() -> None:
    # The program on each pod's veth (gateway MAC checked by the program)
    # and bpf_redirect_neigh given the outer destination as next hop.
    lab = Lab(nodes=2, attach_point="veth", onlink_underlay=True, overlay6=True)
    try:
        lab.build()
        p1, p2 = lab.pods
        with icmp6_socket(p2.path) as watch:
            answer, seen = echo6(p1.path, str(p2.address6), watch=watch)
        assert answer is not None and answer.kind == "reply"
        assert seen is not None and seen.hop_limit == 62
        assert lab.counters(p1.node)[("ingress", "ENCAPSULATED")] >= 1
        answer, _ = echo6(lab.nodes[0].path, str(p2.address6))
        assert answer is not None and answer.kind == "reply"
    finally:
        lab.close()


def _transfer(src: Pod, dst: Pod, megabytes: int, port: int) -> None:
    tcp_transfer(src.path, dst.ns, str(dst.address6), megabytes, port)
