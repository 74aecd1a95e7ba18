"""Direct routing in the Fan program: per packet, a peer in the node's segment gets the packet
unencapsulated, any other peer gets it encapsulated (BPF_PROG_TEST_RUN returns what the program
wrote and its verdict; the counters say which path it took).

The node is 198.18.1.10 in segment 198.18.1.0/24 of underlay 198.18.0.0/16 (overlay 241.0.0.0/8,
overlay6 fd41::/48): 241.1.20.7 / fd41:0:0:114::7 belong to 198.18.1.20 (in the segment),
241.2.20.7 / fd41:0:0:214::7 to 198.18.2.20 (behind a router).
Inner IPv6 over the IPv4 underlay takes the peer's MAC from the kernel's FIB and neighbour table,
so those tests run in a namespace of their own with a known neighbour entry.
"""
from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from cni_fan.bpf import syscall
from cni_fan.bpf.fanprog import ENCAP_OVERHEAD, Counter, FanDatapathParams, Hook, build_encap_program
from cni_fan.bpf.fanprog_u6 import ENCAP_OVERHEAD6, Underlay6DatapathParams, build_underlay6_program
from harness.fanprogs import LoadedProgram, loader
from harness.frames import ipv6
from harness.system import inside, run
from test_bpf_fanprog import expected_encap, frame, ipv4

TC_ACT_REDIRECT = 7
TUNNEL_MAC = "02:fa:00:00:00:01"
SRC_MAC = "02:fa:00:00:00:02"
PEER_MAC = "02:00:00:00:00:20"
IN_SEGMENT, ROUTED = "241.1.20.7", "241.2.20.7"
IN_SEGMENT6, ROUTED6 = "fd41:0:0:114::7", "fd41:0:0:214::7"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def params(**kw) -> FanDatapathParams:
    base = dict(overlay="241.0.0.0/8", underlay="198.18.0.0/16", local_underlay="198.18.1.10",
                underlay_ifindex=2, vni=0xF1, tunnel_mac=TUNNEL_MAC, inner_src_mac=SRC_MAC,
                hook=Hook.EGRESS, segment="198.18.1.0/24", direct=True)
    base.update(kw)
    return FanDatapathParams(**base)


@pytest.fixture
def load():
    yield from loader(lambda **kw: LoadedProgram(params(**kw), build_encap_program, "t_direct"))


def outer_dst(data: bytes) -> str:
    return str(ipaddress.IPv4Address(data[14 + 16:14 + 20]))


# -- pure -------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(segment="198.19.0.0/24"), "not inside the underlay"),
    (dict(segment="198.18.2.0/24"), "does not hold"),
    (dict(segment="fd00::/64"), "family"),
    (dict(segment=None), "needs the node's segment"),
    (dict(onlink_underlay=True), "exclude"),
])
def test_bad_segments_are_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        params(**kw)


# -- in the kernel: inner IPv4 ---------------------------------------------

@pytest.mark.kernel
@needs_root
def test_a_peer_in_the_segment_gets_the_packet_as_it_is(load) -> None:
    prog = load()
    inp = frame(ipv4("241.1.10.9", IN_SEGMENT))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == inp, "the direct path leaves the packet unencapsulated (redirect_neigh writes the MACs)"
    assert (prog.count(Counter.DIRECT), prog.count(Counter.ENCAPSULATED)) == (1, 0)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("direct", [True, False])
def test_a_peer_behind_a_router_is_encapsulated(load, direct) -> None:
    prog = load(direct=direct)
    inp = frame(ipv4("241.1.10.9", ROUTED))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    sport = struct.unpack("!H", out.data[34:36])[0]
    assert out.data == expected_encap(prog.params, inp, sport)
    assert outer_dst(out.data) == "198.18.2.20"
    assert (prog.count(Counter.DIRECT), prog.count(Counter.ENCAPSULATED)) == (0, 1)


@pytest.mark.kernel
@needs_root
def test_without_direct_routing_a_peer_in_the_segment_is_encapsulated(load) -> None:
    prog = load(direct=False)
    inp = frame(ipv4("241.1.10.9", IN_SEGMENT))
    out = prog.run(inp)
    sport = struct.unpack("!H", out.data[34:36])[0]
    assert out.data == expected_encap(prog.params, inp, sport)
    assert outer_dst(out.data) == "198.18.1.20"
    assert (prog.count(Counter.DIRECT), prog.count(Counter.ENCAPSULATED)) == (0, 1)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst, dropped", [("241.1.20.0", True), ("241.1.10.7", False), ("10.1.2.3", False)])
def test_what_is_not_forwarded_stays_so_with_direct_routing(load, dst, dropped) -> None:
    prog = load()
    inp = frame(ipv4("241.1.10.9", dst))
    out = prog.run(inp)
    assert out.data == inp
    assert prog.count(Counter.DROPPED if dropped else Counter.PASSED) == 1
    assert prog.count(Counter.DIRECT) == 0


# -- in the kernel: inner IPv6 over the IPv4 underlay ----------------------

@pytest.fixture
def segment_ns():
    """A namespace with the node's underlay device (a veth holding 198.18.1.10/24), IPv4
    forwarding on, and a permanent neighbour entry for 198.18.1.20 only."""
    name = f"t-direct-{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        ns = ["ip", "-n", name]
        run([*ns, "link", "add", "under0", "type", "veth", "peer", "name", "under1"])
        run([*ns, "link", "set", "under0", "address", "02:00:00:00:00:10", "up"])
        run([*ns, "link", "set", "under1", "up"])
        run([*ns, "addr", "add", "198.18.1.10/24", "dev", "under0"])
        run([*ns, "neigh", "add", "198.18.1.20", "lladdr", PEER_MAC, "dev", "under0", "nud", "permanent"])
        run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        index = int(run([*ns, "-j", "link", "show", "under0"]).stdout.split('"ifindex":')[1].split(",")[0])
        yield f"/run/netns/{name}", index
    finally:
        run(["ip", "netns", "del", name], check=False)


def load6(index: int, **kw) -> LoadedProgram:
    return LoadedProgram(params(overlay6="fd41::/48", underlay_ifindex=index, **kw), build_encap_program, "t_direct6")


@pytest.mark.kernel
@needs_root
def test_inner_ipv6_to_a_known_peer_leaves_with_the_peers_mac(segment_ns) -> None:
    path, index = segment_ns
    prog = load6(index)
    try:
        inp = frame(ipv6("fd41:0:0:10a::9", IN_SEGMENT6, b"x" * 32), ethertype=0x86DD)
        with inside(path):
            out = prog.run(inp)
        assert out.retval == TC_ACT_REDIRECT
        want = bytes.fromhex(PEER_MAC.replace(":", "")) + bytes.fromhex("020000000010") + inp[12:]
        assert out.data == want, "Ethernet header from the FIB lookup, the IPv6 packet untouched"
        assert (prog.count(Counter.DIRECT), prog.count(Counter.FALLBACK), prog.count(Counter.ENCAPSULATED)) \
            == (1, 0, 0)
    finally:
        prog.close()


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("why", ["no neighbour entry", "a gateway route to the peer"])
def test_inner_ipv6_falls_back_to_the_tunnel(segment_ns, why) -> None:
    path, index = segment_ns
    peer = "198.18.1.30"  # no neighbour entry
    if why != "no neighbour entry":
        # The route names 198.18.1.20 (whose MAC is known) as gateway: not the peer itself.
        run(["ip", "-n", path.rsplit("/", 1)[1], "route", "add", f"{peer}/32", "via", "198.18.1.20"])
    prog = load6(index)
    try:
        inp = frame(ipv6("fd41:0:0:10a::9", "fd41:0:0:11e::7", b"x" * 32), ethertype=0x86DD)
        with inside(path):
            out = prog.run(inp)
        assert out.retval == TC_ACT_REDIRECT
        assert len(out.data) == len(inp) + ENCAP_OVERHEAD
        assert outer_dst(out.data) == peer
        assert out.data[14 + ENCAP_OVERHEAD:] == inp[14:], "the inner IPv6 packet rides in the tunnel"
        assert (prog.count(Counter.DIRECT), prog.count(Counter.FALLBACK), prog.count(Counter.ENCAPSULATED)) \
            == (0, 1, 1)
    finally:
        prog.close()


@pytest.mark.kernel
@needs_root
def test_inner_ipv6_to_a_peer_behind_a_router_is_encapsulated(segment_ns) -> None:
    path, index = segment_ns
    prog = load6(index)
    try:
        inp = frame(ipv6("fd41:0:0:10a::9", ROUTED6, b"x" * 32), ethertype=0x86DD)
        with inside(path):
            out = prog.run(inp)
        assert outer_dst(out.data) == "198.18.2.20"
        assert (prog.count(Counter.DIRECT), prog.count(Counter.FALLBACK), prog.count(Counter.ENCAPSULATED)) \
            == (0, 0, 1)
    finally:
        prog.close()


# -- in the kernel: the IPv6 underlay ---------------------------------------

def params_u6(**kw) -> Underlay6DatapathParams:
    base = dict(overlay6="fd50::/48", underlay="fd00:198:18::/104", local_underlay="fd00:198:18::1:c",
                underlay_ifindex=2, vni=0xF1, tunnel_mac=TUNNEL_MAC, inner_src_mac=SRC_MAC, hook=Hook.EGRESS,
                segment="fd00:198:18::1:0/112", direct=True)
    base.update(kw)
    return Underlay6DatapathParams(**base)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst, direct, path", [
    ("fd50:0:0:100:1400::7", True, "direct"),           # fd00:198:18::1:14, in the segment
    ("fd50:0:0:200:1400::7", True, "encapsulated"),     # fd00:198:18::2:14, behind a router
    ("fd50:0:0:100:1400::7", False, "encapsulated"),
])
def test_ipv6_underlay_chooses_per_packet(dst, direct, path) -> None:
    prog = LoadedProgram(params_u6(direct=direct), build_underlay6_program, "t_direct_u6")
    try:
        inp = frame(ipv6("fd50:0:0:100:c00::9", dst, b"x" * 32), ethertype=0x86DD)
        out = prog.run(inp)
        assert out.retval == TC_ACT_REDIRECT
        if path == "direct":
            assert out.data == inp
        else:
            assert len(out.data) == len(inp) + ENCAP_OVERHEAD6
            host = int(ipaddress.IPv6Address(dst)) >> 56 & 0xFFFFFF   # bits 48-71
            want = ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd00:198:18::")) | host)
            assert ipaddress.IPv6Address(out.data[14 + 24:14 + 40]) == want
        counts = (prog.count(Counter.DIRECT), prog.count(Counter.ENCAPSULATED))
        assert counts == ((1, 0) if path == "direct" else (0, 1))
    finally:
        prog.close()


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("direct", [True, False])
def test_verifier_accepts_without_a_counters_map(direct) -> None:
    for code in (build_encap_program(params(overlay6="fd41::/48", direct=direct)),
                 build_underlay6_program(params_u6(direct=direct))):
        fd = syscall.load_sched_cls(code, "t_direct_nomap")
        os.close(fd)
