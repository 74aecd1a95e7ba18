"""The Fan address mapping: which slice of the overlay each underlay host owns.

A host's bits of its underlay address are placed right after the overlay
prefix (FACTS.md section 1), so any node can compute any other node's slice,
and any overlay address's owner, with no shared state. Everything here is
pure arithmetic on 32-bit integers; netaddr only parses and presents.

Decisions worth knowing:

- The underlay's network and broadcast addresses are refused as hosts. No
  real node can hold them, and their slices are the overlay's first and last,
  whose edges are the overlay's own network and broadcast addresses. The
  reverse map refuses addresses in those two slices for the same reason.
- Underlays longer than /30 (a /31 or /32) are refused: a fan over one or two
  addresses is almost always a VIP or loopback picked by mistake (a known
  Fan complaint), and it would leave no room for the rule above.
- An overlay given with host bits set (`250.1.0.0/8`) is refused rather than
  silently truncated, because the two readings differ; an underlay may carry
  a host address (`172.30.0.28/16`), since that is how nodes report it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from netaddr import AddrFormatError, IPAddress, IPNetwork

__all__ = ["FanMap", "FanMapError", "parse_host"]

_ALL_ONES = 0xFFFFFFFF
# Slices need a network address, a broadcast address, the host's reserved
# addresses and at least one pod, so nothing longer than /30 can work.
MAX_SLICE_PREFIXLEN = 30
MAX_UNDERLAY_PREFIXLEN = 30

# Ranges an overlay can never use (FACTS.md section 1). 240.0.0.0/4 is
# deliberately absent: it is the recommended home for an overlay.
_UNUSABLE_OVERLAY_RANGES: tuple[tuple[IPNetwork, str], ...] = (
    (IPNetwork("0.0.0.0/8"), "'this network', never a valid destination"),
    (IPNetwork("127.0.0.0/8"), "loopback, never leaves a host"),
    (IPNetwork("224.0.0.0/4"), "multicast, not unicast"),
)


class FanMapError(ValueError):
    """An overlay/underlay/address combination the Fan cannot serve.

    The message is one sentence a person can act on and names the bad value.
    """


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.first <= b.last and b.first <= a.last


def _parse_network(text: object, what: str) -> IPNetwork:
    if not isinstance(text, str):
        raise FanMapError(f"{what} must be a string like 250.0.0.0/8, got {text!r}")
    cleaned = text.strip()
    if "/" not in cleaned:
        raise FanMapError(
            f"{what} {text!r} has no prefix length; write it in CIDR form, "
            f"e.g. {cleaned or '250.0.0.0'}/8"
        )
    try:
        network = IPNetwork(cleaned)
    except (AddrFormatError, ValueError, TypeError):
        raise FanMapError(
            f"{what} {text!r} is not an IPv4 network in CIDR form (like 250.0.0.0/8)"
        ) from None
    if network.version != 4:
        raise FanMapError(f"{what} {text!r} is IPv6; the Fan maps IPv4 only")
    return network


def _as_ipv4(value: IPAddress | str, what: str) -> IPAddress:
    """Accept an IPAddress or its text, so callers can pass either."""
    if isinstance(value, IPAddress):
        address = value
    elif isinstance(value, str):
        try:
            address = IPAddress(value.strip())
        except (AddrFormatError, ValueError, TypeError):
            raise FanMapError(f"{what} {value!r} is not an IPv4 address") from None
    else:
        raise FanMapError(f"{what} must be an IPv4 address, got {value!r}")
    if address.version != 4:
        raise FanMapError(f"{what} {value} is IPv6; the Fan maps IPv4 only")
    return address


@dataclass(frozen=True)
class FanMap:
    """One fan: an overlay prefix spread over the hosts of an underlay network.

    Built once from configuration and then only queried, so it is immutable
    and hashable; every check happens in the constructor so a FanMap that
    exists is one that works.
    """

    overlay: IPNetwork
    underlay: IPNetwork
    host_reserve: int = 1

    # Integer forms, precomputed because the mapping runs per pod and in
    # property tests over many addresses.
    _overlay_first: int = field(init=False, repr=False, compare=False)
    _underlay_first: int = field(init=False, repr=False, compare=False)
    _host_mask: int = field(init=False, repr=False, compare=False)
    _pod_bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        overlay, underlay, host_reserve = self.overlay, self.underlay, self.host_reserve
        for value, what in ((overlay, "overlay"), (underlay, "underlay")):
            if not isinstance(value, IPNetwork):
                raise FanMapError(f"{what} must be a netaddr.IPNetwork, got {value!r}")
            if value.version != 4:
                raise FanMapError(f"{what} {value} is IPv6; the Fan maps IPv4 only")
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
        for unusable, why in _UNUSABLE_OVERLAY_RANGES:
            if _overlaps(overlay, unusable):
                raise FanMapError(
                    f"overlay {overlay} overlaps {unusable} ({why}); "
                    "use part of 240.0.0.0/4, the recommended home for a fan overlay"
                )
        if _overlaps(overlay, underlay):
            raise FanMapError(
                f"overlay {overlay} overlaps underlay {underlay.cidr}; the overlay "
                "must be address space the underlay does not use"
            )
        if underlay.prefixlen > MAX_UNDERLAY_PREFIXLEN:
            raise FanMapError(
                f"underlay {underlay} is a /{underlay.prefixlen}: a fan needs the "
                f"hosts' network (/{MAX_UNDERLAY_PREFIXLEN} or shorter); a /32 is "
                "usually a VIP or loopback address, not the node's network"
            )
        slice_prefixlen = overlay.prefixlen + (32 - underlay.prefixlen)
        if slice_prefixlen > MAX_SLICE_PREFIXLEN:
            raise FanMapError(
                f"overlay {overlay} over underlay {underlay.cidr} gives "
                f"/{slice_prefixlen} slices ({overlay.prefixlen} + 32 - "
                f"{underlay.prefixlen}), leaving no room for pods; slices must be "
                f"/{MAX_SLICE_PREFIXLEN} or shorter: use a shorter overlay prefix "
                "or a longer underlay prefix"
            )
        slice_size = 1 << (32 - slice_prefixlen)
        if slice_size - 2 - host_reserve < 1:
            raise FanMapError(
                f"host reserve {host_reserve} leaves no pod addresses in a "
                f"/{slice_prefixlen} slice ({slice_size} addresses minus network, "
                f"broadcast and {host_reserve} reserved)"
            )
        # Fresh copies: netaddr networks are mutable, and a frozen map must not
        # change because a caller later mutates the object it passed in.
        object.__setattr__(self, "overlay", IPNetwork(overlay))
        object.__setattr__(self, "underlay", IPNetwork(underlay.cidr))
        object.__setattr__(self, "_overlay_first", overlay.first)
        object.__setattr__(self, "_underlay_first", underlay.first)
        object.__setattr__(self, "_host_mask", _ALL_ONES >> underlay.prefixlen)
        object.__setattr__(self, "_pod_bits", 32 - slice_prefixlen)

    # -- construction from text -------------------------------------------

    @classmethod
    def parse(cls, overlay: str, underlay: str, host_reserve: int = 1) -> FanMap:
        """Build from configuration text; the underlay may name a host in it."""
        return cls(
            _parse_network(overlay, "overlay"),
            _parse_network(underlay, "underlay").cidr,
            host_reserve,
        )

    @classmethod
    def parse_host(
        cls, overlay: str, underlay: str, host_reserve: int = 1
    ) -> tuple[FanMap, IPAddress]:
        """Build the map and return this node's address from `host/prefix`.

        For callers that learn both from one setting, like `fanctl -u`.
        """
        underlay_network = _parse_network(underlay, "underlay")
        fan = cls(_parse_network(overlay, "overlay"), underlay_network.cidr, host_reserve)
        host = IPAddress(underlay_network.ip)
        if host.value == fan.underlay.first:
            raise FanMapError(
                f"underlay {underlay.strip()} names the network, not a host; give "
                f"this host's address with the prefix, e.g. {IPAddress(fan.underlay.first + 1)}/"
                f"{fan.underlay.prefixlen}"
            )
        fan._host_offset(host)  # refuses the broadcast address with its message
        return fan, host

    # -- sizes ----------------------------------------------------------------

    @property
    def slice_prefixlen(self) -> int:
        """Prefix length of every host's slice: overlay + underlay host bits."""
        return 32 - self._pod_bits

    @property
    def host_bits(self) -> int:
        """Bits that number the underlay hosts (and so the slices)."""
        return 32 - self.underlay.prefixlen

    @property
    def slice_size(self) -> int:
        return 1 << self._pod_bits

    @property
    def capacity(self) -> int:
        """Pods per slice: all but network, broadcast and the host's reserve."""
        return self.slice_size - 2 - self.host_reserve

    # -- forward map: host -> slice -------------------------------------------

    def _host_offset(self, host: IPAddress | str) -> int:
        """The host's number inside the underlay, after refusing bad hosts."""
        address = _as_ipv4(host, "host")
        offset = address.value - self._underlay_first
        if not 0 <= offset <= self._host_mask:
            raise FanMapError(f"host {address} is not in underlay {self.underlay}")
        if offset == 0:
            raise FanMapError(
                f"host {address} is the network address of underlay "
                f"{self.underlay}, which no host can hold"
            )
        if offset == self._host_mask:
            raise FanMapError(
                f"host {address} is the broadcast address of underlay "
                f"{self.underlay}, which no host can hold"
            )
        return offset

    def _slice_first(self, host: IPAddress | str) -> int:
        return self._overlay_first | (self._host_offset(host) << self._pod_bits)

    def slice_for(self, host: IPAddress | str) -> IPNetwork:
        """The overlay slice owned by an underlay host."""
        return IPNetwork((self._slice_first(host), self.slice_prefixlen))

    def gateway_for(self, host: IPAddress | str) -> IPAddress:
        """The fan bridge's address: the first of the host's reserved ones."""
        return IPAddress(self._slice_first(host) + 1)

    def reserved_for(self, host: IPAddress | str) -> list[IPAddress]:
        """Addresses the host keeps for itself (gateway first); never pods."""
        first = self._slice_first(host) + 1
        return [IPAddress(first + i) for i in range(self.host_reserve)]

    def first_pod(self, host: IPAddress | str) -> IPAddress:
        return IPAddress(self._slice_first(host) + 1 + self.host_reserve)

    def last_pod(self, host: IPAddress | str) -> IPAddress:
        """The last usable address, just before the slice's broadcast."""
        return IPAddress(self._slice_first(host) + self.slice_size - 2)

    def pod_address(self, host: IPAddress | str, index: int) -> IPAddress:
        """The index-th pod address of the host's slice (0 is the first pod)."""
        first = self._slice_first(host)
        if isinstance(index, bool) or not isinstance(index, int):
            raise FanMapError(f"pod index must be a whole number, got {index!r}")
        if not 0 <= index < self.capacity:
            raise FanMapError(
                f"pod index {index} is out of range: a /{self.slice_prefixlen} "
                f"slice holds {self.capacity} pods (indices 0 to {self.capacity - 1})"
            )
        return IPAddress(first + 1 + self.host_reserve + index)

    def pod_index(self, host: IPAddress | str, address: IPAddress | str) -> int:
        """Inverse of pod_address; refuses anything that is not a pod address."""
        first = self._slice_first(host)
        pod = _as_ipv4(address, "pod address")
        index = pod.value - (first + 1 + self.host_reserve)
        if not 0 <= index < self.capacity:
            slice_text = f"{IPAddress(first)}/{self.slice_prefixlen}"
            if not first <= pod.value < first + self.slice_size:
                why = f"is not in slice {slice_text}"
            elif pod.value == first:
                why = f"is the network address of slice {slice_text}"
            elif pod.value == first + self.slice_size - 1:
                why = f"is the broadcast address of slice {slice_text}"
            else:
                why = f"is reserved for the host in slice {slice_text}"
            raise FanMapError(f"{pod} is not a pod address: it {why}")
        return index

    # -- integer forms, for loops over every host of the underlay ------------

    def host_ints(self) -> range:
        """Every address a host of the underlay can hold, as integers (not the
        network or broadcast address)."""
        return range(self._underlay_first + 1, self._underlay_first + self._host_mask)

    def slice_and_gateway_ints(self, host: int) -> tuple[int, int]:
        """`slice_for(host)`'s network address and `gateway_for(host)`, as
        integers, for an integer from `host_ints()` (not checked again: this
        runs once per peer of a whole underlay)."""
        first = self._overlay_first | ((host - self._underlay_first) << self._pod_bits)
        return first, first + 1

    # -- reverse map: overlay address -> host ---------------------------------

    def contains(self, overlay_address: IPAddress | str) -> bool:
        """Whether an address is in the overlay; IPv6 simply is not.

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
        return address.version == 4 and (
            self.overlay.first <= address.value <= self.overlay.last
        )

    def underlay_host_for(self, overlay_address: IPAddress | str) -> IPAddress:
        """Which underlay host owns an overlay address (the per-packet map).

        Addresses in the slices of the underlay's network or broadcast address
        are refused: no host can own them (see the module docstring).
        """
        address = _as_ipv4(overlay_address, "overlay address")
        if not self.overlay.first <= address.value <= self.overlay.last:
            raise FanMapError(f"{address} is not in overlay {self.overlay}")
        offset = (address.value - self._overlay_first) >> self._pod_bits
        host = IPAddress(self._underlay_first | offset)
        if offset == 0 or offset == self._host_mask:
            which = "network" if offset == 0 else "broadcast"
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
