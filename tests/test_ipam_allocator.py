"""The round-robin policy: unit cases and properties over random ranges."""
from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPAddress

from cni_fan.ipam.allocator import AddressRange, is_free, next_free

BASE = int(IPAddress("10.244.3.0"))


def ip(text: str) -> IPAddress:
    return IPAddress(text)


def test_range_validates() -> None:
    with pytest.raises(ValueError, match="empty range"):
        AddressRange(ip("10.0.0.5"), ip("10.0.0.4"))
    with pytest.raises(ValueError, match="mixes IPv4 and IPv6"):
        AddressRange(ip("10.0.0.1"), IPAddress("fd00::5"))
    with pytest.raises(ValueError, match="IPv4 or IPv6"):
        AddressRange("10.0.0.1", ip("10.0.0.5"))  # type: ignore[arg-type]
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.254"))
    assert rng.size == 253 and rng.version == 4
    with pytest.raises(TypeError):
        len(rng)  # type: ignore[arg-type]  # no len(): an IPv6 range does not fit in ssize_t
    assert ip("10.0.0.2") in rng and ip("10.0.0.254") in rng
    assert ip("10.0.0.1") not in rng and ip("10.0.0.255") not in rng
    assert IPAddress("::a00:2") not in rng


def test_range_is_an_immutable_value() -> None:
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.254"))
    assert rng == AddressRange(ip("10.0.0.2"), ip("10.0.0.254")) != AddressRange(ip("10.0.0.2"), ip("10.0.0.253"))
    assert hash(rng) == hash(AddressRange(ip("10.0.0.2"), ip("10.0.0.254")))
    with pytest.raises(AttributeError):
        rng.first = ip("10.0.0.1")  # type: ignore[misc]
    assert copy.deepcopy(rng) == rng and pickle.loads(pickle.dumps(rng)) == rng
    assert repr(rng) == "AddressRange(first=IPAddress('10.0.0.2'), last=IPAddress('10.0.0.254'))"


def test_starts_at_first_without_history() -> None:
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.10"))
    assert next_free(rng, set(), None) == ip("10.0.0.2")


def test_continues_after_last_reserved_and_wraps() -> None:
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.5"))
    assert next_free(rng, set(), ip("10.0.0.3")) == ip("10.0.0.4")
    assert next_free(rng, set(), ip("10.0.0.5")) == ip("10.0.0.2")
    assert next_free(rng, {ip("10.0.0.4"), ip("10.0.0.5")}, ip("10.0.0.3")) == ip("10.0.0.2")


def test_last_reserved_outside_range_restarts_at_first() -> None:
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.5"))
    assert next_free(rng, set(), ip("192.168.1.1")) == ip("10.0.0.2")


def test_just_released_address_is_the_last_candidate() -> None:
    rng = AddressRange(ip("10.0.0.1"), ip("10.0.0.4"))
    # .1 was handed out and released again; .2 was the last one handed out.
    assert next_free(rng, {ip("10.0.0.2")}, ip("10.0.0.2")) == ip("10.0.0.3")
    assert next_free(rng, {ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")}, ip("10.0.0.4")) == ip("10.0.0.1")


def test_full_returns_none() -> None:
    rng = AddressRange(ip("10.0.0.1"), ip("10.0.0.3"))
    taken = {ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")}
    assert next_free(rng, taken, ip("10.0.0.2")) is None
    assert next_free(rng, taken, None) is None


def test_single_address_range() -> None:
    rng = AddressRange(ip("10.0.0.7"), ip("10.0.0.7"))
    assert next_free(rng, set(), ip("10.0.0.7")) == ip("10.0.0.7")
    assert next_free(rng, {ip("10.0.0.7")}, None) is None


def test_taken_outside_range_is_ignored() -> None:
    rng = AddressRange(ip("10.0.0.1"), ip("10.0.0.2"))
    assert next_free(rng, {ip("10.0.0.9")}, None) == ip("10.0.0.1")


def test_requested_address() -> None:
    rng = AddressRange(ip("10.0.0.2"), ip("10.0.0.10"))
    assert is_free(rng, set(), ip("10.0.0.5"))
    assert not is_free(rng, {ip("10.0.0.5")}, ip("10.0.0.5"))
    assert not is_free(rng, set(), ip("10.0.0.1"))  # e.g. the gateway, below the range
    assert not is_free(rng, set(), ip("10.0.0.11"))


# -- properties ----------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple[AddressRange, set[IPAddress], IPAddress | None]:
    """A small range, a random subset taken, and a last-reserved in, near or out of it."""
    offset = draw(st.integers(0, 200))
    size = draw(st.integers(1, 40))
    first, last = BASE + offset, BASE + offset + size - 1
    rng = AddressRange(IPAddress(first, 4), IPAddress(last, 4))
    # Taken may include a few addresses just outside the range.
    taken_ints = draw(st.sets(st.integers(first - 3, last + 3)))
    last_int = draw(st.none() | st.integers(first - 3, last + 3))
    taken = {IPAddress(i, 4) for i in taken_ints}
    return rng, taken, None if last_int is None else IPAddress(last_int, 4)


def cyclic_after(rng: AddressRange, last: IPAddress | None) -> list[int]:
    lo, hi = int(rng.first), int(rng.last)
    ring = list(range(lo, hi + 1))
    if last is None or last not in rng:
        return ring
    k = int(last) - lo + 1
    return ring[k:] + ring[:k]


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_never_taken_nor_out_of_range_and_none_iff_full(
    scenario: tuple[AddressRange, set[IPAddress], IPAddress | None],
) -> None:
    rng, taken, last = scenario
    got = next_free(rng, taken, last)
    full = all(IPAddress(i, 4) in taken for i in range(int(rng.first), int(rng.last) + 1))
    assert (got is None) == full
    if got is not None:
        assert got in rng
        assert got not in taken


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(2, 30),
    ops=st.lists(st.one_of(st.just("alloc"), st.integers(0, 29)), max_size=80),
)
def test_released_address_not_reused_before_wraparound(size: int, ops: list[object]) -> None:
    """Simulate allocate/release: a freed address comes back only after every
    address between it and the end of the cycle was considered."""
    rng = AddressRange(IPAddress(BASE, 4), IPAddress(BASE + size - 1, 4))
    taken: set[IPAddress] = set()
    last: IPAddress | None = None
    handed_out: list[IPAddress] = []
    for op in ops:
        if op == "alloc":
            got = next_free(rng, taken, last)
            if got is None:
                assert len(taken) == size
                continue
            if last is not None:
                # Every address strictly between last and got (cyclically) was taken.
                between = cyclic_after(rng, last)
                for i in between[: between.index(int(got))]:
                    assert IPAddress(i, 4) in taken
            taken.add(got)
            handed_out.append(got)
            last = got
        else:
            assert isinstance(op, int)
            taken.discard(IPAddress(BASE + op % size, 4))
    # Handing out without any release walks the ring in order.
    if not any(isinstance(op, int) for op in ops):
        assert [int(a) - BASE for a in handed_out] == list(range(len(handed_out)))


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.integers(-3, 45))
def test_is_free_matches_definition(
    scenario: tuple[AddressRange, set[IPAddress], IPAddress | None], delta: int
) -> None:
    rng, taken, _ = scenario
    addr = IPAddress(int(rng.first) + delta, 4)
    assert is_free(rng, taken, addr) == (rng.first <= addr <= rng.last and addr not in taken)


# -- IPv6 ranges: a /64 slice is never enumerated -------------------------------

SLICE6_FIRST = IPAddress("fd50:0:0:1c::2")
SLICE6_LAST = IPAddress("fd50:0:0:1c:ffff:ffff:ffff:ffff")


def test_ipv6_range_size_and_membership() -> None:
    rng = AddressRange(SLICE6_FIRST, SLICE6_LAST)
    assert rng.version == 6
    assert rng.size == 2**64 - 2 and isinstance(rng.size, int)
    assert SLICE6_FIRST in rng and SLICE6_LAST in rng
    assert IPAddress("fd50:0:0:1c::1") not in rng and IPAddress("fd50:0:0:1d::") not in rng
    assert IPAddress(int(SLICE6_FIRST) & 0xFFFFFFFF, 4) not in AddressRange(IPAddress("::"), IPAddress("::ffff"))
    assert str(rng) == "fd50:0:0:1c::2-fd50::1c:ffff:ffff:ffff:ffff"


def test_other_family_never_blocks_a_candidate() -> None:
    """An IPv4 record whose integer equals an IPv6 candidate's (a store of the other family) is not taken."""
    rng = AddressRange(IPAddress("::a00:1"), IPAddress("::a00:3"))
    assert next_free(rng, {ip("10.0.0.1")}, None) == IPAddress("::a00:1")
    assert is_free(rng, {ip("10.0.0.1")}, IPAddress("::a00:1"))
    assert not is_free(rng, set(), ip("10.0.0.2"))


def _counting_order(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the candidates the search looks at (the allocator's cyclic walk)."""
    from cni_fan.ipam import allocator

    seen: list[int] = []
    real = allocator.cyclic_order

    def counting(rng, last):  # type: ignore[no-untyped-def]
        for candidate in real(rng, last):
            seen.append(candidate)
            yield candidate

    monkeypatch.setattr(allocator, "cyclic_order", counting)
    return seen


def test_search_in_a_slash_64_looks_only_past_what_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = AddressRange(SLICE6_FIRST, SLICE6_LAST)
    taken = {SLICE6_FIRST + i for i in range(5000)}
    seen = _counting_order(monkeypatch)
    assert next_free(rng, taken, None) == SLICE6_FIRST + 5000
    assert len(seen) == 5001  # the 5000 taken ones and the free one: never the 2^64 of the range

    seen.clear()  # after the last address handed out, not from the start
    assert next_free(rng, taken, SLICE6_FIRST + 10**12) == SLICE6_FIRST + 10**12 + 1
    assert len(seen) == 1

    seen.clear()  # the end of the range wraps to its start, past the taken ones
    assert next_free(rng, taken, SLICE6_LAST) == SLICE6_FIRST + 5000
    assert len(seen) == 5001


def test_ipv6_wraps_at_the_top_of_the_address_space() -> None:
    top = IPAddress(2**128 - 1, 6)
    rng = AddressRange(top - 2, top)
    assert next_free(rng, set(), top) == top - 2
    assert next_free(rng, {top - 2}, top) == top - 1
    assert next_free(rng, {top - 2, top - 1, top}, None) is None


@st.composite
def scenarios6(draw: st.DrawFn) -> tuple[AddressRange, set[IPAddress], IPAddress | None]:
    """Small IPv6 ranges near the places integers misbehave: 2^32, 2^64, the top of the space."""
    base = draw(st.sampled_from([int(SLICE6_FIRST), 2**32 - 20, 2**64 - 20, 2**128 - 45]))
    offset = draw(st.integers(0, 4))
    size = draw(st.integers(1, 40))
    first, last = base + offset, base + offset + size - 1
    rng = AddressRange(IPAddress(first, 6), IPAddress(last, 6))
    near = st.integers(first - 3, min(last + 3, 2**128 - 1))
    taken = {IPAddress(i, 6) for i in draw(st.sets(near))}
    last_int = draw(st.none() | near)
    return rng, taken, None if last_int is None else IPAddress(last_int, 6)


@settings(max_examples=600, deadline=None)
@given(scenarios() | scenarios6())
def test_picks_first_free_in_cyclic_order_after_last(
    scenario: tuple[AddressRange, set[IPAddress], IPAddress | None],
) -> None:
    """Both families: IPv6 ranges up to the top of the address space."""
    rng, taken, last = scenario
    got = next_free(rng, taken, last)
    taken_ints = {int(a) for a in taken}
    expected = next((i for i in cyclic_after(rng, last) if i not in taken_ints), None)
    assert (None if got is None else int(got)) == expected
    if got is not None:
        assert got.version == rng.first.version and got in rng and got not in taken
