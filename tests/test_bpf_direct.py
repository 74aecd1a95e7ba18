"""Direct routing in the Fan program: per packet, a peer in the node's segment gets the packet
unencapsulated, any other peer gets it encapsulated (BPF_PROG_TEST_RUN returns what the program
wrote and its verdict; the counters say which path it took).

The node is 198.18.1.10 in segment 198.18.1.0/24 of underlay 198.18.0.0/16 (overlay 241.0.0.0/8,
overlay6 fd41::/48): 241.1.20.7 / fd41:0:0:114::7 belong to 198.18.1.20 (in the segment, its MAC
known), 241.2.20.7 / fd41:0:0:214::7 to 198.18.2.20 (behind a router). The IPv6 underlay's cases
mirror them. The program takes the peer's MAC from the kernel's FIB and neighbour table, so the
tests run in a namespace of their own (`segment_ns`); a peer without a neighbour entry, or reached
through a gateway, gets the packet encapsulated (a fallback).
"""
from __future__ import annotations

import ipaddress
import json
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
UNDER_MAC = "02:00:00:00:00:10"
IN_SEGMENT = "241.1.20.7"

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
])
def test_bad_segments_are_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        params(**kw)


# -- in the kernel -----------------------------------------------------------
# The FIB and neighbour lookups run in the namespace of the thread that starts the test run:
# one of our own, whose underlay device knows the MAC of 198.18.1.20 / fd00:198:18::1:14 only.

@pytest.fixture(scope="module")
def segment_ns():
    """A namespace with the node's underlay device (a veth holding 198.18.1.10/24 and
    fd00:198:18::1:c/112), forwarding on, and permanent neighbour entries for one peer per family;
    198.18.1.30 / fd00:198:18::1:1e are reached through 198.18.1.20 / fd00:198:18::1:14 as gateway."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"t-direct-{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        ns = ["ip", "-n", name]
        run([*ns, "link", "add", "under0", "type", "veth", "peer", "name", "under1"])
        run([*ns, "link", "set", "under0", "address", UNDER_MAC, "up"])
        run([*ns, "link", "set", "under1", "up"])
        run([*ns, "addr", "add", "198.18.1.10/24", "dev", "under0"])
        run([*ns, "addr", "add", "fd00:198:18::1:c/112", "dev", "under0", "nodad"])
        for peer in ("198.18.1.20", "fd00:198:18::1:14"):
            run([*ns, "neigh", "add", peer, "lladdr", PEER_MAC, "dev", "under0", "nud", "permanent"])
        run([*ns, "route", "add", "198.18.1.30/32", "via", "198.18.1.20"])
        run([*ns, "-6", "route", "add", "fd00:198:18::1:1e/128", "via", "fd00:198:18::1:14"])
        run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        index = json.loads(run([*ns, "-j", "link", "show", "under0"]).stdout)[0]["ifindex"]
        yield f"/run/netns/{name}", index
    finally:
        run(["ip", "netns", "del", name], check=False)


def run_in(path: str, prog: LoadedProgram, data: bytes):
    with inside(path):
        return prog.run(data)


def counts(prog: LoadedProgram) -> tuple[int, int, int]:
    return prog.count(Counter.DIRECT), prog.count(Counter.FALLBACK), prog.count(Counter.ENCAPSULATED)


def direct_frame(inp: bytes) -> bytes:
    """The frame the direct path sends: the peer's MAC, the underlay device's, the packet as it was."""
    return bytes.fromhex(PEER_MAC.replace(":", "") + UNDER_MAC.replace(":", "")) + inp[12:]


# The counters (direct, fallback, encapsulated) one packet moves, by the path it took.
COUNTS_OF_PATH = {"direct": (1, 0, 0), "fallback": (0, 1, 1), "encapsulated": (0, 0, 1)}


def assert_path(prog: LoadedProgram, inp: bytes, out, kind: str, check_encapsulated) -> None:
    """The program redirected `inp` by the path `kind`: unencapsulated to the peer's MAC, or as
    `check_encapsulated(frame)` wants it; and counted it so."""
    assert out.retval == TC_ACT_REDIRECT
    if kind == "direct":
        assert out.data == direct_frame(inp), "unencapsulated, the peer's MAC from the neighbour table"
    else:
        check_encapsulated(out.data)
    assert counts(prog) == COUNTS_OF_PATH[kind]


IPV4_CASES = {   # destination: (path, outer destination)
    "241.1.20.7": ("direct", None),                     # 198.18.1.20: MAC known
    "241.1.30.7": ("fallback", "198.18.1.30"),          # in the segment, through a gateway
    "241.1.40.7": ("fallback", "198.18.1.40"),          # in the segment, no neighbour entry
    "241.2.20.7": ("encapsulated", "198.18.2.20"),      # behind a router
}


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst", list(IPV4_CASES))
def test_inner_ipv4_path_per_peer(segment_ns, load, dst) -> None:
    path, index = segment_ns
    prog = load(underlay_ifindex=index)
    inp = frame(ipv4("241.1.10.9", dst))
    out = run_in(path, prog, inp)
    kind, outer = IPV4_CASES[dst]

    def encapsulated(data: bytes) -> None:
        sport = struct.unpack("!H", data[34:36])[0]
        assert data == expected_encap(prog.params, inp, sport)
        assert outer_dst(data) == outer

    assert_path(prog, inp, out, kind, encapsulated)


@pytest.mark.kernel
@needs_root
def test_without_direct_routing_a_known_peer_is_encapsulated(segment_ns, load) -> None:
    path, index = segment_ns
    prog = load(underlay_ifindex=index, direct=False)
    inp = frame(ipv4("241.1.10.9", IN_SEGMENT))
    out = run_in(path, prog, inp)
    sport = struct.unpack("!H", out.data[34:36])[0]
    assert out.data == expected_encap(prog.params, inp, sport)
    assert counts(prog) == (0, 0, 1)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst, dropped", [("241.1.20.0", True), ("241.1.10.7", False), ("10.1.2.3", False)])
def test_what_is_not_forwarded_stays_so_with_direct_routing(segment_ns, load, dst, dropped) -> None:
    path, index = segment_ns
    prog = load(underlay_ifindex=index)
    inp = frame(ipv4("241.1.10.9", dst))
    out = run_in(path, prog, inp)
    assert out.data == inp
    assert prog.count(Counter.DROPPED if dropped else Counter.PASSED) == 1
    assert counts(prog) == (0, 0, 0)


IPV6_CASES = {
    "fd41:0:0:114::7": ("direct", None),
    "fd41:0:0:11e::7": ("fallback", "198.18.1.30"),
    "fd41:0:0:128::7": ("fallback", "198.18.1.40"),
    "fd41:0:0:214::7": ("encapsulated", "198.18.2.20"),
}


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst", list(IPV6_CASES))
def test_inner_ipv6_over_ipv4_path_per_peer(segment_ns, load, dst) -> None:
    path, index = segment_ns
    prog = load(underlay_ifindex=index, overlay6="fd41::/48")
    inp = frame(ipv6("fd41:0:0:10a::9", dst, b"x" * 32), ethertype=0x86DD)
    out = run_in(path, prog, inp)
    kind, outer = IPV6_CASES[dst]

    def encapsulated(data: bytes) -> None:
        assert len(data) == len(inp) + ENCAP_OVERHEAD
        assert outer_dst(data) == outer
        assert data[14 + ENCAP_OVERHEAD:] == inp[14:], "the inner IPv6 packet rides in the tunnel"

    assert_path(prog, inp, out, kind, encapsulated)


def params_u6(**kw) -> Underlay6DatapathParams:
    base = dict(overlay6="fd50::/48", underlay="fd00:198:18::/104", local_underlay="fd00:198:18::1:c",
                underlay_ifindex=2, vni=0xF1, tunnel_mac=TUNNEL_MAC, inner_src_mac=SRC_MAC, hook=Hook.EGRESS,
                segment="fd00:198:18::1:0/112", direct=True)
    base.update(kw)
    return Underlay6DatapathParams(**base)


U6_CASES = {   # host field (bits 48-71): fd00:198:18::1:14 is 0x010014
    "fd50:0:0:100:1400::7": ("direct", None),
    "fd50:0:0:100:1e00::7": ("fallback", "fd00:198:18::1:1e"),
    "fd50:0:0:100:2800::7": ("fallback", "fd00:198:18::1:28"),
    "fd50:0:0:200:1400::7": ("encapsulated", "fd00:198:18::2:14"),
}


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("dst", list(U6_CASES))
@pytest.mark.parametrize("direct", [True, False])
def test_ipv6_underlay_path_per_peer(segment_ns, dst, direct) -> None:
    path, index = segment_ns
    prog = LoadedProgram(params_u6(underlay_ifindex=index, direct=direct), build_underlay6_program, "t_direct_u6")
    try:
        inp = frame(ipv6("fd50:0:0:100:c00::9", dst, b"x" * 32), ethertype=0x86DD)
        out = run_in(path, prog, inp)
        kind, outer = U6_CASES[dst]
        if not direct:
            kind, outer = "encapsulated", outer or "fd00:198:18::1:14"

        def encapsulated(data: bytes) -> None:
            assert len(data) == len(inp) + ENCAP_OVERHEAD6
            assert str(ipaddress.IPv6Address(data[14 + 24:14 + 40])) == outer

        assert_path(prog, inp, out, kind, encapsulated)
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
