"""The shared tail of the Fan program: VXLAN encapsulation and redirect.

Pure. Whatever the inner family, the packet leaves as outer IPv4 / UDP /
VXLAN / inner Ethernet (the underlay is IPv4), so :mod:`.fanprog` jumps here
from its IPv4 and IPv6 branches once the outer destination is known.
In: r6 ctx, r8 the inner packet's length, r9 the outer destination (host
order), the outer TOS and the inner EtherType in their stack slots. Out:
r7 the return value of ``bpf_redirect_neigh``; jumps to ``drop`` when a
helper fails.
"""
from __future__ import annotations

import ipaddress
import sys

from .insn import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Assembler, ne
from .nexthop import emit_nexthop_args

# Helper ids (enum bpf_func_id).
HELPER_GET_HASH_RECALC = 34
HELPER_SKB_ADJUST_ROOM = 50
HELPER_REDIRECT_NEIGH = 152
# bpf_skb_adjust_room mode and flags (include/uapi/linux/bpf.h). The outer
# L3 is IPv4 for both inner families, so ENCAP_L3_IPV4 always.
BPF_ADJ_ROOM_MAC = 1
BPF_F_ADJ_ROOM_FIXED_GSO = 1 << 0
BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 = 1 << 1
BPF_F_ADJ_ROOM_ENCAP_L4_UDP = 1 << 4
BPF_F_ADJ_ROOM_ENCAP_L2_ETH = 1 << 6
BPF_ADJ_ROOM_ENCAP_L2_SHIFT = 56
ETH_HLEN = 14
ETH_P_IP = 0x0800
ENCAP_OVERHEAD = 20 + 8 + 8 + ETH_HLEN  # outer IPv4 + UDP + VXLAN + inner Eth
ADJ_ROOM_FLAGS = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
                  | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
                  | (ETH_HLEN << BPF_ADJ_ROOM_ENCAP_L2_SHIFT))
# struct __sk_buff field offsets.
SKB_DATA = 76
SKB_DATA_END = 80
# UDP source ports: the kernel's default ephemeral range, as VXLAN uses it.
SPORT_MIN, SPORT_MAX = 32768, 60999
OUTER_TTL = 64
# Stack slots (offsets from the frame pointer) the branches fill in.
STACK_TOS = -16       # u64 outer TOS byte
STACK_PROTO = -48     # u16 inner EtherType (network order)


def emit_outer_ecn(a: Assembler, *, byte_off: int, shift: int, stack_tos: int, label: str) -> None:
    """Stash the outer header's ECN bits: the inner packet's ECN (bits `shift`..`shift`+1 of the
    byte at r7 + `byte_off`), with CE turned into ECT(0) (RFC 6040's normal mode)."""
    a.ldx("B", R3, R7, byte_off)
    if shift:
        a.alu32_imm("RSH", R3, shift)
    a.alu32_imm("AND", R3, 3)
    a.jmp32_imm("JNE", R3, 3, label)
    a.mov32_imm(R3, 2)
    a.label(label)
    a.stx("DW", FP, stack_tos, R3)


def emit_source_port(a: Assembler) -> None:
    """r7 = the UDP source port from the flow hash in r0, folded into the
    ephemeral range like udp_flow_src_port() so the underlay can spread
    flows. Clobbers r0."""
    a.mov32_reg(R0, R0)
    a.alu64_imm("MUL", R0, SPORT_MAX + 1 - SPORT_MIN)
    a.alu64_imm("RSH", R0, 32)
    a.alu64_imm("ADD", R0, SPORT_MIN)
    a.mov64_reg(R7, R0)


def emit_vxlan_and_inner_eth(a: Assembler, off: int, *, vni: int, tunnel_mac: bytes,
                             inner_src_mac: bytes) -> None:
    """The VXLAN header (I flag, VNI) and the inner Ethernet header at
    packet offset ``off`` from r2; the inner EtherType comes from its
    stack slot. Same for both outer families. Clobbers r0."""
    a.st_imm("W", R2, off + 0, ne(0x08000000, 4))
    a.st_imm("W", R2, off + 4, ne(vni << 8, 4))
    e = off + 8
    a.st_imm("W", R2, e + 0, int.from_bytes(tunnel_mac[:4], sys.byteorder))
    a.st_imm("H", R2, e + 4, int.from_bytes(tunnel_mac[4:], sys.byteorder))
    a.st_imm("W", R2, e + 6, int.from_bytes(inner_src_mac[:4], sys.byteorder))
    a.st_imm("H", R2, e + 10, int.from_bytes(inner_src_mac[4:], sys.byteorder))
    a.ldx("H", R0, FP, STACK_PROTO)
    a.stx("H", R2, e + 12, R0)


def emit_grow(a: Assembler, overhead: int, flags: int) -> None:
    """Make room for the outer headers after the MAC header (`bpf_skb_adjust_room`, which tells
    GSO the encapsulation through `flags`); on return r2 is the packet's start, with `overhead`
    bytes plus an Ethernet header known to be there."""
    a.mov64_reg(R1, R6)
    a.mov64_imm(R2, overhead)
    a.mov64_imm(R3, BPF_ADJ_ROOM_MAC)
    a.ld_imm64(R4, flags)
    a.call(HELPER_SKB_ADJUST_ROOM)
    a.jmp_imm("JNE", R0, 0, "drop")
    # Packet pointers are invalid after adjust_room: fetch and check again.
    a.ldx("W", R2, R6, SKB_DATA)
    a.ldx("W", R3, R6, SKB_DATA_END)
    a.mov64_reg(R4, R2)
    a.alu64_imm("ADD", R4, ETH_HLEN + overhead)
    a.jmp_reg("JGT", R4, R3, "drop")


def emit_vxlan_encap(a: Assembler, *, local_underlay: ipaddress.IPv4Address, udp_port: int, vni: int,
                     tunnel_mac: bytes, inner_src_mac: bytes, underlay_ifindex: int, onlink: bool) -> None:
    """Grow the packet, write outer IPv4/UDP/VXLAN/inner Ethernet, redirect."""
    a.mov64_reg(R1, R6)
    a.call(HELPER_GET_HASH_RECALC)
    emit_source_port(a)

    emit_grow(a, ENCAP_OVERHEAD, ADJ_ROOM_FLAGS)

    # The outer frame is IPv4 whatever the inner family (the original
    # EtherType stays for IPv4; redirect_neigh rebuilds the MACs).
    a.st_imm("H", R2, 12, ne(ETH_P_IP, 2))
    o = ETH_HLEN  # outer IPv4 header
    src = int(local_underlay)
    a.st_imm("B", R2, o + 0, 0x45)
    a.ldx("DW", R4, FP, STACK_TOS)
    a.stx("B", R2, o + 1, R4)
    a.mov64_reg(R5, R8)
    a.alu64_imm("ADD", R5, ENCAP_OVERHEAD)       # outer total length
    a.mov64_reg(R0, R5)
    a.to_be(R0, 16)
    a.stx("H", R2, o + 2, R0)
    a.st_imm("H", R2, o + 4, 0)                  # id: 0, DF set (RFC 6864)
    a.st_imm("H", R2, o + 6, ne(0x4000, 2))
    a.st_imm("B", R2, o + 8, OUTER_TTL)
    a.st_imm("B", R2, o + 9, 17)
    a.st_imm("W", R2, o + 12, ne(src, 4))
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.stx("W", R2, o + 16, R0)
    # Header checksum over host-order words; the constant part is folded in
    # Python, the rest (TOS, length, destination) added here.
    const = 0x4500 + 0x4000 + (OUTER_TTL << 8 | 17) + (src >> 16) + (src & 0xFFFF)
    a.mov64_imm(R1, const)
    a.alu64_reg("ADD", R1, R4)
    a.alu64_reg("ADD", R1, R5)
    a.mov64_reg(R0, R9)
    a.alu64_imm("RSH", R0, 16)
    a.alu64_reg("ADD", R1, R0)
    a.mov64_reg(R0, R9)
    a.alu64_imm("AND", R0, 0xFFFF)
    a.alu64_reg("ADD", R1, R0)
    for _ in range(2):
        a.mov64_reg(R0, R1)
        a.alu64_imm("RSH", R0, 16)
        a.alu64_imm("AND", R1, 0xFFFF)
        a.alu64_reg("ADD", R1, R0)
    a.alu64_imm("XOR", R1, 0xFFFF)
    a.to_be(R1, 16)
    a.stx("H", R2, o + 10, R1)

    u = o + 20  # UDP
    a.to_be(R7, 16)
    a.stx("H", R2, u + 0, R7)
    a.st_imm("H", R2, u + 2, ne(udp_port, 2))
    a.alu64_imm("SUB", R5, 20)
    a.to_be(R5, 16)
    a.stx("H", R2, u + 4, R5)
    a.st_imm("H", R2, u + 6, 0)                  # no UDP checksum (RFC 7348)

    emit_vxlan_and_inner_eth(a, u + 8, vni=vni, tunnel_mac=tunnel_mac, inner_src_mac=inner_src_mac)

    # Out through the underlay; the neighbour table supplies the MACs.
    a.mov64_imm(R1, underlay_ifindex)
    emit_nexthop_args(a, onlink=onlink, prefix_words=None)
    a.mov64_imm(R4, 0)
    a.call(HELPER_REDIRECT_NEIGH)
    a.mov64_reg(R7, R0)
