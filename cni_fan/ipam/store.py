"""Allocation records on disk, one file per address, under a file lock.

Layout of `root` (`<dataDir>/<network name>`, mode 0700):

- `<dotted address>` — one record per allocated address, mode 0600, JSON
  `{"containerID", "ifname", "created"}`. The file name is the only thing
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
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netaddr import AddrFormatError, IPAddress

log = logging.getLogger("cni_fan.ipam")

LOCK_NAME = "lock"
LAST_RESERVED_NAME = "last_reserved"
TEMP_PREFIX = ".tmp-"
DIR_MODE = 0o700
FILE_MODE = 0o600
# Records are ~150 bytes; anything much larger is not ours.
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Allocation:
    """One record: `addr` is held by interface `ifname` of `container_id`."""

    addr: IPAddress
    container_id: str
    ifname: str
    created: int


def _address_from_name(name: str) -> IPAddress | None:
    """The address a record file name stands for, or None for any other file.

    Only the canonical dotted form counts, so exactly one name maps to each
    address and "two records for one address" cannot happen.
    """
    if not name or not name[0].isdigit():
        return None
    try:
        addr = IPAddress(name, 4)
    except (AddrFormatError, ValueError):
        return None
    return addr if str(addr) == name else None


def _record_name(addr: IPAddress) -> str:
    if not isinstance(addr, IPAddress) or addr.version != 4:
        raise ValueError(f"not an IPv4 address: {addr!r}")
    return str(addr)


class AllocationStore:
    """The records of one network on one node.

    Every public method takes the lock itself; `locked()` is re-entrant
    within a process so the pool can hold it across a read-decide-write
    sequence. Share an instance across threads only through `locked()`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by umask and ignored for an existing
        # directory; state must not be readable by other users either way.
        os.chmod(self.root, DIR_MODE)
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0

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
        final = self.root / _record_name(addr)
        payload = json.dumps(
            {"containerID": container_id, "ifname": ifname, "created": int(time.time())}
        ).encode()
        with self.locked():
            tmp = self._write_temp(payload)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        log.debug("reserved %s for %s/%s", addr, container_id, ifname)
        return True

    def release(self, addr: IPAddress) -> bool:
        """Remove the record of `addr`; False if there was none (idempotent)."""
        with self.locked():
            try:
                os.unlink(self.root / _record_name(addr))
            except FileNotFoundError:
                return False
        log.debug("released %s", addr)
        return True

    def release_by_owner(self, container_id: str, ifname: str) -> list[IPAddress]:
        """Release every address (container_id, ifname) holds; [] when none."""
        with self.locked():
            mine = [r.addr for r in self.records() if (r.container_id, r.ifname) == (container_id, ifname)]
            return [addr for addr in mine if self.release(addr)]

    def find_by_owner(self, container_id: str, ifname: str) -> IPAddress | None:
        """The lowest address (container_id, ifname) holds, or None."""
        with self.locked():
            mine = [r.addr for r in self.records() if (r.container_id, r.ifname) == (container_id, ifname)]
        return min(mine) if mine else None

    def records(self) -> list[Allocation]:
        """All readable records, sorted by address. Corrupt ones are logged and skipped."""
        return self._scan()[0]

    def corrupt_addresses(self) -> list[IPAddress]:
        """Addresses whose record cannot be read or parsed; they stay taken until GC."""
        return self._scan()[1]

    def taken(self) -> set[IPAddress]:
        """Every address with a record file, readable or not (names only, no reads)."""
        with self.locked():
            return {a for a in map(_address_from_name, os.listdir(self.root)) if a is not None}

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
        addr = _address_from_name(text)
        if addr is None:
            log.warning("%s holds %r, not an IPv4 address; round-robin restarts at the range start", path, text)
        return addr

    def set_last_reserved(self, addr: IPAddress) -> None:
        """Remember `addr` as handed out last (atomic replace)."""
        data = (_record_name(addr) + "\n").encode()
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

    # -- internals ---------------------------------------------------------

    def _write_temp(self, data: bytes) -> Path:
        """Write `data` to a fresh mode-0600 temp file in root and return its path."""
        tmp = self.root / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
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
                addr = _address_from_name(name)
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
        path = self.root / _record_name(addr)
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
