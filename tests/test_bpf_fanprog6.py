"""The Fan program's IPv6 branch: inner IPv6 over the IPv4 underlay.

Pure: the IPv6 slice and the outer-destination model against FanMap (the
other implementation), the refusals, the product's parameters. In the
kernel (BPF_PROG_TEST_RUN runs the program on a frame and returns what it
wrote): the encapsulation rebuilt independently from RFC 8200 / 791 / 768 /
7348 and compared byte for byte, property-tested against the model over
host-field layouts that sit in one 32-bit word or straddle two, and every
pass/drop/punt verdict with its counter.
"""
from __future__ import annotations

import ipaddress
import os
import struct

import netaddr
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni_fan.bpf import syscall
from cni_fan.bpf.fanprog import (ENCAP_OVERHEAD, Counter, FanDatapathParams, Hook,
                                 build_encap_program, outer_destination)
from cni_fan.bpf.fanprog6 import check_overlay6
from harness.frames import (DEST_OPTS, FRAGMENT, HOP_BY_HOP, NO_NEXT, PADN4, ROUTING, checksum,
                            fragment_body, ipv6, routing_body)
from harness.fanprogs import LoadedProgram, loader

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TUNNEL_MAC = "02:fa:00:00:00:01"
SRC_MAC = "02:fa:00:00:00:02"
POD_MAC = bytes.fromhex("0200000000aa")
HOST_DST = bytes(6)   # the test run's loopback: frames to it are PACKET_HOST

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# (overlay6, IPv4 underlay, local underlay address): where the host field
# sits in the 128-bit address.
LAYOUTS = {
    "one word (/48 + 16)": ("fd41::/48", "198.18.0.0/16", "198.18.1.10"),
    "words 1-2 (/52 + 16)": ("fd41::/52", "198.18.0.0/16", "198.18.1.10"),
    "words 1-2 (/60 + 12)": ("fd41:0:0:10::/60", "198.18.0.0/20", "198.18.1.10"),
    "word 0 (/8 + 8)": ("fd00::/8", "198.18.0.0/24", "198.18.0.10"),
    "words 0-1 (/24 + 17)": ("fd41::/24", "198.18.0.0/15", "198.18.1.10"),
    "words 2-3 (/90 + 17)": ("fd41::/90", "198.18.0.0/15", "198.18.1.10"),
    "word 3 (/100 + 16)": ("fd41::/100", "198.18.0.0/16", "198.18.1.10"),
}


def params(layout: str = "one word (/48 + 16)", **kw) -> FanDatapathParams:
    overlay6, underlay, host = LAYOUTS[layout]
    base = dict(overlay="241.0.0.0/8", underlay=underlay, local_underlay=host, underlay_ifindex=2,
                vni=0xF1, tunnel_mac=TUNNEL_MAC, inner_src_mac=SRC_MAC, overlay6=overlay6)
    base.update(kw)
    return FanDatapathParams(**base)


def remote(p: FanDatapathParams, container: int = 7, step: int = 1) -> ipaddress.IPv6Address:
    """An address in the slice `step` hosts after ours."""
    s = p.local_slice6
    return ipaddress.IPv6Address(int(s.network_address) + step * s.num_addresses + container)


# -- pure -------------------------------------------------------------------

def test_the_issues_worked_example() -> None:
    p = params(overlay="250.0.0.0/8", underlay="172.30.0.0/16", local_underlay="172.30.0.28",
               overlay6="fd50::/48")
    assert str(p.local_slice6) == "fd50:0:0:1c::/64"
    assert outer_destination(p, "fd50:0:0:1d::5") == ipaddress.IPv4Address("172.30.0.29")
    assert outer_destination(p, "fd50:0:0:1c::5") is None               # local slice
    assert outer_destination(p, "fd50:0:0:1d::") is None                 # slice's first
    assert outer_destination(p, "fd50:0:0:1d:ffff:ffff:ffff:ffff") is None  # and last
    assert outer_destination(p, "fd50::5") is None                       # underlay network
    assert outer_destination(p, "fd50:0:0:ffff::5") is None              # underlay broadcast
    assert outer_destination(p, "fd51::5") is None                       # outside overlay6
    assert outer_destination(p, "ff02::1") is None
    assert outer_destination(p, "fe80::1") is None


def test_without_overlay6_ipv6_maps_nowhere() -> None:
    p = params(overlay6=None)
    assert p.local_slice6 is None
    assert outer_destination(p, "fd41:0:0:214::5") is None


@settings(max_examples=300)
@given(layout=st.sampled_from(sorted(LAYOUTS)), host=st.integers(1, (1 << 17) - 2),
       low=st.integers(0, (1 << 128) - 1), anywhere=st.booleans())
def test_model_agrees_with_fanmap(layout, host, low, anywhere) -> None:
    from cni_fan.fanmap import FanMap, FanMapError   # the other implementation
    overlay6, underlay, local = LAYOUTS[layout]
    p = params(layout)
    fan = FanMap.parse(overlay6, underlay)
    assert str(fan.slice_for(netaddr.IPAddress(local))) == str(p.local_slice6)
    # An address in overlay6 (or anywhere), with a host field of `host`.
    cbits = 128 - p.local_slice6.prefixlen
    host &= (1 << p.host_bits) - 1
    inner = ipaddress.IPv6Address(low if anywhere else int(p.overlay6.network_address)
                                  | host << cbits | low & ((1 << cbits) - 1))
    got = outer_destination(p, inner)
    try:
        want = ipaddress.IPv4Address(str(fan.underlay_host_for(str(inner))))
    except FanMapError:
        want = None
    edge = int(inner) & ((1 << cbits) - 1) in (0, (1 << cbits) - 1)
    if want is None or inner in p.local_slice6 or edge:
        assert got is None
    else:
        assert got == want


@pytest.mark.parametrize("overlay6, match", [
    ("ff00::/8", "multicast"),
    ("fe80::/10", "link-local"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fd41::/112", "/128 slices"),
    ("fd41::/105", "/121 slices"),
    ("fd41::1/48", "host bits"),
    ("241.0.0.0/8", "IPv6"),
])
def test_bad_overlay6_is_refused(overlay6, match) -> None:
    with pytest.raises(ValueError, match=match):
        params(overlay6=overlay6)


def test_a_host_field_wider_than_two_words_is_refused() -> None:
    # No IPv4 underlay gives one (at most 32 host bits); the guard says so.
    with pytest.raises(ValueError, match="two adjacent 32-bit words"):
        check_overlay6("fd41::/48", 33)


def test_the_products_parameters_carry_overlay6() -> None:
    from cni_fan.config import FanConfig
    from cni_fan.node.fanmap_bpf import datapath_params
    from cni_fan.plan import make_plan
    raw = {"name": "fan", "cniVersion": "1.1.0", "type": "fan", "overlay": "250.0.0.0/8",
           "underlay": "172.30.0.0/16", "overlay6": "fd50::/48"}
    host = netaddr.IPAddress("172.30.0.28")
    plan = make_plan(FanConfig.from_dict(raw), host, "eth0", 2, 1500)
    p = datapath_params(plan)
    assert p.overlay6 == ipaddress.IPv6Network("fd50::/48")
    assert str(p.local_slice6) == str(plan.ipv6.slice) == "fd50:0:0:1c::/64"
    del raw["overlay6"]
    assert datapath_params(make_plan(FanConfig.from_dict(raw), host, "eth0", 2, 1500)).overlay6 is None


@given(layout=st.sampled_from(sorted(LAYOUTS)), hook=st.sampled_from(list(Hook)),
       counters=st.booleans(), mtu=st.sampled_from([None, 1450]))
def test_program_builds_for_every_layout(layout, hook, counters, mtu) -> None:
    p = params(layout, hook=hook, overlay_mtu=mtu)
    code = build_encap_program(p, 5 if counters else None)
    assert len(code) % 8 == 0 and len(code) < 500 * 8
    # The IPv6 branch is extra code: without overlay6 the program is shorter.
    assert len(build_encap_program(params(layout, hook=hook, overlay_mtu=mtu, overlay6=None))) < len(code)


# -- in the kernel ----------------------------------------------------------

def frame(ip: bytes, dst_mac: bytes = HOST_DST) -> bytes:
    return dst_mac + POD_MAC + b"\x86\xdd" + ip


def expected_encap6(p: FanDatapathParams, inp: bytes, sport: int) -> bytes:
    """The frame the program must produce, built from the RFCs."""
    eth, inner = inp[:14], bytearray(inp[14:])
    if p.decrement_ttl:
        inner[7] -= 1                                   # hop limit; no checksum
    dst = outer_destination(p, ipaddress.IPv6Address(bytes(inner[24:40])))
    ecn = (inner[1] >> 4) & 3                           # low bits of the traffic class
    tos = 2 if ecn == 3 else ecn
    total = 20 + 8 + 8 + 14 + 40 + struct.unpack("!H", inner[4:6])[0]
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, 0, 0x4000, 64, 17, 0,
                        p.local_underlay.packed, dst.packed)
    outer = outer[:10] + struct.pack("!H", checksum(outer)) + outer[12:]
    udp = struct.pack("!HHHH", sport, p.udp_port, total - 20, 0)
    vxlan = struct.pack("!II", 0x08000000, p.vni << 8)
    inner_eth = bytes.fromhex(TUNNEL_MAC.replace(":", "")) + bytes.fromhex(SRC_MAC.replace(":", "")) + b"\x86\xdd"
    return eth[:12] + b"\x08\x00" + outer + udp + vxlan + inner_eth + bytes(inner)


def Loaded(p: FanDatapathParams) -> LoadedProgram:  # noqa: N802 (reads as the class it was)
    return LoadedProgram(p, build_encap_program, "t_fan6")


@pytest.fixture
def load():
    yield from loader(lambda layout="one word (/48 + 16)", **kw: Loaded(params(layout, **kw)))


def sport_of(out: bytes) -> int:
    return struct.unpack("!H", out[34:36])[0]


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("hook", list(Hook))
def test_verifier_accepts_and_bytes_match(load, layout, hook) -> None:
    prog = load(layout, hook=hook, overlay_mtu=1450 if hook is Hook.INGRESS else None)
    p = prog.params
    src, dst = p.local_slice6.network_address + 2, remote(p)
    inp = frame(ipv6(str(src), str(dst), b"u" * 48, hop_limit=64, traffic_class=0xB9))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert len(out.data) == len(inp) + ENCAP_OVERHEAD
    assert 32768 <= sport_of(out.data) <= 60999
    assert out.data == expected_encap6(p, inp, sport_of(out.data))
    assert prog.count(Counter.ENCAPSULATED) == 1
    # And without a counters map.
    fd = syscall.load_sched_cls(build_encap_program(p))
    os.close(fd)


@pytest.fixture(scope="module")
def programs():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    progs = {(layout, hook): Loaded(params(layout, hook=hook)) for layout in LAYOUTS for hook in Hook}
    yield progs
    for prog in progs.values():
        prog.close()


@pytest.mark.kernel
@needs_root
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.sampled_from(sorted(LAYOUTS)), hook=st.sampled_from(list(Hook)),
       where=st.sampled_from(["remote", "local", "overlay6", "anywhere"]), host=st.integers(0, (1 << 17) - 1),
       low=st.integers(0, (1 << 128) - 1), hops=st.integers(0, 255), tclass=st.integers(0, 255),
       size=st.integers(0, 1300), ext=st.sampled_from([(), ((HOP_BY_HOP, PADN4),), ((FRAGMENT, fragment_body()),),
                                                       ((DEST_OPTS, PADN4), (ROUTING, routing_body()))]))
def test_kernel_matches_the_model(programs, layout, hook, where, host, low, hops, tclass, size, ext) -> None:
    prog = programs[(layout, hook)]
    p = prog.params
    cbits = 128 - p.local_slice6.prefixlen
    if where == "anywhere":
        dst = ipaddress.IPv6Address(low)
    elif where == "local":
        dst = ipaddress.IPv6Address(int(p.local_slice6.network_address) | low & ((1 << cbits) - 1))
    else:
        if where == "remote":
            host = host & ((1 << p.host_bits) - 1)
        dst = ipaddress.IPv6Address(int(p.overlay6.network_address) | (host & ((1 << p.host_bits) - 1)) << cbits
                                    | low & ((1 << cbits) - 1))
    src = p.local_slice6.network_address + 2
    inp = frame(ipv6(str(src), str(dst), bytes(size), hop_limit=hops, traffic_class=tclass, extensions=ext))
    out = prog.run(inp)
    want = outer_destination(p, dst)
    punted = hook is Hook.INGRESS and (hops <= 1 or (ext and ext[0][0] == HOP_BY_HOP))
    event("passed or dropped" if want is None else "punted" if punted else "encapsulated")
    if want is None or punted:
        assert out.retval in ((TC_ACT_OK,) if want is not None else (TC_ACT_OK, TC_ACT_SHOT))
        assert out.data == inp
        return
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == expected_encap6(p, inp, sport_of(out.data))


SRC = "fd41:0:0:10a::9"    # in the local slice of 198.18.1.10
DST = "fd41:0:0:214::7"    # 198.18.2.20's


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("what, data, verdict, counter", [
    ("outside overlay6", frame(ipv6(SRC, "fd42::7")), TC_ACT_OK, Counter.PASSED),
    ("local slice", frame(ipv6(SRC, "fd41:0:0:10a::7")), TC_ACT_OK, Counter.PASSED),
    ("multicast (ND)", frame(ipv6("fe80::1", "ff02::1:ff00:7", next_header=58, hop_limit=255),
                             dst_mac=bytes.fromhex("3333ff000007")), TC_ACT_OK, Counter.PASSED),
    ("multicast to this host's MAC", frame(ipv6(SRC, "ff02::1")), TC_ACT_OK, Counter.PASSED),
    ("link-local", frame(ipv6("fe80::1", "fe80::2")), TC_ACT_OK, Counter.PASSED),
    ("not version 6", frame(b"\x45" + ipv6(SRC, DST)[1:]), TC_ACT_OK, Counter.PASSED),
    ("not for this host", frame(ipv6(SRC, DST), dst_mac=bytes.fromhex("020000000077")),
     TC_ACT_OK, Counter.PASSED),
    ("remote slice's first address", frame(ipv6(SRC, "fd41:0:0:214::")), TC_ACT_SHOT, Counter.DROPPED),
    ("remote slice's last address", frame(ipv6(SRC, "fd41:0:0:214:ffff:ffff:ffff:ffff")),
     TC_ACT_SHOT, Counter.DROPPED),
    ("underlay network's slice", frame(ipv6(SRC, "fd41::7")), TC_ACT_SHOT, Counter.DROPPED),
    ("underlay broadcast's slice", frame(ipv6(SRC, "fd41:0:0:ffff::7")), TC_ACT_SHOT, Counter.DROPPED),
    ("hop limit 1", frame(ipv6(SRC, DST, hop_limit=1)), TC_ACT_OK, Counter.PUNTED),
    ("hop limit 0", frame(ipv6(SRC, DST, hop_limit=0)), TC_ACT_OK, Counter.PUNTED),
    ("hop-by-hop header", frame(ipv6(SRC, DST, extensions=((HOP_BY_HOP, PADN4),))), TC_ACT_OK, Counter.PUNTED),
    ("source outside the slice", frame(ipv6("fd41:0:0:10b::9", DST)), TC_ACT_OK, Counter.PUNTED),
    ("link-local source", frame(ipv6("fe80::9", DST)), TC_ACT_OK, Counter.PUNTED),
    ("larger than the overlay MTU", frame(ipv6(SRC, DST, bytes(1411))), TC_ACT_OK, Counter.PUNTED),
])
def test_ingress_verdicts(load, what, data, verdict, counter) -> None:
    prog = load(overlay_mtu=1450)
    out = prog.run(data)
    assert out.retval == verdict, what
    assert out.data == data, "a packet not encapsulated is left untouched"
    assert prog.count(counter) == 1
    assert prog.count(Counter.ENCAPSULATED) == 0


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("hook, ext", [
    (Hook.INGRESS, ((FRAGMENT, fragment_body(offset=0, more=True)),)),
    (Hook.INGRESS, ((FRAGMENT, fragment_body(offset=185, more=False)),)),
    (Hook.INGRESS, ((DEST_OPTS, PADN4),)),
    (Hook.INGRESS, ((ROUTING, routing_body(segments_left=1)),)),
    (Hook.EGRESS, ((HOP_BY_HOP, PADN4), (FRAGMENT, fragment_body()))),
])
def test_extension_headers_are_mapped(load, hook, ext) -> None:
    # Only the fixed header's destination matters; the chain is not walked.
    prog = load(hook=hook)
    inp = frame(ipv6(SRC, DST, b"x" * 16, next_header=NO_NEXT, extensions=ext))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == expected_encap6(prog.params, inp, sport_of(out.data))


@pytest.mark.kernel
@needs_root
def test_full_size_packet_is_encapsulated(load) -> None:
    prog = load(overlay_mtu=1450)
    out = prog.run(frame(ipv6(SRC, DST, bytes(1410))))
    assert out.retval == TC_ACT_REDIRECT
    assert len(out.data) == 14 + 1450 + ENCAP_OVERHEAD


@pytest.mark.kernel
@needs_root
def test_large_gso_packet_is_not_punted(load) -> None:
    prog = load(overlay_mtu=1450)
    ctx = bytearray(192)
    struct.pack_into("=I", ctx, 176, 1400)      # __sk_buff.gso_size
    prog.run(frame(ipv6(SRC, DST, bytes(2800))), bytes(ctx))
    assert prog.count(Counter.PUNTED) == 0


@pytest.mark.kernel
@needs_root
def test_egress_keeps_hop_limit_and_any_source(load) -> None:
    prog = load(hook=Hook.EGRESS)
    inp = frame(ipv6("fd41:0:0:31e::3", DST, hop_limit=1), dst_mac=bytes.fromhex("02fa00000001"))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == expected_encap6(prog.params, inp, sport_of(out.data))
    assert out.data[14 + ENCAP_OVERHEAD + 7] == 1
    assert prog.count(Counter.ENCAPSULATED) == 1


@pytest.mark.kernel
@needs_root
def test_ecn_ce_becomes_ect0_outside(load) -> None:
    prog = load()
    out = prog.run(frame(ipv6(SRC, DST, traffic_class=0xB8 | 3)))
    assert out.data[15] == 2                     # outer TOS: ECT(0), no DSCP
    assert out.data[14 + ENCAP_OVERHEAD + 1] >> 4 == 0xB   # inner traffic class kept
