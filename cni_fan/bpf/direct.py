"""Direct routing: packets for a peer on the node's own underlay segment leave unencapsulated.

Pure. Once the Fan reverse map has given the owning node's underlay address
(r9: an IPv4 address, or the last 32-bit word of an IPv6 one, host order),
the node's *segment* (the connected prefix of its underlay address) decides:
a peer in it is on the same link, so the packet can go to it as it is; any
other peer is behind a router and gets the packet encapsulated.

The peer's MAC comes from the kernel: ``bpf_fib_lookup`` (the peer's address,
output on the underlay device) returns it when the neighbour table has a
valid entry; the program writes the Ethernet header and calls
``bpf_redirect``. Per-node state stays constant: no route or neighbour entry
per peer beyond what ARP / neighbour discovery learn by themselves.

Why not ``bpf_redirect_neigh`` with the peer as explicit next hop (which
would also resolve an unknown neighbour): on the tunnel's egress hook the
packet still carries the route that sent it to the tunnel, and the kernel
flushes the packets it queued while resolving the neighbour through that
route's neighbour (the tunnel's on-link next hop), so they leave the
underlay device with the tunnel's MACs and are lost: the first packets to
every new peer (seen on the wire in the two-segment lab of
tests/test_node_direct_routing.py while this was built; docs/datapath.md). And for inner
IPv6 over an IPv4 underlay ``bpf_out_neigh_v6`` reads ``nh->ipv6_nh``
whatever ``nh_family`` says. So when the lookup finds no valid neighbour
(or a gateway rather than the peer), this packet is encapsulated instead
(counted as a fallback); the encapsulated path's ``bpf_redirect_neigh``
without a next hop resolves the peer's address, through its own route, for
the packets that follow.
"""
from __future__ import annotations

from .insn import FP, R0, R1, R2, R3, R4, R6, R7, R9, Assembler, ne
from .nexthop import AF_INET, AF_INET6, Segment, emit_in_segment, store_peer
from .vxlanencap import ETH_HLEN, SKB_DATA, SKB_DATA_END

__all__ = ["emit_direct", "emit_count", "emit_increment"]

HELPER_MAP_LOOKUP_ELEM = 1
HELPER_REDIRECT = 23
HELPER_FIB_LOOKUP = 69
BPF_FIB_LOOKUP_OUTPUT = 1 << 1
FIB_LKUP_RET_SUCCESS = 0
# struct bpf_fib_lookup (include/uapi/linux/bpf.h): 64 bytes.
FIB_SIZE = 64
FIB_FAMILY, FIB_IFINDEX, FIB_DST, FIB_SMAC, FIB_DMAC = 0, 8, 32, 52, 58
STACK_FIB = -128      # struct bpf_fib_lookup on the stack (-128 .. -64)
STACK_COUNT_KEY = -8  # u32 key of an inline counter update

def emit_increment(a: Assembler, map_fd: int, key_slot: int, done: str) -> None:
    """Add one to the counters map's entry whose u32 key is at stack offset ``key_slot``, then
    label ``done``. Clobbers r0-r5. (The Fan program's exits count through it too.)"""
    a.ld_map_fd(R1, map_fd)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, key_slot)
    a.call(HELPER_MAP_LOOKUP_ELEM)
    a.jmp_imm("JEQ", R0, 0, done)
    a.ldx("DW", R1, R0, 0)
    a.alu64_imm("ADD", R1, 1)
    a.stx("DW", R0, 0, R1)
    a.label(done)


def emit_count(a: Assembler, map_fd: int | None, key: int, tag: str) -> None:
    """Add one to counter ``key`` now (a packet that goes on to another verdict). Clobbers r0-r5."""
    if map_fd is None:
        return
    a.st_imm("W", FP, STACK_COUNT_KEY, key)
    emit_increment(a, map_fd, STACK_COUNT_KEY, f"counted_{tag}")


def _emit_peer_unchanged(a: Assembler, prefix_words: tuple[int, int, int] | None, miss: str) -> None:
    """Jump to ``miss`` unless the lookup left the peer as the next hop (it writes a gateway over
    the destination when the route to the peer has one). Clobbers r0, r1."""
    off = STACK_FIB + FIB_DST
    if prefix_words is not None:
        for k, word in enumerate(prefix_words):
            a.ldx("W", R1, FP, off + 4 * k)
            a.jmp32_imm("JNE", R1, ne(word, 4), miss)
        off += 12
    a.ldx("W", R1, FP, off)
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.jmp32_reg("JNE", R1, R0, miss)


def emit_direct(a: Assembler, *, segment: Segment, underlay_ifindex: int,
                prefix_words: tuple[int, int, int] | None, fallback_key: int, map_fd: int | None) -> None:
    """The direct path for the peer r9.

    Falls through (to the encapsulation) for a peer outside the segment, and for one whose MAC the
    kernel does not know yet or whose route names a gateway (that one counted at
    ``fallback_key``). Otherwise writes the Ethernet header (the peer's MAC, the underlay
    device's), sends the packet as it is with ``bpf_redirect`` and jumps to ``direct_done``
    with the verdict in r7. ``prefix_words``: an IPv6 underlay's three constant words.
    """
    emit_in_segment(a, segment, "tunnel")
    for off in range(0, FIB_SIZE, 8):
        a.st_imm("DW", FP, STACK_FIB + off, 0)
    a.st_imm("B", FP, STACK_FIB + FIB_FAMILY, AF_INET if prefix_words is None else AF_INET6)
    a.st_imm("W", FP, STACK_FIB + FIB_IFINDEX, underlay_ifindex)
    store_peer(a, STACK_FIB + FIB_DST, prefix_words)
    a.mov64_reg(R1, R6)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, STACK_FIB)
    a.mov64_imm(R3, FIB_SIZE)
    a.mov64_imm(R4, BPF_FIB_LOOKUP_OUTPUT)
    a.call(HELPER_FIB_LOOKUP)
    a.jmp_imm("JNE", R0, FIB_LKUP_RET_SUCCESS, "no_direct")
    _emit_peer_unchanged(a, prefix_words, "no_direct")
    a.ldx("W", R1, FP, STACK_FIB + FIB_IFINDEX)
    a.jmp32_imm("JNE", R1, underlay_ifindex, "no_direct")
    a.ldx("W", R2, R6, SKB_DATA)
    a.ldx("W", R3, R6, SKB_DATA_END)
    a.mov64_reg(R4, R2)
    a.alu64_imm("ADD", R4, ETH_HLEN)
    a.jmp_reg("JGT", R4, R3, "drop")
    # Stack loads stay aligned: dmac is bytes 58-63 (2 + 4), smac 52-57 (4 + 2). The EtherType
    # is the inner packet's already.
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
    a.ja("direct_done")
    a.label("no_direct")
    emit_count(a, map_fd, fallback_key, "fallback")
