"""Allocation records on disk, one file per address, under a file lock.

Layout of `root` (`<dataDir>/networks/<network name>`, `FanParams.state_dir`;
mode 0700):

- `<address>` — one record per allocated address, mode 0600, JSON
  `{"containerID", "ifname", "created"}`. The file name is the address in
  its one canonical form: dotted decimal without leading zeros for IPv4
  (`10.244.3.2`), RFC 5952 section 4 for IPv6 (lowercase, no leading zeros,
  the longest run of two or more zero groups, the first of equal runs, as
  `::`: `fd50:0:0:1c::5`; always hex groups, never a dotted tail). Any other
  spelling is not a record, so two records for one address cannot exist. A
  store holds one family (`version`), fixed by its network's config; names
  of the other family are foreign files to it. The file name is the only thing
  built into a path; container IDs and interface names live only inside the
  JSON, so no value from the runtime can steer a path out of `root`.
- `last_reserved` — the address handed out last, for round-robin.
- `lock` — taken with `flock(LOCK_EX)` around every mutation and every read
  a decision is based on. The kernel drops the lock when a holder dies.
- `.tmp-*` — records being written. Written in full, then hard-linked to the
  final name (atomic; fails with EEXIST when the address is taken), then
  unlinked. A process killed at any point therefore leaves either no record
  or a complete one that names its container, which DEL or GC releases; a
  leftover temp file never blocks an address and is swept under the lock
  (only a lock holder creates them, so a lock holder may remove them all).
- `owners/<hash>` — the owner index: a symlink per (containerID, ifname),
  named by a hash of the pair, whose target text is the address it holds.
  DEL and a repeated ADD find an owner's record with one readlink instead of
  reading every record (which made DEL and ADD O(pods); docs/architecture.md
  has the measurement). The symlink is only read, never followed. It is written *before*
  the record and removed *after* it, so every record has its entry even if
  a process dies in between; an entry can point to a missing record or to a
  record another owner took since (killed writer, corrupt record), so every
  lookup checks the record's owner. A store written before the index
  existed gets it built once under the lock (into a temp directory renamed
  into place: the directory exists only when complete).

No fsync: the default dataDir is on tmpfs (/run), and state that survives a
reboot is exactly what leaks addresses in host-local.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from netaddr import IPAddress

from cni_fan.digest import sha256
from cni_fan.ipam.names import address_from_name as _address_from_name
from cni_fan.ipam.names import record_name as _record_name

log = logging.getLogger("cni_fan.ipam")

LOCK_NAME = "lock"
LAST_RESERVED_NAME = "last_reserved"
TEMP_PREFIX = ".tmp-"
OWNERS_DIR = "owners"
OWNERS_BUILD_PREFIX = ".owners-build-"
DIR_MODE = 0o700
FILE_MODE = 0o600
# Records are ~150 bytes; anything much larger is not ours.
MAX_RECORD_BYTES = 64 * 1024


class Allocation(NamedTuple):
    """One record: `addr` is held by interface `ifname` of `container_id`."""

    addr: IPAddress
    container_id: str
    ifname: str
    created: int


def _owner_key(container_id: str, ifname: str) -> str:
    """The index entry's name: runtime values never become path components."""
    pair = json.dumps([container_id, ifname])  # unambiguous, whatever the values hold
    return sha256(pair.encode("ascii")).hexdigest()[:40]


class AllocationStore:
    """The records of one network on one node, of one family (`version`).

    Every public method takes the lock itself; `locked()` is re-entrant
    within a process so the pool can hold it across a read-decide-write
    sequence. Share an instance across threads only through `locked()`.
    """

    def __init__(self, root: Path, version: int = 4) -> None:
        if version not in (4, 6):
            raise ValueError(f"a store holds IPv4 or IPv6 records, not version {version!r}")
        self.version = version
        self.root = Path(root)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by umask and ignored for an existing
        # directory; state must not be readable by other users either way.
        os.chmod(self.root, DIR_MODE)
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0
        self._index_checked = False

    def _name(self, addr: IPAddress) -> str:
        return _record_name(addr, self.version)

    def _addr(self, name: str) -> IPAddress | None:
        return _address_from_name(name, self.version)

    # -- locking -----------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock (blocking); re-entrant in one process."""
        with self._thread_lock:
            if self._depth == 0:
                fd = os.open(
                    self.root / LOCK_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    FILE_MODE,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            if self._depth == 1 and not self._index_checked:
                try:
                    self._ensure_owner_index()
                except BaseException:
                    self._depth -= 1
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    raise
                self._index_checked = True
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    # Closing the only descriptor drops the flock.
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # -- records -----------------------------------------------------------

    def reserve(self, addr: IPAddress, container_id: str, ifname: str) -> bool:
        """Record `addr` for (container_id, ifname); False if the address is taken."""
        final = self.root / self._name(addr)
        payload = json.dumps(
            {"containerID": container_id, "ifname": ifname, "created": int(time.time())}
        ).encode()
        with self.locked():
            previous = self._index_lookup(container_id, ifname)
            self._index_set(container_id, ifname, addr)  # before the record: see the module docstring
            tmp = self._write_temp(payload)
            try:
                os.link(tmp, final)
            except FileExistsError:
                self._index_restore(container_id, ifname, previous)
                return False
            finally:
                tmp.unlink(missing_ok=True)
        log.debug("reserved %s for %s/%s", addr, container_id, ifname)
        return True

    def release(self, addr: IPAddress) -> bool:
        """Remove the record of `addr`; False if there was none (idempotent)."""
        with self.locked():
            try:
                record = self._read_record(addr)
            except FileNotFoundError:
                return False
            return self._remove(addr, record)

    def release_by_owner(self, container_id: str, ifname: str) -> list[IPAddress]:
        """Release what (container_id, ifname) holds; [] when nothing. One lookup, not a scan."""
        with self.locked():
            record = self._owned(container_id, ifname)
            if record is None:
                self._index_remove(container_id, ifname)  # a stale entry, if any
                return []
            return [record.addr] if self._remove(record.addr, record) else []

    def find_by_owner(self, container_id: str, ifname: str) -> IPAddress | None:
        """The address (container_id, ifname) holds, or None."""
        with self.locked():
            record = self._owned(container_id, ifname)
        return record.addr if record else None

    def gc(self, valid: set[tuple[str, str]]) -> tuple[list[IPAddress], list[IPAddress]]:
        """Release every record whose owner is not in `valid`, and every corrupt one.

        Also sweeps temp files and index entries that point nowhere. Returns
        (released stale addresses, released corrupt addresses), each sorted.
        """
        with self.locked():
            self.sweep_temp_files()
            records, corrupt = self._scan()
            stale = [r.addr for r in records if (r.container_id, r.ifname) not in valid and self._remove(r.addr, r)]
            dropped = [addr for addr in corrupt if self._remove(addr, None)]
            self._sweep_owner_index({_owner_key(r.container_id, r.ifname): r.addr for r in records
                                     if (r.container_id, r.ifname) in valid})
        for addr in dropped:
            log.warning("GC removed corrupt record %s", addr)
        return stale, dropped

    def record_of(self, addr: IPAddress) -> Allocation | None:
        """The record of `addr`, or None when there is none or it is unreadable."""
        with self.locked():
            try:
                return self._read_record(addr)
            except FileNotFoundError:
                return None

    def records(self) -> list[Allocation]:
        """All readable records, sorted by address. Corrupt ones are logged and skipped."""
        return self._scan()[0]

    def corrupt_addresses(self) -> list[IPAddress]:
        """Addresses whose record cannot be read or parsed; they stay taken until GC."""
        return self._scan()[1]

    def taken(self) -> set[IPAddress]:
        """Every address with a record file, readable or not (names only, no reads)."""
        with self.locked():
            return {a for a in map(self._addr, os.listdir(self.root)) if a is not None}

    # -- round-robin state -------------------------------------------------

    def last_reserved(self) -> IPAddress | None:
        """The address handed out last, or None if unknown or unreadable."""
        path = self.root / LAST_RESERVED_NAME
        with self.locked():
            try:
                text = path.read_text(encoding="ascii").strip()
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot read %s: %s; round-robin restarts at the range start", path, exc)
                return None
        addr = self._addr(text)
        if addr is None:
            log.warning("%s holds %r, not an IPv%d address; round-robin restarts at the range start",
                        path, text, self.version)
        return addr

    def set_last_reserved(self, addr: IPAddress) -> None:
        """Remember `addr` as handed out last (atomic replace)."""
        data = (self._name(addr) + "\n").encode()
        with self.locked():
            tmp = self._write_temp(data)
            try:
                os.replace(tmp, self.root / LAST_RESERVED_NAME)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    # -- maintenance -------------------------------------------------------

    def sweep_temp_files(self) -> list[str]:
        """Remove temp files left by killed writers; returns their names.

        Safe because temp files are only created by a lock holder, and we
        are the lock holder now.
        """
        removed = []
        with self.locked():
            for name in os.listdir(self.root):
                if name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.root / name)
                    removed.append(name)
        if removed:
            log.info("removed %d stale temp file(s) in %s", len(removed), self.root)
        return removed

    def _remove(self, addr: IPAddress, record: Allocation | None) -> bool:
        """Unlink the record of `addr` (already read: `record`, None if corrupt), then its owner's entry."""
        try:
            os.unlink(self.root / self._name(addr))
        except FileNotFoundError:
            return False
        if record is not None and self._index_lookup(record.container_id, record.ifname) == addr:
            self._index_remove(record.container_id, record.ifname)
        log.debug("released %s", addr)
        return True

    def _owned(self, container_id: str, ifname: str) -> Allocation | None:
        """The record the owner's index entry points to, if that record really is the owner's."""
        addr = self._index_lookup(container_id, ifname)
        if addr is None:
            return None
        try:
            record = self._read_record(addr)
        except FileNotFoundError:
            return None  # the writer died between index and record, or GC took it
        if record is None or (record.container_id, record.ifname) != (container_id, ifname):
            return None
        return record

    # -- owner index -------------------------------------------------------

    def _owners(self) -> Path:
        return self.root / OWNERS_DIR

    def _index_lookup(self, container_id: str, ifname: str) -> IPAddress | None:
        try:
            target = os.readlink(self._owners() / _owner_key(container_id, ifname))
        except OSError:  # no entry (FileNotFoundError) or not a symlink
            return None
        return self._addr(target)

    def _index_set(self, container_id: str, ifname: str, addr: IPAddress) -> None:
        """Point the owner's entry at `addr` (atomic replace)."""
        entry = self._owners() / _owner_key(container_id, ifname)
        tmp = self._owners() / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        os.symlink(self._name(addr), tmp)
        try:
            os.replace(tmp, entry)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _index_remove(self, container_id: str, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._owners() / _owner_key(container_id, ifname))

    def _index_restore(self, container_id: str, ifname: str, previous: IPAddress | None) -> None:
        if previous is None:
            self._index_remove(container_id, ifname)
        else:
            self._index_set(container_id, ifname, previous)

    def _ensure_owner_index(self) -> None:
        """Build the index of a store written before it existed (once, under the lock)."""
        if self._owners().is_dir():
            return
        for name in os.listdir(self.root):  # a build a killed process left half done
            if name.startswith(OWNERS_BUILD_PREFIX):
                shutil.rmtree(self.root / name, ignore_errors=True)
        build = self.root / f"{OWNERS_BUILD_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        os.mkdir(build, DIR_MODE)
        records = self._scan()[0]
        for record in records:
            entry = build / _owner_key(record.container_id, record.ifname)
            with contextlib.suppress(FileExistsError):  # two records of one owner: GC's to sort out
                os.symlink(self._name(record.addr), entry)
        os.rename(build, self._owners())
        if records:
            log.info("built the owner index of %s (%d records)", self.root, len(records))

    def _sweep_owner_index(self, keep: dict[str, IPAddress]) -> None:
        """Remove index entries other than `keep` (entry name -> address); GC's job."""
        for name in os.listdir(self._owners()):
            path = self._owners() / name
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            try:
                target = self._addr(os.readlink(path))
            except OSError:
                target = None
            if keep.get(name) != target or target is None:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(path)

    # -- internals ---------------------------------------------------------

    def _write_temp(self, data: bytes) -> Path:
        """Write `data` to a fresh mode-0600 temp file in root and return its path."""
        tmp = self.root / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # the open mode is filtered by umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _scan(self) -> tuple[list[Allocation], list[IPAddress]]:
        records: list[Allocation] = []
        corrupt: list[IPAddress] = []
        with self.locked():
            for name in os.listdir(self.root):
                addr = self._addr(name)
                if addr is None:
                    continue
                try:
                    record = self._read_record(addr)
                except FileNotFoundError:
                    continue  # removed by hand while we listed; not ours to report
                if record is None:
                    corrupt.append(addr)
                else:
                    records.append(record)
        records.sort(key=lambda r: r.addr)
        corrupt.sort()
        return records, corrupt

    def _read_record(self, addr: IPAddress) -> Allocation | None:
        """The record of `addr`, or None (logged) when it is unreadable or corrupt."""
        path = self.root / self._name(addr)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as exc:
            reason = "a symlink" if exc.errno == errno.ELOOP else str(exc)
            log.warning("record %s is unreadable (%s); the address stays taken until GC", path, reason)
            return None
        try:
            raw = os.read(fd, MAX_RECORD_BYTES + 1)
        except OSError as exc:
            log.warning("record %s is unreadable (%s); the address stays taken until GC", path, exc)
            return None
        finally:
            os.close(fd)
        try:
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError("too large")
            data = json.loads(raw.decode("utf-8"))
            container_id = data["containerID"]
            ifname = data["ifname"]
            created = data["created"]
            if not isinstance(container_id, str) or not container_id:
                raise ValueError("containerID is not a non-empty string")
            if not isinstance(ifname, str):
                raise ValueError("ifname is not a string")
            if isinstance(created, bool) or not isinstance(created, (int, float)):
                raise ValueError("created is not a number")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("record %s is corrupt (%s); the address stays taken until GC", path, exc)
            return None
        return Allocation(addr=addr, container_id=container_id, ifname=ifname, created=int(created))
