"""The Fan datapath as a tc eBPF program, generated in Python.

Pure: builds instruction bytes from :class:`FanDatapathParams`; nothing is
loaded here (see :mod:`cni_fan.bpf.syscall` and :mod:`cni_fan.net.tc`).

What the program does to an Ethernet frame carrying IPv4 whose destination
is in the overlay but outside this node's slice, or (with ``overlay6``)
IPv6 whose destination is in overlay6 but outside this node's IPv6 slice
(:mod:`.fanprog6`; docs/datapath.md has the why of each step):

1. map the inner destination to the owning node's underlay address with the
   Fan reverse map ``underlay_net | ((dst & ~overlay_mask) >> slice_bits)``;
2. on the ingress hook (frames from pods), decrement the inner TTL (IPv4,
   with the header checksum fixed incrementally) or hop limit (IPv6) as a
   router would;
3. grow the packet by 50 bytes after the MAC header (``bpf_skb_adjust_room``
   with the UDP-tunnel encapsulation flags, so GSO keeps working and the
   inner MSS is kept) and write outer IPv4, UDP, VXLAN and inner Ethernet;
4. hand the packet to the underlay device with ``bpf_redirect_neigh``,
   which fills in the outer Ethernet addresses from the neighbour table.

With ``direct`` (``directRouting``), a packet whose owner is on this node's
underlay segment skips 3 and 4 once the kernel knows the owner's MAC: it
leaves unencapsulated (:mod:`.direct`).

Everything else is returned to the kernel untouched (``TC_ACT_OK``). Per-node
parameters are immediates: the program needs no map, except an optional
per-CPU array of counters (:class:`Counter`).
"""
from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from .fanprog6 import ETH_P_IPV6, check_overlay6, emit_ipv6, local_slice6, outer_destination6
from .direct import emit_direct, emit_increment
from .insn import FP, R0, R1, R2, R3, R6, R7, R8, R9, Assembler
from .nexthop import segment_word
from .vxlanencap import (ENCAP_OVERHEAD, ETH_HLEN, ETH_P_IP, SKB_DATA, SKB_DATA_END, STACK_PROTO, STACK_TOS,
                         emit_outer_ecn, emit_vxlan_encap)
from .vxlanencap import ne as _ne

__all__ = [
    "Hook", "Counter", "FanDatapathParams", "build_encap_program",
    "counter_key", "outer_destination", "ENCAP_OVERHEAD", "COUNTER_SLOTS",
]

# Return codes of a direct-action tc program.
TC_ACT_OK = 0
TC_ACT_SHOT = 2
# struct __sk_buff field offsets.
SKB_PKT_TYPE = 4
SKB_GSO_SIZE = 176
STACK_KEY = -4        # u32 counter key (stack slot, from the frame pointer)


class Hook(str, Enum):
    """Where the program runs; it changes what the program may assume.

    INGRESS: tc ingress of the fan bridge (or a pod's host-side veth): the
    frame comes from a pod and is being *forwarded*, so the program acts as
    the router (TTL, source check, MTU). EGRESS: tc egress of the VXLAN
    device: the kernel already routed the packet (node-originated or
    forwarded traffic), so the program only encapsulates.
    In both hooks ``skb->data`` starts at the Ethernet header.
    """

    INGRESS = "ingress"
    EGRESS = "egress"


class Counter(IntEnum):
    """Outcome counted per hook in the optional per-CPU array."""

    PASSED = 0        # not ours: returned to the kernel untouched
    ENCAPSULATED = 1  # encapsulated and redirected to the underlay
    DROPPED = 2       # unusable destination or a failed helper
    PUNTED = 3        # ours, but left to the kernel's forwarding (TTL, MTU)
    DIRECT = 4        # directRouting: sent unencapsulated to a peer in the node's segment
    FALLBACK = 5      # directRouting: a peer in the segment whose MAC is not known yet, so
    #                   encapsulated instead (counted in ENCAPSULATED as well)


COUNTER_SLOTS = 2 * len(Counter)


def counter_key(hook: Hook, counter: Counter) -> int:
    """Index of a counter in the map (one block of len(Counter) per hook)."""
    return (0 if Hook(hook) is Hook.INGRESS else len(Counter)) + int(counter)


def _mac(text: str, what: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"{what}: not a MAC address: {text!r}")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{what}: not a MAC address: {text!r}") from None
    if raw[0] & 1:
        raise ValueError(f"{what}: must be unicast: {text}")
    if raw == bytes(6):
        raise ValueError(f"{what}: must not be all zeros")
    return raw


@dataclass(frozen=True)
class FanDatapathParams:
    """Everything one node's program needs; all of it constant per node.

    ``overlay`` and ``underlay`` are the Fan's two networks; ``local_underlay``
    is this node's underlay address (outer source, and its host bits select
    the local slice). ``tunnel_mac`` is the MAC every node's VXLAN device
    shares (inner destination); ``inner_src_mac`` must differ from it because
    the VXLAN receive path drops frames whose source is its own MAC.
    ``overlay_mtu`` (ingress only): non-GSO packets with a larger IP total
    length are left to the kernel, which fragments them or answers with ICMP
    "fragmentation needed" (the VXLAN device's MTU applies there).
    ``onlink_underlay``: pass the outer destination as next hop to
    ``bpf_redirect_neigh`` (skips the route lookup; only valid when every
    node is on the same link as the underlay device).
    ``gateway_mac`` (ingress only): route only frames sent to this MAC (the
    fan bridge's). Needed when the program sits on a pod's veth, where such
    frames are not yet marked PACKET_HOST; without it the program relies on
    ``skb->pkt_type`` (right on the bridge device itself).
    ``overlay6``: the IPv6 overlay (dual-stack nodes); this node's IPv6
    slice follows from the same host bits of ``local_underlay``. Without
    it, IPv6 frames are passed untouched.
    ``segment``: the connected prefix of ``local_underlay`` (the peers on
    its link). ``direct`` (needs ``segment``): packets for a peer in the
    segment leave unencapsulated once the kernel knows the peer's MAC
    (:mod:`.direct`); all others are encapsulated.
    """

    overlay: ipaddress.IPv4Network
    underlay: ipaddress.IPv4Network
    local_underlay: ipaddress.IPv4Address
    underlay_ifindex: int
    vni: int
    tunnel_mac: str
    inner_src_mac: str
    hook: Hook = Hook.INGRESS
    udp_port: int = 4789
    decrement_ttl: bool | None = None  # default: True on ingress only
    overlay_mtu: int | None = None
    onlink_underlay: bool = False
    gateway_mac: str | None = None
    overlay6: ipaddress.IPv6Network | None = None
    segment: ipaddress.IPv4Network | None = None
    direct: bool = False
    _tunnel_mac: bytes = field(init=False, repr=False, compare=False)
    _inner_src_mac: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "overlay", ipaddress.IPv4Network(self.overlay))
        set_(self, "underlay", ipaddress.IPv4Network(self.underlay))
        set_(self, "local_underlay", ipaddress.IPv4Address(self.local_underlay))
        set_(self, "hook", Hook(self.hook))
        if self.decrement_ttl is None:
            set_(self, "decrement_ttl", self.hook is Hook.INGRESS)
        if self.decrement_ttl and self.hook is not Hook.INGRESS:
            raise ValueError("TTL decrement only belongs on the ingress hook: "
                             "on egress the kernel has already forwarded")
        if self.slice_prefixlen > 30:
            raise ValueError(
                f"slice prefix /{self.slice_prefixlen} leaves no room for "
                f"containers (overlay {self.overlay}, underlay {self.underlay})")
        if self.local_underlay not in self.underlay:
            raise ValueError(f"{self.local_underlay} is not in {self.underlay}")
        if self.underlay.prefixlen <= 30 and self.local_underlay in (
                self.underlay.network_address, self.underlay.broadcast_address):
            raise ValueError(f"{self.local_underlay} is not a host address")
        check_tunnel_fields(self, min_mtu=68)
        check_segment(self, ipaddress.IPv4Network)
        if self.overlay6 is not None:
            set_(self, "overlay6", check_overlay6(self.overlay6, self.host_bits))

    # -- derived ------------------------------------------------------------
    @property
    def host_bits(self) -> int:
        """Bits of the underlay address that name a host (= slice bits)."""
        return 32 - self.underlay.prefixlen

    @property
    def slice_prefixlen(self) -> int:
        return self.overlay.prefixlen + self.host_bits

    @property
    def container_bits(self) -> int:
        return 32 - self.slice_prefixlen

    @property
    def local_slice(self) -> ipaddress.IPv4Network:
        host = int(self.local_underlay) & int(self.underlay.hostmask)
        first = int(self.overlay.network_address) | (host << self.container_bits)
        return ipaddress.IPv4Network((first, self.slice_prefixlen))

    @property
    def local_slice6(self) -> ipaddress.IPv6Network | None:
        if self.overlay6 is None:
            return None
        return local_slice6(self.overlay6, self.underlay, self.local_underlay)


def outer_destination(params: FanDatapathParams,
                      inner_dst: ipaddress.IPv4Address | ipaddress.IPv6Address | str
                      ) -> ipaddress.IPv4Address | None:
    """The underlay address the program sends ``inner_dst`` to, or None when
    the program does not encapsulate it (outside the overlay, local slice,
    a slice's network/broadcast address, or an unusable underlay host).
    An IPv6 destination maps through ``overlay6`` (None without one)."""
    addr = ipaddress.ip_address(inner_dst)
    if addr.version == 6:
        if params.overlay6 is None:
            return None
        return outer_destination6(params.overlay6, params.local_slice6,
                                  params.underlay, addr)
    d = int(addr)
    if ipaddress.IPv4Address(d) not in params.overlay:
        return None
    if ipaddress.IPv4Address(d) in params.local_slice:
        return None
    cmask = (1 << params.container_bits) - 1
    if d & cmask in (0, cmask):
        return None
    host = (d & int(params.overlay.hostmask)) >> params.container_bits
    if params.underlay.prefixlen <= 30 and host in (0, (1 << params.host_bits) - 1):
        return None
    return ipaddress.IPv4Address(int(params.underlay.network_address) | host)


def emit_reverse_map(a: Assembler, reg: int, overlay: ipaddress.IPv4Network, underlay: ipaddress.IPv4Network,
                     container_bits: int, drop: str) -> None:
    """The Fan reverse map on `reg` (an overlay address in host order):
    `underlay_net | ((addr & ~overlay_mask) >> container_bits)`; jumps to
    `drop` when that names the underlay's network or broadcast address."""
    a.alu32_imm("AND", reg, int(overlay.hostmask))
    a.alu32_imm("RSH", reg, container_bits)
    if underlay.prefixlen <= 30:
        a.jmp32_imm("JEQ", reg, 0, drop)
        a.jmp32_imm("JEQ", reg, (1 << (32 - underlay.prefixlen)) - 1, drop)
    a.alu32_imm("OR", reg, int(underlay.network_address))


def check_segment(p, network: type) -> None:
    """``segment`` as a network of the underlay's family holding ``local_underlay`` and inside the
    underlay; ``direct`` only with one. Sets the frozen `p`'s parsed segment."""
    if p.segment is not None:
        try:
            segment = network(p.segment)
        except ValueError as exc:
            raise ValueError(f"segment {p.segment!r} is not a network of the underlay's family: {exc}") from None
        if not segment.subnet_of(p.underlay):
            raise ValueError(f"segment {segment} is not inside the underlay {p.underlay}")
        if p.local_underlay not in segment:
            raise ValueError(f"segment {segment} does not hold this node's address {p.local_underlay}")
        object.__setattr__(p, "segment", segment)
    if p.direct and p.segment is None:
        raise ValueError("direct routing needs the node's segment")


def check_tunnel_fields(p, *, min_mtu: int) -> None:
    """The fields every Fan program's params share (VXLAN, device, MTU, MACs), checked one way;
    sets the frozen `p`'s parsed `_tunnel_mac` and `_inner_src_mac`."""
    if not 0 <= p.vni < (1 << 24):
        raise ValueError(f"VNI out of range: {p.vni}")
    if not 0 < p.udp_port < 65536:
        raise ValueError(f"UDP port out of range: {p.udp_port}")
    if not 0 < p.underlay_ifindex < (1 << 31):
        raise ValueError(f"bad ifindex: {p.underlay_ifindex}")
    if p.overlay_mtu is not None and not min_mtu <= p.overlay_mtu < 65536:
        why = f" (IPv6 needs at least {min_mtu})" if min_mtu >= 1280 else ""
        raise ValueError(f"overlay MTU out of range{why}: {p.overlay_mtu}")
    object.__setattr__(p, "_tunnel_mac", _mac(p.tunnel_mac, "tunnel_mac"))
    object.__setattr__(p, "_inner_src_mac", _mac(p.inner_src_mac, "inner_src_mac"))
    if p.gateway_mac is not None:
        _mac(p.gateway_mac, "gateway_mac")
        if p.hook is not Hook.INGRESS:
            raise ValueError("gateway_mac only applies to the ingress hook")
    if p._tunnel_mac == p._inner_src_mac:
        raise ValueError("inner_src_mac must differ from tunnel_mac: the "
                         "VXLAN receive path drops frames from its own MAC")


def build_encap_program(params: FanDatapathParams,
                        counters_map_fd: int | None = None) -> bytes:
    """The program's instruction bytes, ready for BPF_PROG_LOAD.

    With ``counters_map_fd`` (a per-CPU array of at least
    :data:`COUNTER_SLOTS` u64 values) every verdict is counted.
    """
    p = params
    ingress = p.hook is Hook.INGRESS
    a = Assembler()
    overlay_net = int(p.overlay.network_address)
    overlay_mask = int(p.overlay.netmask)
    slice_mask = int(p.local_slice.netmask)
    slice_net = int(p.local_slice.network_address)
    cmask = (1 << p.container_bits) - 1

    # Registers: r6 ctx; r7 data (later the UDP source port); r8 data_end
    # (later the inner IP total length); r9 the outer destination.
    emit_prologue(a, p.hook, p.gateway_mac)
    if p.overlay6 is not None:
        a.jmp32_imm("JEQ", R2, _ne(ETH_P_IPV6, 2), "ipv6")
    a.jmp32_imm("JNE", R2, _ne(ETH_P_IP, 2), "pass")
    a.ldx("B", R2, R7, ETH_HLEN)                 # version | IHL
    a.mov32_reg(R3, R2)
    a.alu32_imm("AND", R3, 0xF0)
    a.jmp32_imm("JNE", R3, 0x40, "pass")
    a.alu32_imm("AND", R2, 0x0F)
    a.jmp32_imm("JLT", R2, 5, "pass")
    a.ldx("W", R9, R7, ETH_HLEN + 16)            # inner destination
    a.to_be(R9, 32)                              # -> host order
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, overlay_mask)
    a.jmp32_imm("JNE", R3, overlay_net, "pass")
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, slice_mask)
    a.jmp32_imm("JEQ", R3, slice_net, "pass")
    # A slice's network and broadcast addresses are never forwarded.
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, cmask)
    a.jmp32_imm("JEQ", R3, 0, "drop")
    a.jmp32_imm("JEQ", R3, cmask, "drop")
    if ingress:
        # Router duties the kernel would do and we bypass: pods may only
        # send from this slice, IP options and TTL expiry go the slow way.
        a.jmp32_imm("JNE", R2, 5, "punt")
        a.ldx("W", R3, R7, ETH_HLEN + 12)        # inner source
        a.to_be(R3, 32)
        a.alu32_imm("AND", R3, slice_mask)
        a.jmp32_imm("JNE", R3, slice_net, "punt")
        a.ldx("B", R3, R7, ETH_HLEN + 8)         # TTL
        a.jmp32_imm("JLE", R3, 1, "punt")
    emit_reverse_map(a, R9, p.overlay, p.underlay, p.container_bits, "drop")
    a.ldx("H", R8, R7, ETH_HLEN + 2)             # inner total length
    a.to_be(R8, 16)
    if ingress and p.overlay_mtu is not None:
        a.jmp_imm("JLE", R8, p.overlay_mtu, "size_ok")
        a.ldx("W", R3, R6, SKB_GSO_SIZE)
        a.jmp32_imm("JEQ", R3, 0, "punt")
        a.label("size_ok")
    if p.decrement_ttl:
        a.ldx("B", R3, R7, ETH_HLEN + 8)
        a.alu32_imm("SUB", R3, 1)
        a.stx("B", R7, ETH_HLEN + 8, R3)
        # Incremental checksum update (RFC 1624), as ip_decrease_ttl does.
        a.ldx("H", R3, R7, ETH_HLEN + 10)
        a.to_be(R3, 16)
        a.alu64_imm("ADD", R3, 0x0100)
        a.jmp_imm("JLT", R3, 0xFFFF, "csum_ok")
        a.alu64_imm("ADD", R3, 1)
        a.label("csum_ok")
        a.to_be(R3, 16)
        a.stx("H", R7, ETH_HLEN + 10, R3)
    # Outer TOS carries the inner ECN bits (CE becomes ECT(0), RFC 6040).
    emit_outer_ecn(a, byte_off=ETH_HLEN + 1, shift=0, stack_tos=STACK_TOS, label="ecn_ok")
    a.st_imm("H", FP, STACK_PROTO, _ne(ETH_P_IP, 2))
    if p.overlay6 is not None:
        a.ja("encap")
        a.label("ipv6")
        emit_ipv6(a, overlay6=p.overlay6, local=p.local_slice6, underlay=p.underlay, eth_hlen=ETH_HLEN,
                  ingress=ingress, decrement=bool(p.decrement_ttl), overlay_mtu=p.overlay_mtu,
                  stack_tos=STACK_TOS, stack_proto=STACK_PROTO)
        a.label("encap")
    if p.direct:
        assert p.segment is not None
        emit_direct(a, segment=segment_word(p.segment), underlay_ifindex=p.underlay_ifindex, prefix_words=None,
                    fallback_key=counter_key(p.hook, Counter.FALLBACK), map_fd=counters_map_fd)
        a.label("tunnel")

    emit_vxlan_encap(a, local_underlay=p.local_underlay, udp_port=p.udp_port, vni=p.vni,
                     tunnel_mac=p._tunnel_mac, inner_src_mac=p._inner_src_mac,
                     underlay_ifindex=p.underlay_ifindex, onlink=p.onlink_underlay)
    emit_verdicts(a, p.hook, counters_map_fd)
    return a.assemble()


def emit_prologue(a: Assembler, hook: Hook, gateway_mac: str | None) -> None:
    """The start both underlays' programs share: r6 ctx, r7 data, r8
    data_end, r2 the EtherType (network order) of a frame long enough for
    an IPv4 header; on ingress, frames not sent to the gateway go to
    ``pass``."""
    ingress = Hook(hook) is Hook.INGRESS
    a.mov64_reg(R6, R1)
    if ingress and gateway_mac is None:
        # Only frames addressed to this device (the gateway MAC) are routed.
        a.ldx("W", R2, R6, SKB_PKT_TYPE)
        a.jmp32_imm("JNE", R2, 0, "pass")
    a.ldx("W", R7, R6, SKB_DATA)
    a.ldx("W", R8, R6, SKB_DATA_END)
    a.mov64_reg(R2, R7)
    a.alu64_imm("ADD", R2, ETH_HLEN + 20)
    a.jmp_reg("JGT", R2, R8, "pass")
    if ingress and gateway_mac is not None:
        gw = _mac(gateway_mac, "gateway_mac")
        a.ldx("W", R2, R7, 0)
        a.jmp32_imm("JNE", R2, int.from_bytes(gw[:4], sys.byteorder), "pass")
        a.ldx("H", R2, R7, 4)
        a.jmp32_imm("JNE", R2, int.from_bytes(gw[4:], sys.byteorder), "pass")
    a.ldx("H", R2, R7, 12)                       # EtherType


def emit_verdicts(a: Assembler, hook: Hook, counters_map_fd: int | None) -> None:
    """The exits: ``encap_done`` and ``direct_done`` (r7 holds the verdict), ``pass``,
    ``punt`` and ``drop``, each counted when there is a counters map."""
    _verdict(a, "encap_done", Counter.ENCAPSULATED, None, hook,
             counters_map_fd)
    _verdict(a, "direct_done", Counter.DIRECT, None, hook, counters_map_fd)
    _verdict(a, "pass", Counter.PASSED, TC_ACT_OK, hook, counters_map_fd)
    _verdict(a, "punt", Counter.PUNTED, TC_ACT_OK, hook, counters_map_fd)
    _verdict(a, "drop", Counter.DROPPED, TC_ACT_SHOT, hook, counters_map_fd)
    if counters_map_fd is not None:
        a.label("account")
        emit_increment(a, counters_map_fd, STACK_KEY, "out")
        a.mov64_reg(R0, R7)
        a.exit()


def _verdict(a: Assembler, label: str, counter: Counter, retval: int | None,
             hook: Hook, map_fd: int | None) -> None:
    """One exit path: set the return value (None: it is already in r7),
    count it if there is a map, and return. Skipped when nothing jumps to
    it (the verifier rejects unreachable instructions)."""
    if label != "encap_done" and not a.referenced(label):
        return
    a.label(label)
    if map_fd is None:
        if retval is None:
            a.mov64_reg(R0, R7)
        else:
            a.mov64_imm(R0, retval)
        a.exit()
        return
    if retval is not None:
        a.mov64_imm(R7, retval)
    a.st_imm("W", FP, STACK_KEY, counter_key(hook, counter))
    a.ja("account")
