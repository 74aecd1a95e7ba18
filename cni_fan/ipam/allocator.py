"""Which address to hand out next: pure policy, no I/O.

Round-robin: the search starts just after the address handed out last and
wraps around at the end of the range. An address that was just released is
therefore the *last* candidate, not the first. Reusing it at once would give
the new pod an address that other pods still have in their ARP caches and
conntrack entries, so their packets (replies to old connections, cached
neighbour entries) would reach the wrong pod. Cycling through the whole range
first gives those entries time to expire.

A range may be an IPv6 /64 slice (about 2^64 addresses), so nothing here
enumerates or sizes it with `len()`: the search walks only from the last
address handed out to the next free one, which is at most as many steps as
there are taken addresses plus one.

The store and the pool decide *what* is taken; this module only decides
*which* free address comes next.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from netaddr import IPAddress

from cni_fan.frozen import Frozen


class AddressRange(Frozen):
    """An inclusive range of one family, the pod range of one node's Fan slice.

    Addresses that must never be handed out (network, gateway, broadcast)
    are outside it: the caller computes the range without them. There is no
    `len()`: Python's len must fit in ssize_t and an IPv6 range does not;
    use `size`.
    """

    __slots__ = ("first", "last")
    ARGS = ("first", "last")
    first: IPAddress
    last: IPAddress

    def __init__(self, first: IPAddress, last: IPAddress) -> None:
        for name, value in (("first", first), ("last", last)):
            if not isinstance(value, IPAddress) or value.version not in (4, 6):
                raise ValueError(f"range {name} must be an IPv4 or IPv6 address, got {value!r}")
        if first.version != last.version:
            raise ValueError(f"range {first}-{last} mixes IPv4 and IPv6")
        if first > last:
            raise ValueError(f"empty range: first {first} is after last {last}")
        self._set(first=first, last=last)

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.first.version

    @property
    def size(self) -> int:
        """How many addresses the range holds (an int of any size: 2^64 for a /64)."""
        return int(self.last) - int(self.first) + 1

    def __contains__(self, addr: object) -> bool:
        return (
            isinstance(addr, IPAddress)
            and addr.version == self.version
            and self.first <= addr <= self.last
        )

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def cyclic_order(rng: AddressRange, last_reserved: IPAddress | None) -> Iterator[int]:
    """Integer addresses of `rng`, starting after `last_reserved`, wrapping once (lazily)."""
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


def free_in_order(
    rng: AddressRange,
    taken: Collection[IPAddress],
    last_reserved: IPAddress | None,
) -> Iterator[IPAddress]:
    """The free addresses of `rng` in cyclic order after `last_reserved`, lazily.

    `taken` may hold addresses outside the range or of the other family
    (records from an older range); they are simply never candidates. The
    caller takes as many as it needs; none are produced ahead.
    """
    taken_ints = {int(a) for a in taken if a.version == rng.version}
    for candidate in cyclic_order(rng, last_reserved):
        if candidate not in taken_ints:
            yield IPAddress(candidate, rng.version)


def next_free(
    rng: AddressRange,
    taken: Collection[IPAddress],
    last_reserved: IPAddress | None,
) -> IPAddress | None:
    """The first free address after `last_reserved` in cyclic order, or None when full."""
    return next(free_in_order(rng, taken, last_reserved), None)


def is_free(rng: AddressRange, taken: Collection[IPAddress], addr: IPAddress) -> bool:
    """Whether a requested (static) address may be handed out: in range and not taken."""
    return addr in rng and addr not in taken
