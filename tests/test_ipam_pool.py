"""AddressPool: the operations the plugins call, including many processes at
once and processes killed at random moments."""
from __future__ import annotations

import collections
import fcntl
import json
import multiprocessing
import os
import random
import re
import time
from pathlib import Path

import pytest
from netaddr import IPAddress

from cni_fan.ipam.pool import AddressPool, AddressUnavailable, PoolError, PoolFull
from cni_fan.ipam.store import LAST_RESERVED_NAME, LOCK_NAME, OWNERS_DIR, TEMP_PREFIX, AllocationStore

FIRST = IPAddress("10.244.3.2")
LAST = IPAddress("10.244.3.254")


def ip(text: str) -> IPAddress:
    return IPAddress(text)


def make_pool(root: Path, first: IPAddress = FIRST, last: IPAddress = LAST) -> AddressPool:
    return AddressPool(AllocationStore(root), first, last)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "networks" / "fan"


@pytest.fixture
def pool(root: Path) -> AddressPool:
    return make_pool(root)


def test_exceptions_share_a_base() -> None:
    assert issubclass(PoolFull, PoolError) and issubclass(AddressUnavailable, PoolError)
    assert issubclass(PoolError, Exception)


def test_allocate_is_idempotent_per_owner(pool: AddressPool) -> None:
    a = pool.allocate("c1", "eth0")
    assert a == FIRST
    assert pool.allocate("c1", "eth0") == a
    assert pool.allocate("c1", "net1") == ip("10.244.3.3")
    assert pool.allocate("c2", "eth0") == ip("10.244.3.4")
    assert pool.lookup("c1", "eth0") == a
    assert pool.used() == 3
    assert pool.capacity() == 253


def test_released_address_is_not_reused_at_once(pool: AddressPool) -> None:
    a = pool.allocate("c1", "eth0")
    assert pool.release("c1", "eth0") == [a]
    b = pool.allocate("c2", "eth0")
    assert b != a and b == ip("10.244.3.3")


def test_round_robin_survives_new_instances(root: Path) -> None:
    """Each CNI call is a fresh process, so the rotation must live on disk."""
    a = make_pool(root).allocate("c1", "eth0")
    make_pool(root).release("c1", "eth0")
    assert make_pool(root).allocate("c2", "eth0") == a + 1


def test_wraps_around_and_fills_then_reports_full(root: Path) -> None:
    pool = make_pool(root, ip("10.0.0.1"), ip("10.0.0.3"))
    got = [pool.allocate(f"c{i}", "eth0") for i in range(3)]
    assert got == [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]
    with pytest.raises(PoolFull) as info:
        pool.allocate("c9", "eth0")
    message = str(info.value)
    assert "10.0.0.1-10.0.0.3" in message and "3 of 3" in message
    pool.release("c0", "eth0")
    assert pool.allocate("c9", "eth0") == ip("10.0.0.1")  # wrapped
    assert pool.used() == pool.capacity() == 3


def test_requested_address(pool: AddressPool) -> None:
    assert pool.allocate("c1", "eth0", requested=ip("10.244.3.100")) == ip("10.244.3.100")
    # Repeating the same request is idempotent.
    assert pool.allocate("c1", "eth0", requested=ip("10.244.3.100")) == ip("10.244.3.100")
    # A static pick does not move the rotation.
    assert pool.allocate("c2", "eth0") == FIRST


def test_requested_address_held_names_the_holder(pool: AddressPool) -> None:
    pool.allocate("holder-1", "eth0", requested=ip("10.244.3.50"))
    with pytest.raises(AddressUnavailable) as info:
        pool.allocate("c2", "eth0", requested=ip("10.244.3.50"))
    assert "10.244.3.50" in str(info.value) and "holder-1" in str(info.value) and "eth0" in str(info.value)
    assert info.value.holder == ("holder-1", "eth0")
    assert info.value.address == ip("10.244.3.50")
    assert pool.lookup("c2", "eth0") is None


@pytest.mark.parametrize("addr", ["10.244.3.1", "10.244.3.255", "10.9.9.9"])
def test_requested_address_out_of_range(pool: AddressPool, addr: str) -> None:
    with pytest.raises(AddressUnavailable) as info:
        pool.allocate("c1", "eth0", requested=ip(addr))
    assert addr in str(info.value) and "10.244.3.2-10.244.3.254" in str(info.value)
    assert pool.used() == 0


def test_requested_differs_from_what_owner_holds(pool: AddressPool) -> None:
    a = pool.allocate("c1", "eth0")
    with pytest.raises(AddressUnavailable, match=f"already holds {a}"):
        pool.allocate("c1", "eth0", requested=ip("10.244.3.77"))
    assert pool.lookup("c1", "eth0") == a


def test_release_is_idempotent(pool: AddressPool) -> None:
    assert pool.release("nobody", "eth0") == []
    a = pool.allocate("c1", "eth0")
    assert pool.release("c1", "eth0") == [a]
    assert pool.release("c1", "eth0") == []
    assert pool.lookup("c1", "eth0") is None
    assert pool.used() == 0


def test_without_a_range_the_pool_releases_looks_up_and_collects_but_does_not_allocate(root: Path) -> None:
    """DEL, CHECK and GC work after the node lost its underlay address (no slice, so no range)."""
    a = make_pool(root).allocate("c1", "eth0")
    b = make_pool(root).allocate("c2", "eth0")
    rangeless = AddressPool.open(str(root))
    assert rangeless.lookup("c1", "eth0") == a
    assert [r.addr for r in rangeless.allocations()] == [a, b]
    assert rangeless.release("c1", "eth0") == [a]
    assert rangeless.gc(set()) == [b]
    with pytest.raises(PoolError, match="without a pod range"):
        rangeless.allocate("c3", "eth0")
    with pytest.raises(PoolError, match="without a pod range"):
        rangeless.used()


def test_readers_open_no_pool_where_nothing_was_allocated(root: Path) -> None:
    """`node show` and the metrics must not create state."""
    assert AddressPool.existing(str(root), FIRST, LAST) is None
    assert not root.exists()
    AddressPool.open(str(root), FIRST, LAST).allocate("c1", "eth0")
    reader = AddressPool.existing(str(root), FIRST, LAST)
    assert reader is not None and reader.used() == 1 and reader.capacity() == 253
    assert [(r.addr, r.container_id, r.ifname) for r in reader.allocations()] == [(FIRST, "c1", "eth0")]


def test_corrupt_record_blocks_its_address_until_gc(pool: AddressPool, root: Path) -> None:
    (root / str(FIRST)).write_text("{not json")
    assert pool.allocate("c1", "eth0") == ip("10.244.3.3")
    assert pool.used() == 2
    assert pool.gc({("c1", "eth0")}) == [FIRST]
    assert pool.used() == 1


def test_gc_releases_everything_not_valid(pool: AddressPool, root: Path) -> None:
    keep = pool.allocate("keep", "eth0")
    gone = pool.allocate("gone", "eth0")
    other_if = pool.allocate("keep", "net1")
    (root / "10.244.3.200").write_bytes(b"")
    (root / f"{TEMP_PREFIX}1-abc").write_text("half")
    released = pool.gc({("keep", "eth0")})
    assert released == sorted([gone, other_if, ip("10.244.3.200")])
    assert [(r.addr, r.container_id) for r in pool.store.records()] == [(keep, "keep")]
    assert pool.store.corrupt_addresses() == []
    assert not [n for n in os.listdir(root) if n.startswith(TEMP_PREFIX)]
    assert pool.gc({("keep", "eth0")}) == []


def test_record_from_an_older_range(root: Path) -> None:
    """The node's slice changed: old records do not count and are traded in."""
    old = make_pool(root, ip("10.1.0.2"), ip("10.1.0.254")).allocate("c1", "eth0")
    pool = make_pool(root, ip("10.2.0.2"), ip("10.2.0.254"))
    assert pool.used() == 0
    new = pool.allocate("c1", "eth0")
    assert new == ip("10.2.0.2")
    assert old not in pool.store.taken()


def test_allocate_sweeps_stale_temp_files(pool: AddressPool, root: Path) -> None:
    (root / f"{TEMP_PREFIX}42-dead").write_text('{"containerID": "x"')
    pool.allocate("c1", "eth0")
    assert not [n for n in os.listdir(root) if n.startswith(TEMP_PREFIX)]


def test_bad_range_is_rejected(root: Path) -> None:
    with pytest.raises(ValueError):
        make_pool(root, ip("10.0.0.9"), ip("10.0.0.1"))


# -- many processes at once -------------------------------------------------

PROCS = 50


def _allocate_in_child(root: str, index: int, barrier, results, version: int = 4) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(Path(root)) if version == 4 else make_pool6(Path(root))
    barrier.wait()
    results.put((index, str(pool.allocate(f"ctr-{index}", "eth0"))))


def _release_in_child(root: str, index: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(Path(root))
    barrier.wait()
    results.put((index, [str(a) for a in pool.release(f"ctr-{index}", "eth0")]))


def _run_all(target, root: Path, *extra: object) -> dict[int, object]:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(root), i, barrier, results, *extra)) for i in range(PROCS)]
    for p in procs:
        p.start()
    # Join before reading: a dead child then fails the test at once instead
    # of a queue timeout. The few small results fit in the pipe buffer.
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * PROCS
    return dict(results.get(timeout=5) for _ in procs)


def test_fifty_processes_get_distinct_addresses(root: Path) -> None:
    AllocationStore(root)
    allocated = _run_all(_allocate_in_child, root)
    assert len(allocated) == PROCS
    assert len(set(allocated.values())) == PROCS
    pool = make_pool(root)
    assert pool.used() == PROCS
    for index, addr in allocated.items():
        assert pool.lookup(f"ctr-{index}", "eth0") == ip(str(addr))

    released = _run_all(_release_in_child, root)
    for index, addrs in released.items():
        assert addrs == [allocated[index]]
    assert pool.store.records() == [] and pool.used() == 0
    assert set(os.listdir(root)) <= {LOCK_NAME, LAST_RESERVED_NAME, OWNERS_DIR}
    assert os.listdir(root / OWNERS_DIR) == [], "owner index entries left"


# -- processes killed at random moments ---------------------------------------

CRASH_ITERATIONS = 100
CRASH_ID = re.compile(r"crash-(\d+)-(\d+)")
SMALL_FIRST, SMALL_LAST = ip("10.244.3.2"), ip("10.244.3.17")


def _churn(root: str, iteration: int) -> None:
    """ADD, DEL, static requests and GC in a tight loop, until SIGKILLed."""
    pool = make_pool(Path(root), SMALL_FIRST, SMALL_LAST)
    rnd = random.Random(iteration)
    n = 0
    while True:
        cid = f"crash-{iteration}-{n}"
        n += 1
        try:
            if rnd.random() < 0.2:
                requested = SMALL_FIRST + rnd.randrange(pool.capacity())
                pool.allocate(cid, "eth0", requested=requested)
            else:
                pool.allocate(cid, "eth0")
        except AddressUnavailable:
            pass
        except PoolFull:
            pool.gc(set())
        if rnd.random() < 0.5:
            pool.release(cid, "eth0")


def _assert_consistent(root: Path) -> None:
    store = AllocationStore(root)
    assert store.corrupt_addresses() == []
    owners = collections.Counter()
    for record in store.records():
        assert CRASH_ID.fullmatch(record.container_id), record
        assert record.ifname == "eth0"
        owners[record.container_id] += 1
    assert all(count == 1 for count in owners.values()), owners
    for record in store.records():  # every record can be found by its owner (DEL needs no scan)
        assert store.find_by_owner(record.container_id, record.ifname) == record.addr, record
    for name in os.listdir(root):
        path = root / name
        if name.startswith(TEMP_PREFIX) or name in (LOCK_NAME, LAST_RESERVED_NAME, OWNERS_DIR):
            continue
        data = json.loads(path.read_text())  # complete JSON, never half-written
        assert set(data) == {"containerID", "ifname", "created"}


def test_sigkill_at_random_moments_leaves_a_recoverable_store(root: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    AllocationStore(root)
    rnd = random.Random(1234)
    for iteration in range(CRASH_ITERATIONS):
        child = ctx.Process(target=_churn, args=(str(root), iteration))
        child.start()
        time.sleep(rnd.uniform(0, 0.02))
        child.kill()
        child.join(timeout=10)
        assert child.exitcode == -9, f"child died on its own (exit {child.exitcode})"

        # The kernel dropped the dead child's lock.
        fd = os.open(root / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        _assert_consistent(root)

    pool = make_pool(root, SMALL_FIRST, SMALL_LAST)
    # Leftover temp files never make an address look taken.
    assert pool.used() == len(pool.store.records())
    # A killed ADD is cleaned up by the DEL of its container ...
    records = pool.store.records()
    for record in records[::2]:
        assert pool.release(record.container_id, record.ifname) == [record.addr]
    # ... and everything else by GC with no valid attachments.
    pool.gc(set())
    assert pool.store.records() == [] and pool.store.corrupt_addresses() == []
    assert set(os.listdir(root)) <= {LOCK_NAME, LAST_RESERVED_NAME, OWNERS_DIR}
    assert os.listdir(root / OWNERS_DIR) == [], "GC left owner index entries"
    assert pool.allocate("after", "eth0") in pool.range


# -- IPv6 pools (IPv6-only networks): a /64 slice --------------------------------

FIRST6 = IPAddress("fd50:0:0:1c::2")
LAST6 = IPAddress("fd50:0:0:1c:ffff:ffff:ffff:ffff")


def make_pool6(root: Path, first: IPAddress = FIRST6, last: IPAddress = LAST6) -> AddressPool:
    return AddressPool.open(str(root), first, last)


def test_ipv6_pool_allocates_releases_and_rotates(root: Path) -> None:
    pool = make_pool6(root)
    assert pool.store.version == 6
    a = pool.allocate("c1", "eth0")
    assert a == FIRST6 and pool.allocate("c1", "eth0") == a
    assert make_pool6(root).allocate("c2", "eth0") == ip("fd50:0:0:1c::3")
    assert pool.release("c1", "eth0") == [a]
    assert make_pool6(root).allocate("c3", "eth0") == ip("fd50:0:0:1c::4")  # not the one just freed
    assert pool.allocate("c4", "eth0", requested=ip("fd50:0:0:1c::ffff")) == ip("fd50:0:0:1c::ffff")
    assert pool.allocate("c5", "eth0") == ip("fd50:0:0:1c::5")  # a static pick does not move the rotation
    assert sorted(n for n in os.listdir(root) if ":" in n) == [
        "fd50:0:0:1c::3", "fd50:0:0:1c::4", "fd50:0:0:1c::5", "fd50:0:0:1c::ffff"]
    with pytest.raises(AddressUnavailable, match="outside this node's pod range fd50:0:0:1c::2-"):
        pool.allocate("c6", "eth0", requested=ip("fd50:0:0:1d::2"))
    with pytest.raises(AddressUnavailable, match="held by container c4 interface eth0"):
        pool.allocate("c6", "eth0", requested=ip("fd50:0:0:1c::ffff"))


def test_ipv6_counts_are_exact_ints(root: Path) -> None:
    pool = make_pool6(root)
    pool.allocate("c1", "eth0")
    assert pool.capacity() == 2**64 - 2 and isinstance(pool.capacity(), int)
    assert pool.used() == 1
    assert float(pool.capacity()) != pool.capacity()  # what the docstring warns JSON and metrics callers of


def test_ipv6_pool_wraps_and_reports_full(root: Path) -> None:
    pool = make_pool6(root, ip("fd50::1"), ip("fd50::3"))
    assert [pool.allocate(f"c{i}", "eth0") for i in range(3)] == [ip("fd50::1"), ip("fd50::2"), ip("fd50::3")]
    with pytest.raises(PoolFull, match="fd50::1-fd50::3: 3 of 3"):
        pool.allocate("c9", "eth0")
    pool.release("c1", "eth0")
    assert pool.allocate("c9", "eth0") == ip("fd50::2")


def test_ipv6_rangeless_pool_needs_the_family(root: Path) -> None:
    """DEL, CHECK and GC of an IPv6-only network open the pool without a range: they must say `version=6`."""
    a = make_pool6(root).allocate("c1", "eth0")
    b = make_pool6(root).allocate("c2", "eth0")
    assert AddressPool.open(str(root)).lookup("c1", "eth0") is None  # read as IPv4: sees nothing
    rangeless = AddressPool.open(str(root), version=6)
    assert rangeless.lookup("c1", "eth0") == a
    assert rangeless.release("c1", "eth0") == [a]
    assert rangeless.gc(set()) == [b]
    reader = AddressPool.existing(str(root), FIRST6, LAST6)
    assert reader is not None and reader.used() == 0


def test_range_and_store_family_must_agree(root: Path) -> None:
    with pytest.raises(ValueError, match="IPv6 but the store holds IPv4"):
        AddressPool(AllocationStore(root), FIRST6, LAST6)
    with pytest.raises(ValueError, match="IPv4 but the store holds IPv6"):
        AddressPool.open(str(root), FIRST, LAST, version=6)


def test_ipv6_allocation_with_thousands_taken_walks_only_past_them(root: Path, monkeypatch) -> None:
    """A /64 is never enumerated: allocating after 3000 taken addresses looks at 3001 candidates
    and reserves once (counted, not timed)."""
    from cni_fan.ipam import allocator

    pool = make_pool6(root)
    pool.allocate("first", "eth0")
    pool.release("first", "eth0")  # the owner index exists; the records below are written by hand
    os.unlink(root / LAST_RESERVED_NAME)
    for i in range(3000):
        (root / str(FIRST6 + i)).write_text(json.dumps({"containerID": f"c{i}", "ifname": "eth0", "created": 1}))
    seen: list[int] = []
    reserves: list[IPAddress] = []
    real_order, real_reserve = allocator.cyclic_order, AllocationStore.reserve

    def counting_order(rng, last):  # type: ignore[no-untyped-def]
        for candidate in real_order(rng, last):
            seen.append(candidate)
            yield candidate

    def counting_reserve(self, addr, container_id, ifname):  # type: ignore[no-untyped-def]
        reserves.append(addr)
        return real_reserve(self, addr, container_id, ifname)

    monkeypatch.setattr(allocator, "cyclic_order", counting_order)
    monkeypatch.setattr(AllocationStore, "reserve", counting_reserve)
    assert pool.allocate("new", "eth0") == FIRST6 + 3000
    assert len(seen) == 3001 and reserves == [FIRST6 + 3000]
    assert pool.used() == 3001


def test_fifty_processes_get_distinct_ipv6_addresses(root: Path) -> None:
    AllocationStore(root, version=6)
    allocated = _run_all(_allocate_in_child, root, 6)
    assert len(set(allocated.values())) == PROCS
    assert {ip(str(a)) for a in allocated.values()} == {FIRST6 + i for i in range(PROCS)}
    assert make_pool6(root).used() == PROCS
