"""Where the peer is: the segment test and the next hop for ``bpf_redirect_neigh``.

Pure. The node's *segment* is the connected prefix of its underlay address:
a peer in it is on the same link (:mod:`.direct` sends it packets
unencapsulated). The encapsulation tails (:mod:`.vxlanencap`,
:mod:`.vxlanencap6`) pass ``bpf_redirect_neigh`` no next hop (the kernel
routes the outer packet, through routers too), or with ``onlink_underlay``
the peer itself. In: r9, the peer's underlay address (IPv4), or the last
32-bit word of it (IPv6), in host order.
"""
from __future__ import annotations

import ipaddress

from .insn import FP, R0, R2, R3, R9, Assembler, ne

__all__ = ["Segment", "segment_word", "emit_in_segment", "store_peer", "store_nexthop", "emit_nexthop_args", "STACK_NH"]

AF_INET = 2
AF_INET6 = 10
STACK_NH = -40        # struct bpf_redir_neigh (20 bytes)

Segment = tuple[int, int]   # (mask, network) of the segment's last 32-bit word, host order


def segment_word(segment: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Segment:
    """The (mask, network) immediates of the segment's last 32 bits. For an IPv6 underlay
    (at least /96, so the first three words are the underlay's constants) the segment is
    inside the underlay, and only the last word varies between its peers."""
    mask = int(segment.netmask) & 0xFFFFFFFF
    return mask, int(segment.network_address) & mask


def emit_in_segment(a: Assembler, segment: Segment, miss: str) -> None:
    """Jump to ``miss`` unless r9 (the peer, host order) is in the segment. Clobbers r0."""
    mask, net = segment
    a.mov32_reg(R0, R9)
    a.alu32_imm("AND", R0, mask)
    a.jmp32_imm("JNE", R0, net, miss)


def store_peer(a: Assembler, off: int, prefix_words: tuple[int, int, int] | None) -> None:
    """The peer's underlay address in network order at stack offset ``off``: r9 (IPv4), or the
    underlay's three constant words and r9 (IPv6). Clobbers r0."""
    if prefix_words is not None:
        for k, word in enumerate(prefix_words):
            a.st_imm("W", FP, off + 4 * k, ne(word, 4))
        off += 12
    a.mov32_reg(R0, R9)
    a.to_be(R0, 32)
    a.stx("W", FP, off, R0)


def store_nexthop(a: Assembler, prefix_words: tuple[int, int, int] | None) -> None:
    """struct bpf_redir_neigh at STACK_NH: the peer (r9) as an IPv4 next hop, or, with the
    underlay's three constant words, as an IPv6 one. Clobbers r0."""
    a.st_imm("W", FP, STACK_NH, AF_INET if prefix_words is None else AF_INET6)
    store_peer(a, STACK_NH + 4, prefix_words)
    if prefix_words is None:
        for off in (8, 12, 16):
            a.st_imm("W", FP, STACK_NH + off, 0)


def emit_nexthop_args(a: Assembler, *, onlink: bool, prefix_words: tuple[int, int, int] | None) -> None:
    """r2, r3: ``bpf_redirect_neigh``'s next-hop arguments for the encapsulated packet to r9: the
    peer itself with ``onlink`` (every node on the underlay device's link), else NULL, 0: the
    kernel's route lookup, which also works through routers."""
    if not onlink:
        a.mov64_imm(R2, 0)
        a.mov64_imm(R3, 0)
        return
    store_nexthop(a, prefix_words)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, STACK_NH)
    a.mov64_imm(R3, 20)
