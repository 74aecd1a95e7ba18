"""IPv6-only clusters in the real kernel: VXLAN over an IPv6 underlay.

The lab of harness/bpflab6u.py: three nodes on ``fd00:198:18::/112``, the
overlay ``fd50::/48`` (n1 ``fd00:198:18::1c`` owns ``fd50:0:0:1c::/64``),
no IPv4 anywhere; the program of cni_fan/bpf/fanprog_u6.py on each node's
tunnel egress (and, in the "bridge" run, the bridge's ingress), the
receiving VXLAN devices plain with ``udp6zerocsumrx``. Pods ping each other
across nodes; the underlay switch's port shows the outer frames. The
control: receivers without ``udp6zerocsumrx`` drop every packet (the zero
checksum is a decision both ends must share).
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

from harness.bpflab6u import POD_MTU, UNDERLAY_MTU, Lab6U, Pod, sh, snmp6
from harness.bpflab import TUNNEL_MAC, VNI
from harness.frames import drain, packet_socket
from harness.ping6 import echo6, icmp6_socket
from harness.system import inside
from harness.tcpflow import tcp_transfer

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

ETH_P_IPV6 = b"\x86\xdd"


def _built(lab: Lab6U):
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
    from pyroute2 import netns
    assert not [n for n in netns.listnetns() if n.startswith(lab.prefix)]


@pytest.fixture(scope="module", params=["none", "bridge"])
def lab(request):
    yield from _built(Lab6U(nodes=3, attach_point=request.param))


@pytest.fixture(scope="module")
def control_lab():
    yield from _built(Lab6U(nodes=2, zero_csum_rx=False))


@pytest.fixture(scope="module")
def onlink_lab():
    yield from _built(Lab6U(nodes=2, onlink_underlay=True))


def pod(lab: Lab6U, name: str) -> Pod:
    return next(p for p in lab.pods if p.name == name)


def worker(lab: Lab6U) -> str:
    """The hook that encapsulates pods' traffic in this lab."""
    return "ingress" if lab.attach_point == "bridge" else "egress"


def vxlan_frames(frames: list[bytes]) -> list[bytes]:
    """The outer VXLAN-over-IPv6 frames among `frames`."""
    return [f for f in frames if len(f) >= 14 + 70 and f[12:14] == ETH_P_IPV6 and f[20] == 17
            and f[56:58] == struct.pack("!H", 4789)]


def test_slices_follow_the_ipv6_underlay_host_bits(lab) -> None:
    assert [str(n.slice6) for n in lab.nodes] == ["fd50:0:0:1c::/64", "fd50:0:0:2d::/64", "fd50:0:0:3e::/64"]
    assert str(pod(lab, "p2").address6) == "fd50:0:0:2d::5"


def test_pod_to_pod_across_nodes_and_back(lab) -> None:
    p1, p2, p3 = pod(lab, "p1"), pod(lab, "p2"), pod(lab, "p3")
    before = lab.counters(p1.node)
    for src, dst in ((p1, p2), (p2, p1), (p1, p3), (p3, p2)):
        answer, _ = echo6(src.path, str(dst.address6))
        assert answer is not None and answer.kind == "reply", (src.name, dst.name)
        assert answer.src == str(dst.address6)
    after = lab.counters(p1.node)
    key = (worker(lab), "ENCAPSULATED")
    assert after[key] - before[key] >= 2


def test_outer_frame_on_the_wire(lab) -> None:
    from cni_fan.bpf.fanprog import Hook
    from cni_fan.bpf.fanprog_u6 import outer_destination_u6
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    n1, n2 = p1.node, p2.node
    with packet_socket(lab.switch_path, n1.name) as cap:
        answer, _ = echo6(p1.path, str(p2.address6), payload=100)
        frames = vxlan_frames(drain(cap, 0.2))
    assert answer is not None and answer.kind == "reply"
    requests = [f for f in frames if f[14 + 70 + 24:14 + 70 + 40] == p2.address6.packed]
    assert requests, "no VXLAN frame to p2 left node 1"
    computed = outer_destination_u6(lab.params(n1, Hook.EGRESS), p2.address6)
    assert computed == n2.underlay
    for f in requests:
        assert f[12:14] == ETH_P_IPV6                     # outer EtherType
        assert f[14] >> 4 == 6 and f[21] == 64            # version, hop limit
        assert f[22:38] == n1.underlay.packed             # source: the node's underlay address
        assert f[38:54] == computed.packed                # destination: the reverse map's
        payload_len, = struct.unpack("!H", f[18:20])
        assert payload_len == len(f) - 54
        sport, dport, udp_len, csum = struct.unpack("!HHHH", f[54:62])
        assert 32768 <= sport <= 60999 and dport == 4789
        assert udp_len == payload_len and csum == 0       # zero UDP checksum
        assert f[62:70] == struct.pack("!II", 0x08000000, VNI << 8)
        assert f[70:76] == bytes.fromhex(TUNNEL_MAC.replace(":", ""))   # inner destination MAC
        assert f[82:84] == ETH_P_IPV6 and f[84] >> 4 == 6                # inner IPv6
        assert len(f) == 14 + 70 + 40 + 8 + 100           # outer + inner IPv6 + ICMPv6 echo


def test_hop_limit_is_decremented_once_per_node(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    with icmp6_socket(p2.path) as watch:
        answer, seen = echo6(p1.path, str(p2.address6), hops=64, watch=watch)
    assert seen is not None and seen.hop_limit == 62
    assert answer is not None and answer.hop_limit == 62


def test_node_to_remote_pod(lab) -> None:
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    before = lab.counters(n1)
    with icmp6_socket(p2.path) as watch:
        answer, seen = echo6(n1.path, str(p2.address6), watch=watch)
    assert answer is not None and answer.kind == "reply"
    assert seen is not None and seen.src == str(n1.gateway6)
    assert lab.counters(n1)[("egress", "ENCAPSULATED")] > before[("egress", "ENCAPSULATED")]


def test_full_size_packet_passes_and_one_byte_more_does_not(lab) -> None:
    # Pods' MTU is the underlay's minus 70: a full pod packet is a full
    # underlay frame.
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    full = POD_MTU - 40 - 8
    with packet_socket(lab.switch_path, p1.node.name) as cap:
        answer, _ = echo6(p1.path, str(p2.address6), payload=full)
        sizes = [len(f) for f in vxlan_frames(drain(cap, 0.2))]
    assert answer is not None and answer.kind == "reply"
    assert max(sizes) == 14 + UNDERLAY_MTU
    with pytest.raises(OSError) as err:
        echo6(p1.path, str(p2.address6), payload=full + 1)
    assert err.value.errno == errno.EMSGSIZE


def test_tcp_segments_leave_with_zero_checksums_and_fit_the_underlay(lab) -> None:
    # GSO super-packets through adjust_room (UDP tunnel, outer IPv6): with
    # tunnel segmentation offload off on node 1's underlay the kernel
    # segments in software; every segment fits and carries checksum 0.
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    n1 = p1.node
    offloads = ("tx-udp_tnl-segmentation", "tx-udp_tnl-csum-segmentation")
    sh(n1.ns, "ethtool", "-K", "ul0", *(x for o in offloads for x in (o, "off")))
    with inside(lab.switch_path):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                frame, addr = cap.recvfrom(70000)
            except socket.timeout:
                continue
            if addr[2] != socket.PACKET_OUTGOING and vxlan_frames([frame]):
                seen.append((len(frame), struct.unpack("!H", frame[60:62])[0]))

    try:
        cap.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
        cap.bind((n1.name, 0))
        cap.settimeout(0.2)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        tcp_transfer(p1.path, p2.ns, str(p2.address6), 8, 5401)
        time.sleep(0.5)
        done.set()
        thread.join(timeout=5)
    finally:
        done.set()
        cap.close()
        sh(n1.ns, "ethtool", "-K", "ul0", *(x for o in offloads for x in (o, "on")))
    assert len(seen) > 5000     # 8 MiB in ~1400-byte segments
    assert max(size for size, _ in seen) == 14 + UNDERLAY_MTU
    assert {csum for _, csum in seen} == {0}


def test_without_udp6zerocsumrx_the_receiver_drops_it(control_lab) -> None:
    p1, p2 = pod(control_lab, "p1"), pod(control_lab, "p2")
    n1, n2 = p1.node, p2.node
    errors_before = snmp6(n2.ns, "Udp6InCsumErrors")
    sent_before = control_lab.counters(n1)[("egress", "ENCAPSULATED")]
    answer, _ = echo6(p1.path, str(p2.address6), tries=2, timeout=0.5)
    assert answer is None
    # The program did send; the receiver's UDP layer refused the zero checksum.
    assert control_lab.counters(n1)[("egress", "ENCAPSULATED")] > sent_before
    assert snmp6(n2.ns, "Udp6InCsumErrors") > errors_before


def test_onlink_next_hop_is_the_outer_destination(onlink_lab) -> None:
    # bpf_redirect_neigh with an IPv6 next hop (struct bpf_redir_neigh,
    # AF_INET6): the neighbour is resolved without a route lookup, so the
    # sender needs no route to the underlay at all.
    p1, p2 = pod(onlink_lab, "p1"), pod(onlink_lab, "p2")
    sh(p1.node.ns, "ip", "-6", "route", "flush", "dev", "ul0", "proto", "kernel")
    for src, dst in ((p1, p2), (p2, p1)):
        answer, _ = echo6(src.path, str(dst.address6))
        assert answer is not None and answer.kind == "reply", (src.name, dst.name)
    neighbours = sh(p1.node.ns, "ip", "-6", "neigh", "show", "dev", "ul0")
    assert str(p2.node.underlay) in neighbours


def test_an_ipv6_underlay_lab_has_no_ipv4(lab) -> None:
    for node in lab.nodes:
        assert sh(node.ns, "ip", "-4", "addr", "show", "scope", "global").strip() == ""
        assert ipaddress.IPv6Address(node.underlay) in ipaddress.IPv6Network("fd00::/8")
