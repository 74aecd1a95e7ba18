"""The Fan address mapping: which slice of the overlay each underlay host owns.

A host's bits of its underlay address are placed right after the overlay
prefix (FACTS.md section 1), so any node can compute any other node's slice,
and any overlay address's owner, with no shared state. The rule is the same
in both address families: slice prefix length = overlay prefix length +
(underlay address width - underlay prefix length). Everything here is pure
arithmetic on integers; netaddr only parses and presents.

Combinations: an IPv4 overlay over an IPv4 underlay (the Fan as it always
was); an IPv6 overlay over an IPv4 underlay (dual-stack nodes: the node's
IPv4 address names its IPv6 slice, `172.30.0.28/16` under `fd50::/48` owns
`fd50:0:0:1c::/64`); an IPv6 overlay over an IPv6 underlay (IPv6-only
clusters). An IPv4 overlay over an IPv6 underlay is refused: IPv4 slices are
named by the nodes' IPv4 addresses, and a node without one has no IPv4 pods
to serve. Recommended: an IPv6 overlay in the unique local range fd00::/8,
sized to give /64 slices.

Decisions worth knowing:

- The underlay's first and last addresses are refused as hosts (IPv4's
  network and broadcast addresses; IPv6's subnet-router anycast address and
  the all-ones address, one of the reserved subnet anycast addresses of
  RFC 2526). Their slices are the overlay's first and last, and the datapath
  uses the first one's addresses as a next hop no node can own
  (docs/datapath.md). The reverse map refuses addresses in those two slices.
- The same two addresses of every slice are never pods, in both families:
  the first (IPv4 network address, IPv6 subnet-router anycast) and the last
  (IPv4 broadcast; in IPv6 the all-ones address, again RFC 2526 anycast). So
  a pod's address is slice start + 1 + host reserve + index in either
  family and the capacity is the slice size minus 2 minus the reserve: a
  dual-stack pod's two addresses have the same index (IPv4 `.5` pairs with
  IPv6 `::5`). One unused address in at least 256 costs nothing; when both
  families share a config, the IPv6 range is the one to cap to the IPv4
  range's size (the caller's job, not the map's).
- Underlays longer than /30 (IPv4) or /126 (IPv6) are refused: a fan over
  one or two addresses is almost always a VIP or loopback picked by mistake
  (a known Fan complaint), and it would leave no room for the rule above.
- IPv4 slices must be /30 or shorter (room for pods at all); IPv6 slices
  /120 or shorter, at least the 256 addresses of the usual IPv4 /24 slice,
  since a longer one means a mistaken prefix in a family with space to spare.
- An overlay given with host bits set (`250.1.0.0/8`) is refused rather than
  silently truncated, because the two readings differ; an underlay may carry
  a host address (`172.30.0.28/16`), since that is how nodes report it.
"""
from __future__ import annotations

from typing import NamedTuple

from netaddr import AddrFormatError, IPAddress, IPNetwork

from cni_fan.frozen import Frozen

__all__ = ["FanMap", "FanMapError", "parse_host"]

# Slices need a network address, a broadcast address, the host's reserved
# addresses and at least one pod, so nothing longer than /30 can work.
MAX_SLICE_PREFIXLEN = 30
MAX_UNDERLAY_PREFIXLEN = 30
# IPv6: see the module docstring.
MAX_SLICE_PREFIXLEN6 = 120
MAX_UNDERLAY_PREFIXLEN6 = 126


class _Family(NamedTuple):
    """What the Fan allows, and what it calls things, in one address family."""

    version: int
    name: str
    width: int
    max_slice_prefixlen: int
    max_underlay_prefixlen: int
    first_name: str  # the first address of a network, never a host or pod
    last_name: str  # the last one
    example_network: str
    example_prefixlen: int
    unusable_overlays: tuple[tuple[IPNetwork, str], ...]
    overlay_home: str

    @property
    def all_ones(self) -> int:
        return (1 << self.width) - 1


_IPV4 = _Family(
    version=4, name="IPv4", width=32,
    max_slice_prefixlen=MAX_SLICE_PREFIXLEN, max_underlay_prefixlen=MAX_UNDERLAY_PREFIXLEN,
    first_name="network", last_name="broadcast",
    example_network="250.0.0.0/8", example_prefixlen=8,
    # Ranges an overlay can never use (FACTS.md section 1). 240.0.0.0/4 is
    # deliberately absent: it is the recommended home for an overlay.
    unusable_overlays=(
        (IPNetwork("0.0.0.0/8"), "'this network', never a valid destination"),
        (IPNetwork("127.0.0.0/8"), "loopback, never leaves a host"),
        (IPNetwork("224.0.0.0/4"), "multicast, not unicast"),
    ),
    overlay_home="use part of 240.0.0.0/4, the recommended home for a fan overlay",
)
_IPV6 = _Family(
    version=6, name="IPv6", width=128,
    max_slice_prefixlen=MAX_SLICE_PREFIXLEN6, max_underlay_prefixlen=MAX_UNDERLAY_PREFIXLEN6,
    first_name="subnet-router anycast", last_name="all-ones anycast",
    example_network="fd50::/48", example_prefixlen=48,
    # RFC 4291 section 2.4; fd00::/8 (unique local, RFC 4193) is the home.
    unusable_overlays=(
        (IPNetwork("::/128"), "the unspecified address, never a valid destination"),
        (IPNetwork("::1/128"), "loopback, never leaves a host"),
        (IPNetwork("::ffff:0:0/96"), "IPv4-mapped, which stands for IPv4 peers"),
        (IPNetwork("fe80::/10"), "link-local, never routed off a link"),
        (IPNetwork("ff00::/8"), "multicast, not unicast"),
    ),
    overlay_home=("use part of fd00::/8 (unique local addresses), the recommended home "
                  "for an IPv6 fan overlay"),
)
_FAMILIES = {4: _IPV4, 6: _IPV6}


class FanMapError(ValueError):
    """An overlay/underlay/address combination the Fan cannot serve.

    The message is one sentence a person can act on and names the bad value.
    """


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.first <= b.last and b.first <= a.last


def _parse_network(text: object, what: str) -> IPNetwork:
    if not isinstance(text, str):
        raise FanMapError(f"{what} must be a string like 250.0.0.0/8, got {text!r}")
    cleaned = text.strip()
    family = _IPV6 if ":" in cleaned else _IPV4
    if "/" not in cleaned:
        raise FanMapError(
            f"{what} {text!r} has no prefix length; write it in CIDR form, "
            f"e.g. {cleaned or '250.0.0.0'}/{family.example_prefixlen}"
        )
    try:
        network = IPNetwork(cleaned)
    except (AddrFormatError, ValueError, TypeError):
        network = None
    if network is None or network.version != family.version:
        raise FanMapError(
            f"{what} {text!r} is not an {family.name} network in CIDR form "
            f"(like {family.example_network})"
        )
    return network


def _mixed_families(underlay: str, overlay: str) -> FanMapError:
    return FanMapError(
        f"underlay {underlay} is IPv6 but overlay {overlay} is IPv4: an IPv4 overlay "
        "is named by the nodes' IPv4 addresses, so give the nodes' IPv4 network as the "
        f"underlay, or an IPv6 overlay (like {_IPV6.example_network}) for an IPv6-only cluster"
    )


def _parse_pair(overlay: str, underlay: str) -> tuple[IPNetwork, IPNetwork]:
    """Both networks from text (the underlay may carry a host address)."""
    overlay_network = _parse_network(overlay, "overlay")
    underlay_network = _parse_network(underlay, "underlay")
    if underlay_network.version == 6 and overlay_network.version == 4:
        raise _mixed_families(repr(underlay), repr(overlay))
    return overlay_network, underlay_network


def _as_address(value: IPAddress | str, what: str, side: str, network: IPNetwork) -> IPAddress:
    """Accept an IPAddress or its text, of the family of `network` (the fan's
    `side`, named in the message when the family is wrong)."""
    family = _FAMILIES[network.version]
    if isinstance(value, IPAddress):
        address = value
    elif isinstance(value, str):
        try:
            address = IPAddress(value.strip())
        except (AddrFormatError, ValueError, TypeError):
            raise FanMapError(f"{what} {value!r} is not an {family.name} address") from None
    else:
        raise FanMapError(f"{what} must be an {family.name} address, got {value!r}")
    if address.version != family.version:
        raise FanMapError(
            f"{what} {value} is {_FAMILIES[address.version].name}; this fan's {side} "
            f"{network} is {family.name}"
        )
    return address


class FanMap(Frozen):
    """One fan: an overlay prefix spread over the hosts of an underlay network.

    Built once from configuration and then only queried, so it is immutable
    and hashable; every check happens in the constructor so a FanMap that
    exists is one that works.
    """

    # After the three fields, integer forms, precomputed because the mapping
    # runs per pod and in property tests over many addresses.
    __slots__ = ("overlay", "underlay", "host_reserve", "_overlay_first", "_underlay_first", "_host_mask",
                 "_pod_bits", "_overlay_family", "_underlay_family")
    ARGS = ("overlay", "underlay", "host_reserve")
    overlay: IPNetwork
    underlay: IPNetwork
    host_reserve: int
    _overlay_first: int
    _underlay_first: int
    _host_mask: int
    _pod_bits: int
    _overlay_family: _Family
    _underlay_family: _Family

    def __init__(self, overlay: IPNetwork, underlay: IPNetwork, host_reserve: int = 1) -> None:
        for value, what in ((overlay, "overlay"), (underlay, "underlay")):
            if not isinstance(value, IPNetwork):
                raise FanMapError(f"{what} must be a netaddr.IPNetwork, got {value!r}")
        if underlay.version == 6 and overlay.version == 4:
            raise _mixed_families(str(underlay), str(overlay))
        family, underlay_family = _FAMILIES[overlay.version], _FAMILIES[underlay.version]
        if isinstance(host_reserve, bool) or not isinstance(host_reserve, int):
            raise FanMapError(f"host reserve must be a whole number, got {host_reserve!r}")
        if host_reserve < 1:
            raise FanMapError(
                f"host reserve {host_reserve} is below 1; the host needs at least "
                "one address in its slice for the fan bridge (the pods' gateway)"
            )
        if overlay.value != overlay.first:
            raise FanMapError(
                f"overlay {overlay} has host bits set; did you mean {overlay.cidr}?"
            )
        for unusable, why in family.unusable_overlays:
            if _overlaps(overlay, unusable):
                raise FanMapError(f"overlay {overlay} overlaps {unusable} ({why}); {family.overlay_home}")
        if _overlaps(overlay, underlay):
            raise FanMapError(
                f"overlay {overlay} overlaps underlay {underlay.cidr}; the overlay "
                "must be address space the underlay does not use"
            )
        if underlay.prefixlen > underlay_family.max_underlay_prefixlen:
            raise FanMapError(
                f"underlay {underlay} is a /{underlay.prefixlen}: a fan needs the "
                f"hosts' network (/{underlay_family.max_underlay_prefixlen} or shorter); "
                f"a /{underlay_family.width} is usually a VIP or loopback address, not the node's network"
            )
        host_bits = underlay_family.width - underlay.prefixlen
        slice_prefixlen = overlay.prefixlen + host_bits
        if slice_prefixlen > family.max_slice_prefixlen:
            room = ("leaving no room for pods" if family is _IPV4
                    else "fewer than the 256 addresses of an IPv4 /24 slice")
            raise FanMapError(
                f"overlay {overlay} over underlay {underlay.cidr} gives "
                f"/{slice_prefixlen} slices ({overlay.prefixlen} + {underlay_family.width} - "
                f"{underlay.prefixlen}), {room}; slices must be "
                f"/{family.max_slice_prefixlen} or shorter: use a shorter overlay prefix "
                "or a longer underlay prefix"
            )
        slice_size = 1 << (family.width - slice_prefixlen)
        if slice_size - 2 - host_reserve < 1:
            raise FanMapError(
                f"host reserve {host_reserve} leaves no pod addresses in a "
                f"/{slice_prefixlen} slice ({slice_size} addresses minus {family.first_name}, "
                f"{family.last_name} and {host_reserve} reserved)"
            )
        # Fresh copies: netaddr networks are mutable, and a frozen map must not
        # change because a caller later mutates the object it passed in.
        self._set(host_reserve=host_reserve, overlay=IPNetwork(overlay), underlay=IPNetwork(underlay.cidr),
                  _overlay_first=overlay.first, _underlay_first=underlay.first,
                  _host_mask=underlay_family.all_ones >> underlay.prefixlen,
                  _pod_bits=family.width - slice_prefixlen, _overlay_family=family,
                  _underlay_family=underlay_family)

    # -- construction from text -------------------------------------------

    @classmethod
    def parse(cls, overlay: str, underlay: str, host_reserve: int = 1) -> FanMap:
        """Build from configuration text; the underlay may name a host in it."""
        overlay_network, underlay_network = _parse_pair(overlay, underlay)
        return cls(overlay_network, underlay_network.cidr, host_reserve)

    @classmethod
    def parse_host(
        cls, overlay: str, underlay: str, host_reserve: int = 1
    ) -> tuple[FanMap, IPAddress]:
        """Build the map and return this node's address from `host/prefix`.

        For callers that learn both from one setting, like `fanctl -u`.
        """
        overlay_network, underlay_network = _parse_pair(overlay, underlay)
        fan = cls(overlay_network, underlay_network.cidr, host_reserve)
        host = IPAddress(underlay_network.ip)
        if host.value == fan.underlay.first:
            example = IPAddress(fan.underlay.first + 1, fan.underlay.version)
            raise FanMapError(
                f"underlay {underlay.strip()} names the network, not a host; give "
                f"this host's address with the prefix, e.g. {example}/{fan.underlay.prefixlen}"
            )
        fan._host_offset(host)  # refuses the last address with its message
        return fan, host

    # -- sizes ----------------------------------------------------------------

    @property
    def slice_prefixlen(self) -> int:
        """Prefix length of every host's slice: overlay + underlay host bits."""
        return self._overlay_family.width - self._pod_bits

    @property
    def host_bits(self) -> int:
        """Bits that number the underlay hosts (and so the slices)."""
        return self._underlay_family.width - self.underlay.prefixlen

    @property
    def slice_size(self) -> int:
        return 1 << self._pod_bits

    @property
    def capacity(self) -> int:
        """Pods per slice: all but the first, the last and the host's reserve."""
        return self.slice_size - 2 - self.host_reserve

    # -- forward map: host -> slice -------------------------------------------

    def _overlay_address(self, value: int) -> IPAddress:
        return IPAddress(value, self._overlay_family.version)

    def _host_offset(self, host: IPAddress | str) -> int:
        """The host's number inside the underlay, after refusing bad hosts."""
        address = _as_address(host, "host", "underlay", self.underlay)
        offset = address.value - self._underlay_first
        if not 0 <= offset <= self._host_mask:
            raise FanMapError(f"host {address} is not in underlay {self.underlay}")
        if offset == 0 or offset == self._host_mask:
            family = self._underlay_family
            which = family.first_name if offset == 0 else family.last_name
            raise FanMapError(
                f"host {address} is the {which} address of underlay "
                f"{self.underlay}, which no host can hold"
            )
        return offset

    def _slice_first(self, host: IPAddress | str) -> int:
        return self._overlay_first | (self._host_offset(host) << self._pod_bits)

    def slice_for(self, host: IPAddress | str) -> IPNetwork:
        """The overlay slice owned by an underlay host."""
        first = self._slice_first(host)
        return IPNetwork((first, self.slice_prefixlen), version=self._overlay_family.version)

    def gateway_for(self, host: IPAddress | str) -> IPAddress:
        """The fan bridge's address: the first of the host's reserved ones."""
        return self._overlay_address(self._slice_first(host) + 1)

    def reserved_for(self, host: IPAddress | str) -> list[IPAddress]:
        """Addresses the host keeps for itself (gateway first); never pods."""
        first = self._slice_first(host) + 1
        return [self._overlay_address(first + i) for i in range(self.host_reserve)]

    def first_pod(self, host: IPAddress | str) -> IPAddress:
        return self._overlay_address(self._slice_first(host) + 1 + self.host_reserve)

    def last_pod(self, host: IPAddress | str) -> IPAddress:
        """The last usable address, just before the slice's last (broadcast in IPv4)."""
        return self._overlay_address(self._slice_first(host) + self.slice_size - 2)

    def pod_address(self, host: IPAddress | str, index: int) -> IPAddress:
        """The index-th pod address of the host's slice (0 is the first pod);
        the same index gives the same offset in the slice in both families."""
        first = self._slice_first(host)
        if isinstance(index, bool) or not isinstance(index, int):
            raise FanMapError(f"pod index must be a whole number, got {index!r}")
        if not 0 <= index < self.capacity:
            raise FanMapError(
                f"pod index {index} is out of range: a /{self.slice_prefixlen} "
                f"slice holds {self.capacity} pods (indices 0 to {self.capacity - 1})"
            )
        return self._overlay_address(first + 1 + self.host_reserve + index)

    def pod_index(self, host: IPAddress | str, address: IPAddress | str) -> int:
        """Inverse of pod_address; refuses anything that is not a pod address."""
        first = self._slice_first(host)
        family = self._overlay_family
        pod = _as_address(address, "pod address", "overlay", self.overlay)
        index = pod.value - (first + 1 + self.host_reserve)
        if not 0 <= index < self.capacity:
            slice_text = f"{self._overlay_address(first)}/{self.slice_prefixlen}"
            if not first <= pod.value < first + self.slice_size:
                why = f"is not in slice {slice_text}"
            elif pod.value == first:
                why = f"is the {family.first_name} address of slice {slice_text}"
            elif pod.value == first + self.slice_size - 1:
                why = f"is the {family.last_name} address of slice {slice_text}"
            else:
                why = f"is reserved for the host in slice {slice_text}"
            raise FanMapError(f"{pod} is not a pod address: it {why}")
        return index

    # -- integer forms, for loops over every host of the underlay ------------

    def host_ints(self) -> range:
        """Every address a host of the underlay can hold, as integers (not the
        first or last address)."""
        return range(self._underlay_first + 1, self._underlay_first + self._host_mask)

    def slice_and_gateway_ints(self, host: int) -> tuple[int, int]:
        """`slice_for(host)`'s network address and `gateway_for(host)`, as
        integers, for an integer from `host_ints()` (not checked again: this
        runs once per peer of a whole underlay)."""
        first = self._overlay_first | ((host - self._underlay_first) << self._pod_bits)
        return first, first + 1

    # -- reverse map: overlay address -> host ---------------------------------

    def contains(self, overlay_address: IPAddress | str) -> bool:
        """Whether an address is in the overlay; one of the other family simply
        is not.

        Text that is no address at all still raises: that is a caller's bug,
        not a "no".
        """
        address = overlay_address
        if isinstance(address, str):
            try:
                address = IPAddress(address.strip())
            except (AddrFormatError, ValueError, TypeError):
                address = None
        if not isinstance(address, IPAddress):
            raise FanMapError(f"overlay address {overlay_address!r} is not an IP address")
        return address.version == self.overlay.version and (
            self.overlay.first <= address.value <= self.overlay.last
        )

    def underlay_host_for(self, overlay_address: IPAddress | str) -> IPAddress:
        """Which underlay host owns an overlay address (the per-packet map);
        the host is of the underlay's family, whatever the overlay's.

        Addresses in the slices of the underlay's first or last address are
        refused: no host can own them (see the module docstring).
        """
        address = _as_address(overlay_address, "overlay address", "overlay", self.overlay)
        if not self.overlay.first <= address.value <= self.overlay.last:
            raise FanMapError(f"{address} is not in overlay {self.overlay}")
        offset = (address.value - self._overlay_first) >> self._pod_bits
        family = self._underlay_family
        host = IPAddress(self._underlay_first | offset, family.version)
        if offset == 0 or offset == self._host_mask:
            which = family.first_name if offset == 0 else family.last_name
            raise FanMapError(
                f"{address} maps to {host}, the {which} address of underlay "
                f"{self.underlay}, so no host owns it"
            )
        return host


def parse_host(
    overlay: str, underlay: str, host_reserve: int = 1
) -> tuple[FanMap, IPAddress]:
    """Module-level alias of FanMap.parse_host for callers that prefer it."""
    return FanMap.parse_host(overlay, underlay, host_reserve)
