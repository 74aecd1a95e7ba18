"""The IPv6 branch of the Fan program: inner IPv6 over either underlay.

Pure. Dual-stack nodes: the node's IPv4 underlay address names its IPv6
slice too (``overlay6`` followed by the same host bits), so the owner of an
inner IPv6 destination is found from bits ``[overlay6.prefixlen,
overlay6.prefixlen + host_bits)`` of the 128-bit address, and the packet is
encapsulated exactly like IPv4 (outer IPv4/UDP/VXLAN). :mod:`.fanprog`
calls :func:`emit_ipv6` for frames with EtherType 0x86DD and shares its
encapsulation tail; this module only classifies and maps (docs/datapath.md,
"Inner IPv6"). IPv6-only clusters (:mod:`.fanprog_u6`) use the same branch
with an IPv6 underlay: the host field then fills the low bits of the outer
address's last 32-bit word (at most 32 host bits), the rest is constant.

The destination is the only field the mapping needs and it sits in the fixed
header, so packets with extension headers are mapped like any other. The one
exception is on the ingress hook, where the program stands in for the
kernel's forwarding: a hop-by-hop header is the one a router must look at
(router alert, jumbo payload), so those packets are punted to the kernel,
as IPv4 options are.
"""
from __future__ import annotations

import ipaddress

from .insn import FP, R3, R4, R6, R7, R8, R9, Assembler
from .vxlanencap import emit_outer_ecn, ne

__all__ = ["check_overlay6", "local_slice6", "outer_destination6", "host_bits_of",
           "emit_ipv6", "IPV6_HLEN", "ETH_P_IPV6"]

ETH_P_IPV6 = 0x86DD
IPV6_HLEN = 40
# Offsets in the IPv6 fixed header (RFC 8200).
OFF_PAYLOAD_LEN = 4
OFF_NEXT_HEADER = 6
OFF_HOP_LIMIT = 7
OFF_SRC = 8
OFF_DST = 24
NEXTHDR_HOP = 0
SKB_GSO_SIZE = 176
MAX_SLICE_PREFIXLEN6 = 120
# What an overlay6 must never cover: the program would map these.
_UNMAPPABLE = (
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped"),
    (ipaddress.IPv6Network("::/127"), "unspecified/loopback"),
)


def check_overlay6(overlay6: object, host_bits: int) -> ipaddress.IPv6Network:
    """``overlay6`` as a network, or ValueError saying why the program
    cannot serve it."""
    try:
        net = ipaddress.IPv6Network(overlay6)
    except ValueError as exc:
        raise ValueError(f"overlay6 {overlay6!r} is not an IPv6 network: {exc}") from None
    for bad, what in _UNMAPPABLE:
        if net.overlaps(bad):
            raise ValueError(f"overlay6 {net} overlaps {bad} ({what}): such "
                             "packets must pass the program untouched")
    if net.prefixlen + host_bits > MAX_SLICE_PREFIXLEN6:
        raise ValueError(
            f"overlay6 {net} with {host_bits} host bits gives "
            f"/{net.prefixlen + host_bits} slices; /{MAX_SLICE_PREFIXLEN6} "
            "is the longest")
    _host_field(net.prefixlen, host_bits)
    return net


def _host_field(prefixlen: int, host_bits: int) -> tuple[int, int]:
    """(first 32-bit word, bit offset in it) of the host field; refuses a
    field the program's 64-bit combine of two words cannot hold."""
    word, off = divmod(prefixlen, 32)
    if not 0 < host_bits <= 32 or off + host_bits > 64:
        raise ValueError(f"host field of {host_bits} bits at bit {prefixlen} "
                         "does not fit two adjacent 32-bit words")
    return word, off


Underlay = ipaddress.IPv4Network | ipaddress.IPv6Network
UnderlayAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_bits_of(underlay: Underlay) -> int:
    """Bits of an underlay address that name a host, in either family."""
    return underlay.max_prefixlen - underlay.prefixlen


def _has_edge_hosts(underlay: Underlay) -> bool:
    """Whether the underlay's first and last addresses are not hosts (a
    /31 or /32, a /127 or /128 has no such addresses to spare)."""
    return underlay.prefixlen <= underlay.max_prefixlen - 2


def local_slice6(overlay6: ipaddress.IPv6Network,
                 underlay: Underlay,
                 local_underlay: UnderlayAddress
                 ) -> ipaddress.IPv6Network:
    """This node's IPv6 slice: overlay6 then the underlay's host bits."""
    host_bits = host_bits_of(underlay)
    host = int(local_underlay) & int(underlay.hostmask)
    plen = overlay6.prefixlen + host_bits
    first = int(overlay6.network_address) | (host << (128 - plen))
    return ipaddress.IPv6Network((first, plen))


def outer_destination6(overlay6: ipaddress.IPv6Network,
                       local: ipaddress.IPv6Network,
                       underlay: Underlay,
                       inner_dst: ipaddress.IPv6Address
                       ) -> UnderlayAddress | None:
    """The model of :func:`emit_ipv6`: the underlay address an inner IPv6
    destination is sent to, or None (outside overlay6, the local slice, a
    slice's first or last address, or the underlay's network/broadcast)."""
    if inner_dst not in overlay6 or inner_dst in local:
        return None
    d = int(inner_dst)
    cbits = 128 - local.prefixlen
    cmask = (1 << cbits) - 1
    if d & cmask in (0, cmask):
        return None
    host_bits = host_bits_of(underlay)
    host = (d >> cbits) & ((1 << host_bits) - 1)
    if _has_edge_hosts(underlay) and host in (0, (1 << host_bits) - 1):
        return None
    return type(underlay.network_address)(int(underlay.network_address) | host)


def _word(net: ipaddress.IPv6Network, k: int) -> int:
    return (int(net.network_address) >> (96 - 32 * k)) & 0xFFFFFFFF


def _load(a: Assembler, reg: int, off: int) -> None:
    """``reg`` = the packet's 32-bit word at ``off``, in host order."""
    a.ldx("W", reg, R7, off)
    a.to_be(reg, 32)


def _emit_in_prefix(a: Assembler, off: int, net: ipaddress.IPv6Network,
                    miss: str) -> None:
    """Jump to ``miss`` unless the address at packet offset ``off`` is in
    ``net``: one compare per 32-bit word the prefix touches."""
    for k in range(4):
        bits = min(32, net.prefixlen - 32 * k)
        if bits <= 0:
            break
        _load(a, R3, off + 4 * k)
        if bits < 32:
            a.alu32_imm("AND", R3, ((1 << bits) - 1) << (32 - bits))
        a.jmp32_imm("JNE", R3, _word(net, k), miss)


def _emit_edges(a: Assembler, off: int, prefixlen: int, drop: str) -> None:
    """Jump to ``drop`` when the bits after ``prefixlen`` are all 0 or all 1
    (a slice's subnet-router anycast or all-ones address: never pods)."""
    masks = []
    for k in range(4):
        lo = max(prefixlen - 32 * k, 0)
        if lo < 32:
            masks.append((k, (1 << (32 - lo)) - 1))
    a.mov32_imm(R4, 0)
    for k, m in masks:
        _load(a, R3, off + 4 * k)
        a.alu32_imm("AND", R3, m)
        a.alu32_reg("OR", R4, R3)
    a.jmp32_imm("JEQ", R4, 0, drop)
    a.mov32_imm(R4, 0xFFFFFFFF)
    for k, m in masks:
        _load(a, R3, off + 4 * k)
        if m != 0xFFFFFFFF:
            a.alu32_imm("OR", R3, ~m & 0xFFFFFFFF)
        a.alu32_reg("AND", R4, R3)
    a.jmp32_imm("JEQ", R4, 0xFFFFFFFF, drop)


def _emit_host(a: Assembler, off: int, prefixlen: int, host_bits: int) -> None:
    """r9 = the host field: bits [prefixlen, prefixlen + host_bits) of the
    address at ``off``; two words are combined in 64 bits when it straddles."""
    word, bit = _host_field(prefixlen, host_bits)
    _load(a, R9, off + 4 * word)
    if bit + host_bits <= 32:
        if 32 - bit - host_bits:
            a.alu32_imm("RSH", R9, 32 - bit - host_bits)
    else:
        a.alu64_imm("LSH", R9, 32)
        _load(a, R3, off + 4 * word + 4)
        a.alu64_reg("OR", R9, R3)
        a.alu64_imm("RSH", R9, 64 - bit - host_bits)
    a.alu32_imm("AND", R9, (1 << host_bits) - 1)


def emit_ipv6(a: Assembler, *, overlay6: ipaddress.IPv6Network,
              local: ipaddress.IPv6Network, underlay: Underlay,
              eth_hlen: int, ingress: bool, decrement: bool,
              overlay_mtu: int | None, stack_tos: int, stack_proto: int
              ) -> None:
    """The branch for an Ethernet frame with EtherType 0x86DD.

    In: r6 ctx, r7 data, r8 data_end. Out, falling through to the shared
    encapsulation: r9 the outer destination's last 32-bit word in host
    order (all of an IPv4 one; an IPv6 one's other words are constants the
    tail writes), r8 the inner packet's length, the outer ECN bits and the
    inner EtherType on the stack.
    Exits through the labels ``pass``, ``drop`` and (ingress) ``punt``.
    """
    ip = eth_hlen
    dst = ip + OFF_DST
    host_bits = host_bits_of(underlay)
    a.mov64_reg(R3, R7)
    a.alu64_imm("ADD", R3, ip + IPV6_HLEN)
    a.jmp_reg("JGT", R3, R8, "pass")
    a.ldx("B", R3, R7, ip)
    a.alu32_imm("AND", R3, 0xF0)
    a.jmp32_imm("JNE", R3, 0x60, "pass")
    _emit_in_prefix(a, dst, overlay6, "pass")
    _emit_in_prefix(a, dst, local, "remote6")
    a.ja("pass")
    a.label("remote6")
    _emit_edges(a, dst, local.prefixlen, "drop")
    if ingress:
        a.ldx("B", R3, R7, ip + OFF_NEXT_HEADER)
        a.jmp32_imm("JEQ", R3, NEXTHDR_HOP, "punt")
        _emit_in_prefix(a, ip + OFF_SRC, local, "punt")
        a.ldx("B", R3, R7, ip + OFF_HOP_LIMIT)
        a.jmp32_imm("JLE", R3, 1, "punt")
    _emit_host(a, dst, overlay6.prefixlen, host_bits)
    if _has_edge_hosts(underlay):
        a.jmp32_imm("JEQ", R9, 0, "drop")
        a.jmp32_imm("JEQ", R9, (1 << host_bits) - 1, "drop")
    a.alu32_imm("OR", R9, int(underlay.network_address) & 0xFFFFFFFF)
    a.ldx("H", R8, R7, ip + OFF_PAYLOAD_LEN)
    a.to_be(R8, 16)
    a.alu64_imm("ADD", R8, IPV6_HLEN)
    if ingress and overlay_mtu is not None:
        a.jmp_imm("JLE", R8, overlay_mtu, "size6_ok")
        a.ldx("W", R3, R6, SKB_GSO_SIZE)
        a.jmp32_imm("JEQ", R3, 0, "punt")
        a.label("size6_ok")
    if decrement:
        # No header checksum in IPv6: only the hop limit changes.
        a.ldx("B", R3, R7, ip + OFF_HOP_LIMIT)
        a.alu32_imm("SUB", R3, 1)
        a.stx("B", R7, ip + OFF_HOP_LIMIT, R3)
    # ECN: the low two bits of the traffic class, bits 4-5 of byte 1.
    emit_outer_ecn(a, byte_off=ip + 1, shift=4, stack_tos=stack_tos, label="ecn6_ok")
    a.st_imm("H", FP, stack_proto, ne(ETH_P_IPV6, 2))

