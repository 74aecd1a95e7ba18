"""Which address to hand out next: pure policy, no I/O.

Round-robin: the search starts just after the address handed out last and
wraps around at the end of the range. An address that was just released is
therefore the *last* candidate, not the first. Reusing it at once would give
the new pod an address that other pods still have in their ARP caches and
conntrack entries, so their packets (replies to old connections, cached
neighbour entries) would reach the wrong pod. Cycling through the whole range
first gives those entries time to expire.

The store and the pool decide *what* is taken; this module only decides
*which* free address comes next.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from netaddr import IPAddress


@dataclass(frozen=True)
class AddressRange:
    """An inclusive IPv4 range, the pod range of one node's Fan slice.

    Addresses that must never be handed out (network, gateway, broadcast)
    are outside it: the caller computes the range without them.
    """

    first: IPAddress
    last: IPAddress

    def __post_init__(self) -> None:
        for name, value in (("first", self.first), ("last", self.last)):
            if not isinstance(value, IPAddress) or value.version != 4:
                raise ValueError(f"range {name} must be an IPv4 address, got {value!r}")
        if self.first > self.last:
            raise ValueError(f"empty range: first {self.first} is after last {self.last}")

    def __contains__(self, addr: object) -> bool:
        return (
            isinstance(addr, IPAddress)
            and addr.version == 4
            and self.first <= addr <= self.last
        )

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def _cyclic_order(rng: AddressRange, last_reserved: IPAddress | None) -> Iterator[int]:
    """Integer addresses of `rng`, starting after `last_reserved`, wrapping once."""
    lo, hi = int(rng.first), int(rng.last)
    if last_reserved is not None and last_reserved in rng:
        start = int(last_reserved) + 1
        if start > hi:
            start = lo
    else:
        # Unknown or from an older range (config changed): begin at the start.
        start = lo
    yield from range(start, hi + 1)
    yield from range(lo, start)


def next_free(
    rng: AddressRange,
    taken: Collection[IPAddress],
    last_reserved: IPAddress | None,
) -> IPAddress | None:
    """The first free address after `last_reserved` in cyclic order, or None when full.

    `taken` may hold addresses outside the range (records from an older
    range); they are simply never candidates.
    """
    taken_ints = {int(a) for a in taken}
    for candidate in _cyclic_order(rng, last_reserved):
        if candidate not in taken_ints:
            return IPAddress(candidate, 4)
    return None


def is_free(rng: AddressRange, taken: Collection[IPAddress], addr: IPAddress) -> bool:
    """Whether a requested (static) address may be handed out: in range and not taken."""
    return addr in rng and int(addr) not in {int(a) for a in taken}
