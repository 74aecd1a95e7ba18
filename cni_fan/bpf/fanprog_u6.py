"""The Fan program for an IPv6-only cluster: inner IPv6 over an IPv6 underlay.

Pure: builds instruction bytes from :class:`Underlay6DatapathParams`, as
:mod:`.fanprog` does for the IPv4 underlay. The node's IPv6 underlay
address names its slice of ``overlay6`` (the same rule: the host bits go
right after the overlay prefix), so ``fd00:198:18::1c`` in
``fd00:198:18::/112`` owns ``fd50:0:0:1c::/64`` under ``fd50::/48``.

The inner side is :mod:`.fanprog6`'s IPv6 branch unchanged (classify, map,
router duties on ingress); the outer side is :mod:`.vxlanencap6` (outer
IPv6/UDP/VXLAN, 70 bytes, zero UDP checksum). The outer destination is the
underlay network with the host field of the inner destination in its low
bits; with at most 32 host bits that is one computed 32-bit word and three
constant ones.

An IPv6-only cluster has no IPv4 overlay, so inner IPv4 frames are "not
ours" here exactly as IPv4 outside the overlay is in :mod:`.fanprog`:
returned to the kernel untouched and counted as passed.

Not used by the node agent yet (docs/datapath.md, "Outer IPv6").
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .direct import emit_direct
from .fanprog import Counter, Hook, check_segment, check_tunnel_fields, counter_key, emit_prologue, emit_verdicts
from .fanprog6 import ETH_P_IPV6, check_overlay6, emit_ipv6, host_bits_of, local_slice6, outer_destination6
from .insn import R2, Assembler
from .nexthop import segment_word
from .vxlanencap import ETH_HLEN, STACK_PROTO, STACK_TOS, ne
from .vxlanencap6 import ENCAP_OVERHEAD6, address_words, emit_vxlan_encap6, overlay_mtu6

__all__ = ["Underlay6DatapathParams", "build_underlay6_program", "outer_destination_u6",
           "ENCAP_OVERHEAD6", "overlay_mtu6", "MAX_HOST_BITS6"]

# The program computes one 32-bit word of the outer address.
MAX_HOST_BITS6 = 32
# FanMap refuses longer IPv6 underlays: a /127 or /128 is a link or a VIP.
MAX_UNDERLAY_PREFIXLEN6 = 126


@dataclass(frozen=True)
class Underlay6DatapathParams:
    """One IPv6-only node's program parameters; all constant per node.

    The fields mean what they mean in :class:`.fanprog.FanDatapathParams`,
    with ``underlay`` and ``local_underlay`` IPv6 and ``overlay6`` the only
    overlay. ``overlay_mtu`` (ingress) is normally
    :func:`overlay_mtu6` of the underlay's MTU. ``segment`` and ``direct``:
    as there (the peer's MAC from an IPv6 FIB lookup).
    """

    overlay6: ipaddress.IPv6Network
    underlay: ipaddress.IPv6Network
    local_underlay: ipaddress.IPv6Address
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
    segment: ipaddress.IPv6Network | None = None
    direct: bool = False
    _tunnel_mac: bytes = field(init=False, repr=False, compare=False)
    _inner_src_mac: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "underlay", _ipv6_network(self.underlay, "underlay"))
        try:
            set_(self, "local_underlay", ipaddress.IPv6Address(self.local_underlay))
        except ValueError as exc:
            raise ValueError(f"local_underlay {self.local_underlay!r} is not an IPv6 address: {exc}") from None
        set_(self, "hook", Hook(self.hook))
        if self.host_bits > MAX_HOST_BITS6:
            raise ValueError(
                f"underlay {self.underlay} leaves {self.host_bits} host bits; the program maps at most "
                f"{MAX_HOST_BITS6} (an underlay of /{128 - MAX_HOST_BITS6} or longer, e.g. the nodes' /104 "
                "or /112 rather than their /64)")
        if self.underlay.prefixlen > MAX_UNDERLAY_PREFIXLEN6:
            raise ValueError(f"underlay {self.underlay} is a link or a single address, not the "
                             f"nodes' network (/{MAX_UNDERLAY_PREFIXLEN6} is the longest)")
        if self.local_underlay not in self.underlay:
            raise ValueError(f"{self.local_underlay} is not in {self.underlay}")
        if self.local_underlay in (self.underlay.network_address, self.underlay.broadcast_address):
            raise ValueError(f"{self.local_underlay} is not a host address of {self.underlay}")
        set_(self, "overlay6", check_overlay6(self.overlay6, self.host_bits))
        if self.overlay6.overlaps(self.underlay):
            raise ValueError(f"overlay6 {self.overlay6} overlaps the underlay {self.underlay}")
        if self.decrement_ttl is None:
            set_(self, "decrement_ttl", self.hook is Hook.INGRESS)
        if self.decrement_ttl and self.hook is not Hook.INGRESS:
            raise ValueError("hop limit decrement only belongs on the ingress hook: "
                             "on egress the kernel has already forwarded")
        check_tunnel_fields(self, min_mtu=1280)
        check_segment(self, ipaddress.IPv6Network)

    # -- derived ------------------------------------------------------------
    @property
    def host_bits(self) -> int:
        """Bits of the underlay address that name a host (= slice bits)."""
        return host_bits_of(self.underlay)

    @property
    def local_slice6(self) -> ipaddress.IPv6Network:
        return local_slice6(self.overlay6, self.underlay, self.local_underlay)

    @property
    def destination_prefix(self) -> tuple[int, int, int]:
        """The outer destination's three constant words (the underlay's)."""
        first, second, third, _ = address_words(self.underlay.network_address)
        return first, second, third


def _ipv6_network(value: object, what: str) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r} is not an IPv6 network: {exc}") from None


def outer_destination_u6(params: Underlay6DatapathParams,
                         inner_dst: ipaddress.IPv4Address | ipaddress.IPv6Address | str
                         ) -> ipaddress.IPv6Address | None:
    """The underlay host the program sends ``inner_dst`` to, or None when it
    does not encapsulate it (inner IPv4, outside overlay6, the local slice,
    a slice's first or last address, the underlay's first or last address).

    The model the program is tested against: `underlay network | host
    field`, the host field being the bits right after overlay6's prefix.
    """
    addr = ipaddress.ip_address(inner_dst)
    if addr.version == 4:
        return None
    out = outer_destination6(params.overlay6, params.local_slice6, params.underlay, addr)
    assert out is None or isinstance(out, ipaddress.IPv6Address)
    return out


def build_underlay6_program(params: Underlay6DatapathParams,
                            counters_map_fd: int | None = None) -> bytes:
    """The program's instruction bytes, ready for BPF_PROG_LOAD; the
    counters map is the one :func:`.fanprog.build_encap_program` takes
    (same slots, same meaning)."""
    p = params
    a = Assembler()
    emit_prologue(a, p.hook, p.gateway_mac)
    # Inner IPv4 is not ours: an IPv6-only cluster has no IPv4 overlay.
    a.jmp32_imm("JNE", R2, ne(ETH_P_IPV6, 2), "pass")
    emit_ipv6(a, overlay6=p.overlay6, local=p.local_slice6, underlay=p.underlay, eth_hlen=ETH_HLEN,
              ingress=p.hook is Hook.INGRESS, decrement=bool(p.decrement_ttl), overlay_mtu=p.overlay_mtu,
              stack_tos=STACK_TOS, stack_proto=STACK_PROTO)
    if p.direct:
        assert p.segment is not None
        emit_direct(a, segment=segment_word(p.segment), underlay_ifindex=p.underlay_ifindex, prefix_words=p.destination_prefix,
                    fallback_key=counter_key(p.hook, Counter.FALLBACK), map_fd=counters_map_fd)
        a.label("tunnel")
    emit_vxlan_encap6(a, local_underlay=p.local_underlay, destination_prefix=p.destination_prefix,
                      udp_port=p.udp_port, vni=p.vni, tunnel_mac=p._tunnel_mac,
                      inner_src_mac=p._inner_src_mac, underlay_ifindex=p.underlay_ifindex,
                      onlink=p.onlink_underlay)
    emit_verdicts(a, p.hook, counters_map_fd)
    return a.assemble()
