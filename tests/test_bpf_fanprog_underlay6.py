"""The Fan program for IPv6-only clusters: inner IPv6 over an IPv6 underlay.

Pure: the outer header's layout constants and flags, the model of the
reverse map against hand-worked examples and against FanMap (the other
implementation), the refusals, the program assembles. In the kernel
(BPF_PROG_TEST_RUN): the encapsulation rebuilt independently from RFC 8200
/ 768 / 7348 and compared byte for byte (property test over host-field
layouts, destinations, hop limits and traffic classes), and every verdict
with its counter, inner IPv4 included.
"""
from __future__ import annotations

import ipaddress
import os
import struct

import netaddr
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni_fan.bpf.fanprog import ENCAP_OVERHEAD, Counter, Hook
from cni_fan.bpf.fanprog_u6 import (ENCAP_OVERHEAD6, Underlay6DatapathParams, build_underlay6_program,
                                    outer_destination_u6, overlay_mtu6)
from cni_fan.bpf.vxlanencap6 import ADJ_ROOM_FLAGS6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
from harness.frames import HOP_BY_HOP, PADN4, ipv4_udp, ipv6
from harness.fanprogs import LoadedProgram, loader

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TUNNEL_MAC = "02:fa:00:00:00:01"
SRC_MAC = "02:fa:00:00:00:02"
POD_MAC = bytes.fromhex("0200000000aa")
HOST_DST = bytes(6)   # the test run's loopback: frames to it are PACKET_HOST
OUTER = 14 + ENCAP_OVERHEAD6   # where the inner IPv6 header starts in the output

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# (overlay6, IPv6 underlay, local underlay address).
LAYOUTS = {
    "the issue's (/48 + 16)": ("fd50::/48", "fd00:198:18::/112", "fd00:198:18::a"),
    "24 host bits (/40 + 24)": ("fd40::/40", "fd00:198:18::ab00:0/104", "fd00:198:18::ab00:a"),
    "words 1-2 (/56 + 16)": ("fd50::/56", "fd00:198:18::/112", "fd00:198:18::a"),
    "32 host bits (/32 + 32)": ("fd60::/32", "fd00:198:18::/96", "fd00:198:18::a0b:c0d"),
    "short slice (/96 + 8)": ("fd50::/96", "fd00:198:18::/120", "fd00:198:18::a"),
}


def params(layout: str = "the issue's (/48 + 16)", **kw) -> Underlay6DatapathParams:
    overlay6, underlay, host = LAYOUTS[layout]
    base = dict(overlay6=overlay6, underlay=underlay, local_underlay=host, underlay_ifindex=2,
                vni=0xF1, tunnel_mac=TUNNEL_MAC, inner_src_mac=SRC_MAC)
    base.update(kw)
    return Underlay6DatapathParams(**base)


# -- pure -------------------------------------------------------------------

def test_header_layout_constants() -> None:
    assert ENCAP_OVERHEAD6 == 40 + 8 + 8 + 14 == 70
    assert ENCAP_OVERHEAD == 50          # the IPv4 underlay's, unchanged
    assert overlay_mtu6(1500) == 1430
    assert BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 == 1 << 2     # include/uapi/linux/bpf.h
    # FIXED_GSO | ENCAP_L3_IPV6 | ENCAP_L4_UDP | ENCAP_L2_ETH | ENCAP_L2(14)
    assert ADJ_ROOM_FLAGS6 == 1 | 4 | 16 | 64 | 14 << 56


def test_the_issues_worked_example() -> None:
    p = params()
    assert str(p.local_slice6) == "fd50:0:0:a::/64"
    assert outer_destination_u6(p, "fd50:0:0:1c::5") == ipaddress.IPv6Address("fd00:198:18::1c")
    assert outer_destination_u6(p, "fd50:0:0:ffe::1:2") == ipaddress.IPv6Address("fd00:198:18::ffe")
    assert outer_destination_u6(p, "fd50:0:0:a::5") is None                 # local slice
    assert outer_destination_u6(p, "fd50:0:0:1c::") is None                 # slice's first
    assert outer_destination_u6(p, "fd50:0:0:1c:ffff:ffff:ffff:ffff") is None   # and last
    assert outer_destination_u6(p, "fd50::5") is None                       # underlay's first
    assert outer_destination_u6(p, "fd50:0:0:ffff::5") is None              # and last
    assert outer_destination_u6(p, "fd51::5") is None                       # outside overlay6
    assert outer_destination_u6(p, "ff02::1") is None
    assert outer_destination_u6(p, "241.0.28.5") is None                    # inner IPv4: not ours
    # The node the issue names owns the slice the issue names.
    assert str(params(local_underlay="fd00:198:18::1c").local_slice6) == "fd50:0:0:1c::/64"


def test_constant_underlay_bits_beside_the_host_field() -> None:
    # A /104 underlay whose last word has fixed bits (ab) above the host's 24.
    p = params("24 host bits (/40 + 24)")
    assert str(p.local_slice6) == "fd40:0:0:a::/64"
    assert outer_destination_u6(p, "fd40:0:12:3456::5") == ipaddress.IPv6Address("fd00:198:18::ab12:3456")
    assert p.destination_prefix == (0xFD000198, 0x00180000, 0)
    # 32 host bits: the whole last word is computed.
    p = params("32 host bits (/32 + 32)")
    assert outer_destination_u6(p, "fd60:0:dead:beef::5") == ipaddress.IPv6Address("fd00:198:18::dead:beef")


@settings(max_examples=300)
@given(layout=st.sampled_from(sorted(LAYOUTS)), host=st.integers(0, (1 << 32) - 1),
       low=st.integers(0, (1 << 128) - 1), anywhere=st.booleans())
def test_model_agrees_with_fanmap(layout, host, low, anywhere) -> None:
    from cni_fan.fanmap import FanMap, FanMapError   # the other implementation
    overlay6, underlay, local = LAYOUTS[layout]
    p = params(layout)
    fan = FanMap.parse(overlay6, underlay)
    assert str(fan.slice_for(netaddr.IPAddress(local))) == str(p.local_slice6)
    cbits = 128 - p.local_slice6.prefixlen
    host &= (1 << p.host_bits) - 1
    inner = ipaddress.IPv6Address(low if anywhere else int(p.overlay6.network_address)
                                  | host << cbits | low & ((1 << cbits) - 1))
    got = outer_destination_u6(p, inner)
    try:
        want = ipaddress.IPv6Address(str(fan.underlay_host_for(str(inner))))
    except FanMapError:
        want = None
    edge = int(inner) & ((1 << cbits) - 1) in (0, (1 << cbits) - 1)
    if want is None or inner in p.local_slice6 or edge:
        assert got is None
    else:
        assert got == want


@pytest.mark.parametrize("change, match", [
    (dict(underlay="fd00:198:18::/64", local_underlay="fd00:198:18::a"), "64 host bits"),
    (dict(underlay="fd00:198:18::/95", local_underlay="fd00:198:18::a"), "33 host bits"),
    (dict(underlay="fd00:198:18::/127", local_underlay="fd00:198:18::1"), "single address"),
    (dict(underlay="198.18.0.0/16", local_underlay="198.18.0.10"), "not an IPv6 network"),
    (dict(local_underlay="198.18.0.10"), "not an IPv6 address"),
    (dict(local_underlay="fd00:198:19::a"), "is not in"),
    (dict(local_underlay="fd00:198:18::"), "not a host address"),
    (dict(local_underlay="fd00:198:18::ffff"), "not a host address"),
    (dict(overlay6="fd50::/112"), "/128 slices"),          # overlay6 too long
    (dict(overlay6="fd50::/105"), "/121 slices"),
    (dict(overlay6="fd00::/8"), "overlaps the underlay"),
    (dict(overlay6="ff00::/8"), "multicast"),
    (dict(overlay6="241.0.0.0/8"), "IPv6"),
    (dict(hook=Hook.EGRESS, decrement_ttl=True), "ingress"),
    (dict(overlay_mtu=1279), "1280"),
    (dict(vni=1 << 24), "VNI"),
    (dict(inner_src_mac=TUNNEL_MAC), "must differ"),
])
def test_refusals(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        params(**change)


@given(layout=st.sampled_from(sorted(LAYOUTS)), hook=st.sampled_from(list(Hook)),
       counters=st.booleans(), onlink=st.booleans())
def test_program_assembles_for_every_layout(layout, hook, counters, onlink) -> None:
    p = params(layout, hook=hook, onlink_underlay=onlink, overlay_mtu=1430 if hook is Hook.INGRESS else None)
    code = build_underlay6_program(p, 5 if counters else None)
    assert len(code) % 8 == 0 and len(code) < 500 * 8


# -- in the kernel ----------------------------------------------------------

def frame(ip: bytes, dst_mac: bytes = HOST_DST, ethertype: bytes = b"\x86\xdd") -> bytes:
    return dst_mac + POD_MAC + ethertype + ip


def outer_fields(out: bytes) -> tuple[int, int]:
    """(UDP source port, flow label) the program chose: both from the skb
    hash, which the test cannot know in advance."""
    return struct.unpack("!H", out[54:56])[0], struct.unpack("!I", out[14:18])[0] & 0xFFFFF


def expected_encap(p: Underlay6DatapathParams, inp: bytes, sport: int, label: int) -> bytes:
    """The frame the program must produce, built from the RFCs."""
    eth, inner = inp[:14], bytearray(inp[14:])
    if p.decrement_ttl:
        inner[7] -= 1                                   # hop limit
    dst = outer_destination_u6(p, ipaddress.IPv6Address(bytes(inner[24:40])))
    ecn = (inner[1] >> 4) & 3
    tclass = 2 if ecn == 3 else ecn                     # CE -> ECT(0) (RFC 6040)
    length = 8 + 8 + 14 + len(inner)                    # UDP + VXLAN + inner Ethernet + inner IPv6
    outer = struct.pack("!IHBB16s16s", 6 << 28 | tclass << 20 | label, length, 17, 64,
                        p.local_underlay.packed, dst.packed)
    udp = struct.pack("!HHHH", sport, p.udp_port, length, 0)   # zero checksum (RFC 6935)
    vxlan = struct.pack("!II", 0x08000000, p.vni << 8)
    inner_eth = bytes.fromhex(TUNNEL_MAC.replace(":", "") + SRC_MAC.replace(":", "")) + b"\x86\xdd"
    return eth[:12] + b"\x86\xdd" + outer + udp + vxlan + inner_eth + bytes(inner)


def Loaded(p: Underlay6DatapathParams) -> LoadedProgram:  # noqa: N802 (reads as the class it was)
    return LoadedProgram(p, build_underlay6_program, "t_fan_u6")


@pytest.fixture
def load():
    yield from loader(lambda layout="the issue's (/48 + 16)", **kw: Loaded(params(layout, **kw)))


SRC = "fd50:0:0:a::9"     # in the local slice of fd00:198:18::a
DST = "fd50:0:0:1c::5"    # fd00:198:18::1c's


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("hook", list(Hook))
@pytest.mark.parametrize("onlink", [False, True])
def test_verifier_accepts_and_bytes_match(load, layout, hook, onlink) -> None:
    prog = load(layout, hook=hook, onlink_underlay=onlink, overlay_mtu=1430 if hook is Hook.INGRESS else None)
    p = prog.params
    s = p.local_slice6
    dst = ipaddress.IPv6Address(int(s.network_address) + 3 * s.num_addresses + 7)   # three hosts on
    inp = frame(ipv6(str(s.network_address + 2), str(dst), b"u" * 48, traffic_class=0xB9))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert len(out.data) == len(inp) + ENCAP_OVERHEAD6
    sport, label = outer_fields(out.data)
    assert 32768 <= sport <= 60999
    assert out.data == expected_encap(p, inp, sport, label)
    assert prog.count(Counter.ENCAPSULATED) == 1


@pytest.mark.kernel
@needs_root
def test_outer_header_fields_one_by_one(load) -> None:
    # The same facts as the byte comparison, named: what the wire shows.
    prog = load(hook=Hook.EGRESS)
    out = prog.run(frame(ipv6(SRC, DST, b"x" * 100))).data
    assert out[12:14] == b"\x86\xdd"                       # outer EtherType
    assert out[14] >> 4 == 6 and out[20] == 17 and out[21] == 64
    assert out[22:38] == ipaddress.IPv6Address("fd00:198:18::a").packed
    assert out[38:54] == ipaddress.IPv6Address("fd00:198:18::1c").packed
    assert struct.unpack("!HHH", out[56:62]) == (4789, 8 + 8 + 14 + 140, 0)   # port, length, checksum 0
    assert struct.unpack("!H", out[18:20])[0] == 8 + 8 + 14 + 140              # payload length
    assert out[62:70] == struct.pack("!II", 0x08000000, 0xF1 << 8)             # VXLAN, VNI


@pytest.mark.kernel
@needs_root
def test_flow_label_and_source_port_follow_the_flow(load) -> None:
    prog = load(hook=Hook.EGRESS)

    def fields(sport: int) -> tuple[int, int]:
        udp = struct.pack("!HHHH", sport, 80, 8, 0)
        return outer_fields(prog.run(frame(ipv6(SRC, DST, udp))).data)

    assert fields(1000) == fields(1000)                  # one flow, one label, one port
    seen = {fields(port) for port in range(1000, 1032)}
    assert len(seen) > 16                                # flows spread
    # All 20 bits of the label are used (1 in 16^32 to fail by chance).
    assert any(label >> 16 for _, label in seen)


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
       where=st.sampled_from(["remote", "local", "overlay6", "anywhere"]), host=st.integers(0, (1 << 32) - 1),
       low=st.integers(0, (1 << 128) - 1), hops=st.integers(0, 255), tclass=st.integers(0, 255),
       size=st.integers(0, 1300))
def test_kernel_matches_the_model(programs, layout, hook, where, host, low, hops, tclass, size) -> None:
    prog = programs[(layout, hook)]
    p = prog.params
    cbits = 128 - p.local_slice6.prefixlen
    if where == "anywhere":
        dst = ipaddress.IPv6Address(low)
    elif where == "local":
        dst = ipaddress.IPv6Address(int(p.local_slice6.network_address) | low & ((1 << cbits) - 1))
    else:
        dst = ipaddress.IPv6Address(int(p.overlay6.network_address) | (host & ((1 << p.host_bits) - 1)) << cbits
                                    | low & ((1 << cbits) - 1))
    inp = frame(ipv6(str(p.local_slice6.network_address + 2), str(dst), bytes(size), hop_limit=hops,
                     traffic_class=tclass))
    out = prog.run(inp)
    want = outer_destination_u6(p, dst)
    punted = hook is Hook.INGRESS and hops <= 1
    event("passed or dropped" if want is None else "punted" if punted else "encapsulated")
    if want is None or punted:
        assert out.retval in ((TC_ACT_OK,) if want is not None else (TC_ACT_OK, TC_ACT_SHOT))
        assert out.data == inp
        return
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == expected_encap(p, inp, *outer_fields(out.data))


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("what, data, verdict, counter", [
    ("inner IPv4 (no IPv4 overlay here)", frame(ipv4_udp("241.0.10.9", "241.0.28.5", b"x"), ethertype=b"\x08\x00"),
     TC_ACT_OK, Counter.PASSED),
    ("inner IPv4 to the underlay", frame(ipv4_udp("198.18.0.10", "198.18.0.28", b"x"), ethertype=b"\x08\x00"),
     TC_ACT_OK, Counter.PASSED),
    ("outside overlay6", frame(ipv6(SRC, "fd51::7")), TC_ACT_OK, Counter.PASSED),
    ("the underlay itself", frame(ipv6("fd00:198:18::a", "fd00:198:18::1c")), TC_ACT_OK, Counter.PASSED),
    ("local slice", frame(ipv6(SRC, "fd50:0:0:a::7")), TC_ACT_OK, Counter.PASSED),
    ("link-local", frame(ipv6("fe80::1", "fe80::2")), TC_ACT_OK, Counter.PASSED),
    ("not for this host", frame(ipv6(SRC, DST), dst_mac=bytes.fromhex("020000000077")), TC_ACT_OK, Counter.PASSED),
    ("remote slice's first address", frame(ipv6(SRC, "fd50:0:0:1c::")), TC_ACT_SHOT, Counter.DROPPED),
    ("underlay's first host", frame(ipv6(SRC, "fd50::7")), TC_ACT_SHOT, Counter.DROPPED),
    ("underlay's last host", frame(ipv6(SRC, "fd50:0:0:ffff::7")), TC_ACT_SHOT, Counter.DROPPED),
    ("hop limit 1", frame(ipv6(SRC, DST, hop_limit=1)), TC_ACT_OK, Counter.PUNTED),
    ("hop-by-hop header", frame(ipv6(SRC, DST, extensions=((HOP_BY_HOP, PADN4),))), TC_ACT_OK, Counter.PUNTED),
    ("source outside the slice", frame(ipv6("fd50:0:0:b::9", DST)), TC_ACT_OK, Counter.PUNTED),
    ("larger than the overlay MTU", frame(ipv6(SRC, DST, bytes(1391))), TC_ACT_OK, Counter.PUNTED),
])
def test_ingress_verdicts(load, what, data, verdict, counter) -> None:
    prog = load(overlay_mtu=1430)
    out = prog.run(data)
    assert out.retval == verdict, what
    assert out.data == data, "a packet not encapsulated is left untouched"
    assert prog.count(counter) == 1
    assert prog.count(Counter.ENCAPSULATED) == 0


@pytest.mark.kernel
@needs_root
def test_full_size_packet_is_encapsulated(load) -> None:
    prog = load(overlay_mtu=1430)
    out = prog.run(frame(ipv6(SRC, DST, bytes(1390))))
    assert out.retval == TC_ACT_REDIRECT
    assert len(out.data) == 14 + 1500


@pytest.mark.kernel
@needs_root
def test_egress_keeps_hop_limit_and_any_source(load) -> None:
    prog = load(hook=Hook.EGRESS)
    inp = frame(ipv6("fd50:0:0:3e::3", DST, hop_limit=1), dst_mac=bytes.fromhex("02fa00000001"))
    out = prog.run(inp)
    assert out.retval == TC_ACT_REDIRECT
    assert out.data == expected_encap(prog.params, inp, *outer_fields(out.data))
    assert out.data[OUTER + 7] == 1
