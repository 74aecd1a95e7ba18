"""The IPAM's one API: policy (allocator) plus records (store).

The verbs of `fan` and `fan-ipam`, the node agent's metrics and `node show`
all go through `AddressPool`; the store is its adapter to the disk. Release,
lookup and GC need no pod range (DEL must work after the node lost its
underlay address); allocation and the counts of the range do. A pool holds
one family: IPv4, or IPv6 for an IPv6-only network. Opened without a range,
it must be told the family (`version`), or it reads the store as IPv4 and
finds none of an IPv6 network's records.

Counts are exact Python ints and an IPv6 slice holds about 2^64 addresses,
more than a float64 (JSON numbers as most readers parse them, Prometheus
samples) holds exactly past 2^53. Callers that export them decide: a metric
converts to float knowingly (a ratio stays meaningful), a JSON document for
people or other programs should not promise more precision than its readers
have (write the prefix length, or the number as a string).

Every operation runs under the store's lock from its first read to its last
write, so parallel ADDs on one node (runtimes do that) never see the same
free address. Mapping these exceptions to CNI error codes is the caller's
job; the messages are written for the person reading the runtime's log.
"""
from __future__ import annotations

import logging
from pathlib import Path

from netaddr import IPAddress

from cni_fan.ipam.allocator import AddressRange, free_in_order, is_free
from cni_fan.ipam.store import Allocation, AllocationStore

log = logging.getLogger("cni_fan.ipam")


class PoolError(Exception):
    """An allocation the pool cannot satisfy; str() is a sentence for a person."""


class PoolFull(PoolError):
    """Every address of the range is held."""

    def __init__(self, rng: AddressRange, used: int) -> None:
        super().__init__(
            f"no free address in {rng}: {used} of {rng.size} addresses are allocated; "
            f"delete pods or run CNI GC to release stale ones"
        )
        self.range = rng


class AddressUnavailable(PoolError):
    """A requested address is outside the range or held by someone else."""

    def __init__(self, addr: IPAddress, reason: str, holder: tuple[str, str] | None = None) -> None:
        super().__init__(f"requested address {addr} is not available: {reason}")
        self.address = addr
        self.holder = holder


class NoPodRange(PoolError):
    """An operation that needs this node's pod range, on a pool opened without one (a caller's bug)."""

    def __init__(self) -> None:
        super().__init__("this pool was opened without a pod range (the node's slice is unknown)")


class AddressPool:
    """The pod range of this node's Fan slice and its allocation records."""

    def __init__(self, store: AllocationStore, first: IPAddress | None = None,
                 last: IPAddress | None = None) -> None:
        self.store = store
        self._range = AddressRange(first, last) if first is not None and last is not None else None
        if self._range is not None and self._range.version != store.version:
            raise ValueError(f"pod range {self._range} is IPv{self._range.version} "
                             f"but the store holds IPv{store.version} records")

    @classmethod
    def open(cls, state_dir: str, first: IPAddress | None = None, last: IPAddress | None = None,
             version: int | None = None) -> "AddressPool":
        """The pool of the network whose records live in `state_dir` (created if missing).

        `version` is the family of its records: the range's when there is a
        range, else 4 unless told otherwise (an IPv6-only network's DEL, CHECK
        and GC must pass 6).
        """
        if version is None:
            version = first.version if first is not None else 4
        return cls(AllocationStore(Path(state_dir), version=version), first, last)

    @classmethod
    def existing(cls, state_dir: str, first: IPAddress | None = None,
                 last: IPAddress | None = None, version: int | None = None) -> "AddressPool | None":
        """Like `open`, but None when nothing was ever allocated: readers create no state."""
        return cls.open(state_dir, first, last, version) if Path(state_dir).is_dir() else None

    @property
    def range(self) -> AddressRange:
        if self._range is None:
            raise NoPodRange()
        return self._range

    def allocate(
        self,
        container_id: str,
        ifname: str,
        requested: IPAddress | None = None,
    ) -> IPAddress:
        """An address for (container_id, ifname); the same one again on a repeated ADD.

        Raises PoolFull when the range is exhausted and AddressUnavailable
        when `requested` is out of range or held by another owner.
        """
        if self._range is None:  # refuse before anything is read or written
            raise NoPodRange()
        with self.store.locked():
            # Killed writers leave temp files; GC may never run (it needs a
            # 1.1.0 config), so clear them here where the lock is held anyway.
            self.store.sweep_temp_files()

            existing = self._existing(container_id, ifname)
            if existing is not None:
                if requested is not None and requested != existing:
                    raise AddressUnavailable(
                        requested,
                        f"container {container_id} interface {ifname} already holds {existing}",
                        holder=(container_id, ifname),
                    )
                log.debug("%s/%s already holds %s", container_id, ifname, existing)
                return existing

            taken = self.store.taken()
            if requested is not None:
                return self._reserve_requested(requested, taken, container_id, ifname)
            return self._reserve_next(taken, container_id, ifname)

    def release(self, container_id: str, ifname: str) -> list[IPAddress]:
        """Release whatever (container_id, ifname) holds; [] when nothing (DEL must not fail)."""
        released = self.store.release_by_owner(container_id, ifname)
        if released:
            log.info("released %s from %s/%s", _join(released), container_id, ifname)
        return released

    def lookup(self, container_id: str, ifname: str) -> IPAddress | None:
        """The address recorded for (container_id, ifname), for CHECK."""
        return self.store.find_by_owner(container_id, ifname)

    def gc(self, valid: set[tuple[str, str]]) -> list[IPAddress]:
        """Release every record not owned by a (containerID, ifname) in `valid`.

        Corrupt records have no provable owner and are released too, as are
        stale temp files. Returns the released addresses, sorted.
        """
        stale, corrupt = self.store.gc(valid)
        released = sorted(stale + corrupt)
        if released:
            log.info("GC released %d address(es): %s", len(released), _join(released))
        return released

    def allocations(self) -> list[Allocation]:
        """Every readable record, sorted by address (corrupt ones are logged and skipped)."""
        return self.store.records()

    def used(self) -> int:
        """How many addresses of this range are held (records outside it do not count); an exact int."""
        pod_range = self.range
        return sum(1 for addr in self.store.taken() if addr in pod_range)

    def capacity(self) -> int:
        """How many addresses the range holds in total: an exact int, past 2^53 for IPv6 (module docstring)."""
        return self.range.size

    # -- internals ---------------------------------------------------------

    def _existing(self, container_id: str, ifname: str) -> IPAddress | None:
        held = self.store.find_by_owner(container_id, ifname)
        if held is None or held in self.range:
            return held
        # Held from an older range (the node's slice changed): useless to the
        # pod now, and a repeated ADD must not fail forever, so trade it in.
        log.warning("%s/%s holds %s outside the range %s; releasing it", container_id, ifname, held, self.range)
        self.store.release(held)
        return None

    def _reserve_requested(
        self, requested: IPAddress, taken: set[IPAddress], container_id: str, ifname: str
    ) -> IPAddress:
        if requested not in self.range:
            raise AddressUnavailable(requested, f"outside this node's pod range {self.range}")
        if not is_free(self.range, taken, requested) or not self.store.reserve(requested, container_id, ifname):
            holder = self._holder(requested)
            who = f"held by container {holder[0]} interface {holder[1]}" if holder else "held by an unreadable record"
            raise AddressUnavailable(requested, who, holder=holder)
        log.info("allocated requested %s to %s/%s", requested, container_id, ifname)
        return requested

    def _reserve_next(self, taken: set[IPAddress], container_id: str, ifname: str) -> IPAddress:
        # reserve() fails only if a record appeared behind our back (someone
        # ignoring the lock); count it as taken and try the next free one.
        # The walk is lazy: an IPv6 range is never enumerated.
        for candidate in free_in_order(self.range, taken, self.store.last_reserved()):
            if self.store.reserve(candidate, container_id, ifname):
                self.store.set_last_reserved(candidate)
                log.info("allocated %s to %s/%s", candidate, container_id, ifname)
                return candidate
            taken.add(candidate)
        raise PoolFull(self.range, sum(1 for a in taken if a in self.range))

    def _holder(self, addr: IPAddress) -> tuple[str, str] | None:
        record = self.store.record_of(addr)
        return (record.container_id, record.ifname) if record else None


def _join(addrs: list[IPAddress]) -> str:
    return ", ".join(str(a) for a in addrs)


__all__ = ["AddressPool", "AddressUnavailable", "Allocation", "PoolError", "PoolFull"]
