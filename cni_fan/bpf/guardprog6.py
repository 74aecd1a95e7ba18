"""The IPv6 part of the port guard's program: pure, emitted into guardprog's assembler.

What a dual-stack pod may send as IPv6 (docs/portguard.md, "IPv6"): its own
address as source, or, for neighbour discovery and MLD only, the
unspecified address (DAD) or a link-local one; never a router
advertisement, redirect, MLD query or DHCPv6 server message; never an
extension header (an RA hidden behind one is what RFC 7113 warns about;
the program does not walk them, so it refuses them all), but for the one
form MLD reports must take: a single 8-byte hop-by-hop header (Router
Alert) in front of the report. Neighbour
solicitations and advertisements may only carry the pod's own MAC as
link-layer address option, and an advertisement may only claim the pod's
own address or a link-local one (the IPv6 form of the ARP rule).
"""
from __future__ import annotations

import sys

from cni_fan.bpf.insn import R0, R2, R3, R4, R5, Assembler

ETH_P_IPV6 = 0x86DD
IPPROTO_UDP, IPPROTO_ICMPV6 = 17, 58
# Next-header values that are extension headers (RFC 8200 4, IANA "IPv6 Extension Header Types"),
# ESP (50) excepted: what follows it is encrypted, not a message the receiver's stack parses.
HOP_BY_HOP = 0
EXTENSION_HEADERS = (HOP_BY_HOP, 43, 44, 51, 60, 135, 139, 140, 253, 254)
ICMP6_RS, ICMP6_RA, ICMP6_NS, ICMP6_NA, ICMP6_REDIRECT = 133, 134, 135, 136, 137
MLD_QUERY, MLD_REPORT, MLD_DONE, MLD2_REPORT = 130, 131, 132, 143
DHCP6_SERVER_PORT = 547
# ICMPv6 types a pod may send from :: (DAD, RFC 3590 MLD) and from a link-local source.
MLD_REPORTS = (MLD_REPORT, MLD_DONE, MLD2_REPORT)
FROM_UNSPECIFIED = (ICMP6_RS, ICMP6_NS, MLD_REPORT, MLD_DONE, MLD2_REPORT)
FROM_LINK_LOCAL = (ICMP6_RS, ICMP6_NS, ICMP6_NA, MLD_REPORT, MLD_DONE, MLD2_REPORT)
# Never from a pod, whatever the source: router-only messages (RA guard) and MLD queries
# (a querying pod could win the querier election that the bridge's snooping relies on).
REFUSED_ICMP6 = (ICMP6_RA, ICMP6_REDIRECT, MLD_QUERY)

L3 = 14                  # IPv6 header after the Ethernet header
PAYLOAD_LEN, NEXT_HEADER, SOURCE = L3 + 4, L3 + 6, L3 + 8
L4 = L3 + 40             # no extension headers: the upper-layer header is here
ND_TARGET, ND_OPTION = L4 + 8, L4 + 24


def _native(raw: bytes) -> int:
    return int.from_bytes(raw, sys.byteorder)  # packet loads are in host order


def _bounds(asm: Assembler, end: int) -> None:
    asm.mov64_reg(R4, R2)
    asm.alu64_imm("ADD", R4, end)
    asm.jmp_reg("JGT", R4, R3, "drop")


def _address_is(asm: Assembler, at: int, a6: bytes, otherwise: str) -> None:
    """Fall through when the 16 bytes at `at` are `a6`, else jump to `otherwise`."""
    for i in range(4):
        asm.ldx("W", R0, R2, at + 4 * i)
        asm.jmp32_imm("JNE", R0, _native(a6[4 * i:4 * i + 4]), otherwise)


def _link_local(asm: Assembler, at: int, otherwise: str) -> None:
    """Fall through when the address at `at` is in fe80::/64."""
    asm.ldx("W", R0, R2, at)
    asm.jmp32_imm("JNE", R0, _native(bytes([0xFE, 0x80, 0, 0])), otherwise)
    asm.ldx("W", R0, R2, at + 4)
    asm.jmp32_imm("JNE", R0, 0, otherwise)


def _icmp_type_in(asm: Assembler, allowed: tuple[int, ...], then: str) -> None:
    """R0 = the ICMPv6 type; jump to `then` when it is in `allowed`, else drop."""
    _bounds(asm, L4 + 4)
    asm.ldx("B", R0, R2, L4)
    for kind in allowed:
        asm.jmp32_imm("JEQ", R0, kind, then)
    asm.ja("drop")


def _lladdr_option(asm: Assembler, m: bytes, option: int, label: str) -> None:
    """Pass an NS/NA with no option, or with exactly one link-layer address option that is the pod's MAC."""
    asm.label(label)
    asm.ldx("H", R0, R2, PAYLOAD_LEN)
    asm.to_be(R0, 16)
    asm.jmp32_imm("JEQ", R0, 24, "pass")
    asm.jmp32_imm("JNE", R0, 32, "drop")
    _bounds(asm, ND_OPTION + 8)
    asm.ldx("H", R0, R2, ND_OPTION)                # type, length (in units of 8 bytes)
    asm.jmp32_imm("JNE", R0, _native(bytes([option, 1])), "drop")
    asm.ldx("W", R0, R2, ND_OPTION + 2)
    asm.jmp32_imm("JNE", R0, _native(m[0:4]), "drop")
    asm.ldx("H", R0, R2, ND_OPTION + 6)
    asm.jmp32_imm("JNE", R0, _native(m[4:6]), "drop")
    asm.ja("pass")


def emit_ipv6(asm: Assembler, m: bytes, a6: bytes) -> None:
    """The block at label "ipv6" (R2 = data, R3 = data_end, Ethernet source already checked).

    Ends in the caller's "pass" and "drop" labels.
    """
    asm.label("ipv6")
    _bounds(asm, L4)
    asm.ldx("B", R0, R2, L3)
    asm.alu32_imm("AND", R0, 0xF0)
    asm.jmp32_imm("JNE", R0, 0x60, "drop")
    asm.ldx("B", R5, R2, NEXT_HEADER)
    asm.jmp32_imm("JEQ", R5, HOP_BY_HOP, "v6_hop_by_hop")
    _address_is(asm, SOURCE, a6, "v6_not_own")
    for header in EXTENSION_HEADERS:
        asm.jmp32_imm("JEQ", R5, header, "drop")
    asm.jmp32_imm("JEQ", R5, IPPROTO_ICMPV6, "v6_own_icmp")
    asm.jmp32_imm("JNE", R5, IPPROTO_UDP, "pass")
    _bounds(asm, L4 + 8)
    asm.ldx("H", R0, R2, L4)                      # UDP source port
    asm.jmp32_imm("JEQ", R0, _native(DHCP6_SERVER_PORT.to_bytes(2, "big")), "drop")
    asm.ja("pass")

    asm.label("v6_own_icmp")
    _bounds(asm, L4 + 4)
    asm.ldx("B", R0, R2, L4)
    for kind in REFUSED_ICMP6:
        asm.jmp32_imm("JEQ", R0, kind, "drop")
    asm.ja("v6_nd")

    asm.label("v6_not_own")                        # :: or fe80::/64, and then ICMPv6 only
    asm.jmp32_imm("JNE", R5, IPPROTO_ICMPV6, "drop")
    _link_local(asm, SOURCE, "v6_unspecified")
    _icmp_type_in(asm, FROM_LINK_LOCAL, "v6_nd")
    asm.label("v6_unspecified")
    _address_is(asm, SOURCE, bytes(16), "drop")
    _icmp_type_in(asm, FROM_UNSPECIFIED, "v6_nd")

    asm.label("v6_hop_by_hop")                     # only an MLD report behind 8 bytes of options
    _bounds(asm, L4 + 8 + 4)
    asm.ldx("H", R0, R2, L4)                      # next header, header extension length
    asm.jmp32_imm("JNE", R0, _native(bytes([IPPROTO_ICMPV6, 0])), "drop")
    asm.ldx("B", R0, R2, L4 + 8)
    for kind in MLD_REPORTS:
        asm.jmp32_imm("JEQ", R0, kind, "v6_report")
    asm.ja("drop")
    asm.label("v6_report")                         # from the pod's address, :: or fe80::/64
    _address_is(asm, SOURCE, a6, "v6_report_not_own")
    asm.ja("pass")
    asm.label("v6_report_not_own")
    _link_local(asm, SOURCE, "v6_report_unspecified")
    asm.ja("pass")
    asm.label("v6_report_unspecified")
    _address_is(asm, SOURCE, bytes(16), "drop")
    asm.ja("pass")

    asm.label("v6_nd")                             # R0 = an allowed ICMPv6 type
    asm.jmp32_imm("JEQ", R0, ICMP6_NS, "v6_ns")
    asm.jmp32_imm("JNE", R0, ICMP6_NA, "pass")
    _bounds(asm, ND_OPTION)
    _address_is(asm, ND_TARGET, a6, "v6_na_link_local")
    asm.ja("v6_na")
    asm.label("v6_na_link_local")
    _link_local(asm, ND_TARGET, "drop")
    asm.ja("v6_na")
    _lladdr_option(asm, m, 1, "v6_ns")             # source link-layer address
    _lladdr_option(asm, m, 2, "v6_na")             # target link-layer address
