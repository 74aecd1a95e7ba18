"""The encapsulation tail for an IPv6 underlay: outer IPv6 / UDP / VXLAN.

Pure. The IPv6-only cluster's program (:mod:`.fanprog_u6`) jumps here once
the outer destination is known, as :mod:`.fanprog` does to
:mod:`.vxlanencap` for the IPv4 underlay; the VXLAN header, the inner
Ethernet header and the UDP source port are the same in both.

Choices (docs/datapath.md, "Outer IPv6"):

- UDP checksum 0. RFC 6935/6936 allow it for tunnel protocols when the
  receiver is configured to accept it; both ends are our own VXLAN devices
  (``udp6zerocsumrx`` on the receiving one). A real checksum would cover
  the whole inner packet, which the program cannot sum for GSO packets, and
  the kernel's segmentation of an adjust_room UDP tunnel (SKB_GSO_UDP_TUNNEL
  without _CSUM) writes zero outer checksums anyway.
- Flow label from the same skb hash as the UDP source port (RFC 6438: a
  tunnel endpoint should label per inner flow), so a router spreading on
  the IPv6 header alone keeps one flow on one path and spreads the rest.
- Traffic class: the inner ECN bits only (CE becomes ECT(0)), as the IPv4
  tail does with the TOS.

In: r6 ctx, r8 the inner packet's length, r9 the last 32-bit word of the
outer destination (host order; the other three are constants), the outer
ECN bits and the inner EtherType in their stack slots. Out: r7 the return
value of ``bpf_redirect_neigh``; jumps to ``drop`` when a helper fails.
"""
from __future__ import annotations

import ipaddress

from .insn import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Assembler
from .nexthop import emit_nexthop_args
from .vxlanencap import (BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
                         BPF_F_ADJ_ROOM_FIXED_GSO, ETH_HLEN, HELPER_GET_HASH_RECALC, HELPER_REDIRECT_NEIGH, OUTER_TTL,
                         STACK_TOS, emit_grow, emit_source_port, emit_vxlan_and_inner_eth, ne)

__all__ = ["ENCAP_OVERHEAD6", "ADJ_ROOM_FLAGS6", "BPF_F_ADJ_ROOM_ENCAP_L3_IPV6", "emit_vxlan_encap6",
           "overlay_mtu6"]

# include/uapi/linux/bpf.h, enum of bpf_skb_adjust_room flags.
BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 = 1 << 2
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
IPV6_HLEN = 40
UDP_HLEN = 8
VXLAN_HLEN = 8
ENCAP_OVERHEAD6 = IPV6_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN   # 70
ADJ_ROOM_FLAGS6 = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
                   | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
                   | (ETH_HLEN << BPF_ADJ_ROOM_ENCAP_L2_SHIFT))
FLOW_LABEL_MASK = 0xFFFFF
# Offsets in the outer IPv6 header (RFC 8200).
OFF_PAYLOAD_LEN = 4
OFF_NEXT_HEADER = 6
OFF_HOP_LIMIT = 7
OFF_SRC = 8
OFF_DST = 24
STACK_WORD0 = -56     # u64: the outer header's first word (version, class, label)


def overlay_mtu6(underlay_mtu: int) -> int:
    """The pods' MTU over an IPv6 underlay: every encapsulated packet of
    that size still fits the underlay."""
    return underlay_mtu - ENCAP_OVERHEAD6


def address_words(address: ipaddress.IPv6Address) -> tuple[int, int, int, int]:
    """The four 32-bit words of an IPv6 address, first to last."""
    n = int(address)
    return (n >> 96, n >> 64 & 0xFFFFFFFF, n >> 32 & 0xFFFFFFFF, n & 0xFFFFFFFF)


def _store_destination(a: Assembler, base: int, off: int, prefix_words: tuple[int, int, int]) -> None:
    """The outer destination at ``base + off``: three constant words, then
    r9. Clobbers r0."""
    for k, word in enumerate(prefix_words):
        a.st_imm("W", base, off + 4 * k, ne(word, 4))
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.stx("W", base, off + 12, R0)


def emit_vxlan_encap6(a: Assembler, *, local_underlay: ipaddress.IPv6Address,
                      destination_prefix: tuple[int, int, int], udp_port: int, vni: int,
                      tunnel_mac: bytes, inner_src_mac: bytes, underlay_ifindex: int, onlink: bool) -> None:
    """Grow the packet, write outer IPv6/UDP/VXLAN/inner Ethernet, redirect.

    ``destination_prefix``: the outer destination's first three words (the
    underlay network's; the host field is all in the fourth, r9).
    """
    a.mov64_reg(R1, R6)
    a.call(HELPER_GET_HASH_RECALC)
    # First word: version 6, traffic class = the ECN bits, flow label =
    # the hash's low 20 bits; kept on the stack across the helper calls.
    a.mov32_reg(R1, R0)
    a.alu32_imm("AND", R1, FLOW_LABEL_MASK)
    a.ldx("DW", R3, FP, STACK_TOS)
    a.alu32_imm("LSH", R3, 20)
    a.alu32_reg("OR", R1, R3)
    a.alu32_imm("OR", R1, 6 << 28)
    a.stx("DW", FP, STACK_WORD0, R1)
    emit_source_port(a)

    emit_grow(a, ENCAP_OVERHEAD6, ADJ_ROOM_FLAGS6)

    # Outer Ethernet: redirect_neigh rebuilds the MACs; the type is IPv6.
    a.st_imm("H", R2, 12, ne(ETH_P_IPV6, 2))
    o = ETH_HLEN
    a.ldx("DW", R0, FP, STACK_WORD0)
    a.to_be(R0, 32)
    a.stx("W", R2, o + 0, R0)
    a.mov64_reg(R5, R8)
    a.alu64_imm("ADD", R5, UDP_HLEN + VXLAN_HLEN + ETH_HLEN)   # payload = UDP length
    a.to_be(R5, 16)
    a.stx("H", R2, o + OFF_PAYLOAD_LEN, R5)
    a.st_imm("B", R2, o + OFF_NEXT_HEADER, IPPROTO_UDP)
    a.st_imm("B", R2, o + OFF_HOP_LIMIT, OUTER_TTL)
    for k, word in enumerate(address_words(local_underlay)):
        a.st_imm("W", R2, o + OFF_SRC + 4 * k, ne(word, 4))
    _store_destination(a, R2, o + OFF_DST, destination_prefix)

    u = o + IPV6_HLEN
    a.to_be(R7, 16)
    a.stx("H", R2, u + 0, R7)
    a.st_imm("H", R2, u + 2, ne(udp_port, 2))
    a.stx("H", R2, u + 4, R5)
    a.st_imm("H", R2, u + 6, 0)          # zero checksum: see the module's docstring
    emit_vxlan_and_inner_eth(a, u + UDP_HLEN, vni=vni, tunnel_mac=tunnel_mac, inner_src_mac=inner_src_mac)

    # Out through the underlay; the neighbour table supplies the MACs.
    a.mov64_imm(R1, underlay_ifindex)
    emit_nexthop_args(a, onlink=onlink, prefix_words=destination_prefix)
    a.mov64_imm(R4, 0)
    a.call(HELPER_REDIRECT_NEIGH)
    a.mov64_reg(R7, R0)
