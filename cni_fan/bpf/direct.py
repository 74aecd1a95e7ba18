"""Direct routing: the Fan program's choice of path and next hop, per packet.

Pure. Once the Fan reverse map has given the owning node's underlay address
(r9: an IPv4 address, or the last 32-bit word of an IPv6 one, host order),
the node's *segment* (the connected prefix of its underlay address) decides:

- a peer in the segment is on the same link. With direct routing the packet
  leaves unencapsulated, with the peer's underlay address as the computed
  next hop (``bpf_redirect_neigh`` with an explicit next hop: a neighbour
  lookup, no route per peer). The encapsulated path also passes that next
  hop, which skips the route lookup ``bpf_redirect_neigh`` does without one;
- a peer outside the segment is behind a router: encapsulated, and no next
  hop, so the kernel's routing finds the router.

The kernel's ``bpf_out_neigh_v6`` reads ``nh->ipv6_nh`` whatever
``nh_family`` says, so an inner IPv6 packet cannot be handed to an IPv4 next
hop. For inner IPv6 over an IPv4 underlay the program asks
``bpf_fib_lookup`` (AF_INET, the peer's address, output on the underlay
device) for the peer's MAC, writes the Ethernet header itself and calls
``bpf_redirect``; when the kernel knows no neighbour yet (or the lookup names
a gateway rather than the peer), this packet is encapsulated instead and
counted as a fallback: the encapsulated path's ``bpf_redirect_neigh``
resolves the peer's address for the packets that follow.
"""
from __future__ import annotations

from .insn import FP, R0, R1, R2, R3, R4, R6, R7, R9, Assembler, ne
from .nexthop import AF_INET, STACK_NH, Segment, emit_in_segment, store_nexthop
from .vxlanencap import ETH_HLEN, HELPER_REDIRECT_NEIGH, SKB_DATA, SKB_DATA_END, STACK_PROTO

__all__ = ["emit_direct", "emit_count"]

HELPER_MAP_LOOKUP_ELEM = 1
HELPER_REDIRECT = 23
HELPER_FIB_LOOKUP = 69
ETH_P_IPV6 = 0x86DD
BPF_FIB_LOOKUP_OUTPUT = 1 << 1
FIB_LKUP_RET_SUCCESS = 0
# struct bpf_fib_lookup (include/uapi/linux/bpf.h): 64 bytes.
FIB_SIZE = 64
FIB_FAMILY, FIB_IFINDEX, FIB_IPV4_DST, FIB_SMAC, FIB_DMAC = 0, 8, 32, 52, 58
STACK_FIB = -128      # struct bpf_fib_lookup on the stack (-128 .. -64)
STACK_COUNT_KEY = -8  # u32 key of an inline counter update

def emit_count(a: Assembler, map_fd: int | None, key: int, tag: str) -> None:
    """Add one to counter ``key`` now (a packet that goes on to another verdict). Clobbers r0-r5."""
    if map_fd is None:
        return
    a.st_imm("W", FP, STACK_COUNT_KEY, key)
    a.ld_map_fd(R1, map_fd)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, STACK_COUNT_KEY)
    a.call(HELPER_MAP_LOOKUP_ELEM)
    a.jmp_imm("JEQ", R0, 0, f"counted_{tag}")
    a.ldx("DW", R1, R0, 0)
    a.alu64_imm("ADD", R1, 1)
    a.stx("DW", R0, 0, R1)
    a.label(f"counted_{tag}")


def _emit_fib_direct(a: Assembler, underlay_ifindex: int, fallback: str) -> None:
    """Inner IPv6 to the IPv4 peer r9: the peer's MAC from the kernel's FIB and neighbour
    table, the Ethernet header written here, then ``bpf_redirect``. Jumps to ``fallback``
    when there is no neighbour entry or the route to the peer is not the connected one."""
    for off in range(0, FIB_SIZE, 8):
        a.st_imm("DW", FP, STACK_FIB + off, 0)
    a.st_imm("B", FP, STACK_FIB + FIB_FAMILY, AF_INET)
    a.st_imm("W", FP, STACK_FIB + FIB_IFINDEX, underlay_ifindex)
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.stx("W", FP, STACK_FIB + FIB_IPV4_DST, R0)
    a.mov64_reg(R1, R6)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, STACK_FIB)
    a.mov64_imm(R3, FIB_SIZE)
    a.mov64_imm(R4, BPF_FIB_LOOKUP_OUTPUT)
    a.call(HELPER_FIB_LOOKUP)
    a.jmp_imm("JNE", R0, FIB_LKUP_RET_SUCCESS, fallback)
    # The lookup writes a gateway over the destination: only the peer itself will do.
    a.ldx("W", R1, FP, STACK_FIB + FIB_IPV4_DST)
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.jmp32_reg("JNE", R1, R0, fallback)
    a.ldx("W", R1, FP, STACK_FIB + FIB_IFINDEX)
    a.jmp32_imm("JNE", R1, underlay_ifindex, fallback)
    a.ldx("W", R2, R6, SKB_DATA)
    a.ldx("W", R3, R6, SKB_DATA_END)
    a.mov64_reg(R4, R2)
    a.alu64_imm("ADD", R4, ETH_HLEN)
    a.jmp_reg("JGT", R4, R3, "drop")
    # Stack loads stay aligned: dmac is bytes 58-63 (2 + 4), smac 52-57 (4 + 2).
    a.ldx("H", R0, FP, STACK_FIB + FIB_DMAC)
    a.stx("H", R2, 0, R0)
    a.ldx("W", R0, FP, STACK_FIB + FIB_DMAC + 2)
    a.stx("W", R2, 2, R0)
    a.ldx("W", R0, FP, STACK_FIB + FIB_SMAC)
    a.stx("W", R2, 6, R0)
    a.ldx("H", R0, FP, STACK_FIB + FIB_SMAC + 4)
    a.stx("H", R2, 10, R0)
    a.mov64_imm(R1, underlay_ifindex)
    a.mov64_imm(R2, 0)
    a.call(HELPER_REDIRECT)
    a.mov64_reg(R7, R0)


def emit_direct(a: Assembler, *, segment: Segment, underlay_ifindex: int,
                prefix_words: tuple[int, int, int] | None, inner_ipv6_over_ipv4: bool,
                fallback_key: int, map_fd: int | None) -> None:
    """The direct path for the peer r9: falls through (to the encapsulation) for a peer outside
    the segment, or an inner IPv6 packet whose peer's MAC is not known yet (counted at
    ``fallback_key``); otherwise sends the packet as it is and jumps to ``direct_done`` with
    the helper's verdict in r7.

    ``prefix_words``: an IPv6 underlay's three constant words (the next hop is IPv6; the inner
    packet is too). ``inner_ipv6_over_ipv4``: the program also maps inner IPv6 over the IPv4
    underlay, whose frames take the FIB path."""
    emit_in_segment(a, segment, "tunnel")
    if inner_ipv6_over_ipv4:
        a.ldx("H", R3, FP, STACK_PROTO)
        a.jmp32_imm("JEQ", R3, ne(ETH_P_IPV6, 2), "direct6")
    a.mov64_imm(R1, underlay_ifindex)
    store_nexthop(a, prefix_words)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, STACK_NH)
    a.mov64_imm(R3, 20)
    a.mov64_imm(R4, 0)
    a.call(HELPER_REDIRECT_NEIGH)
    a.mov64_reg(R7, R0)
    a.ja("direct_done")
    if inner_ipv6_over_ipv4:
        a.label("direct6")
        _emit_fib_direct(a, underlay_ifindex, "no_direct6")
        a.ja("direct_done")
        a.label("no_direct6")
        emit_count(a, map_fd, fallback_key, "fallback")
