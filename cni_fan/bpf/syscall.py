"""The few ``bpf(2)`` commands cni-fan needs, through ctypes.

Adapter: load a SCHED_CLS program (with the verifier's log on failure), pin
and re-open objects on bpffs, a per-CPU array of counters, program info, and
BPF_PROG_TEST_RUN (runs a program on a packet in the kernel, used by the
tests to check the generated program byte for byte).

``union bpf_attr`` layouts are from ``include/uapi/linux/bpf.h``; only the
prefix each command reads is sent (the kernel zero-fills the rest).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from typing import NamedTuple

log = logging.getLogger("cni_fan.bpf")

# bpf(2) commands.
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6

BPFFS = "/sys/fs/bpf"
BPF_FS_MAGIC = 0xCAFE4A11

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280,
               "ppc64le": 361, "s390x": 351, "i686": 357}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf(2) command; ``log`` holds the verifier's output if any."""

    def __init__(self, err: int, what: str, log_text: str = "") -> None:
        msg = f"{what}: {os.strerror(err)}"
        if log_text:
            msg += "\n--- verifier log ---\n" + log_text.rstrip()
        super().__init__(err, msg)
        self.log = log_text

    def __str__(self) -> str:  # OSError's default hides multi-line text
        return self.args[1]


def _nr() -> int:
    machine = os.uname().machine  # what platform.machine() reads, without importing `platform`
    if machine not in _SYSCALL_NR:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {machine}")
    return _SYSCALL_NR[machine]


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), attr,
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return ret


def _attr(size: int, fmt: str, *values: object) -> ctypes.Array:
    buf = ctypes.create_string_buffer(size)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(obj: ctypes.Array | None) -> int:
    return ctypes.addressof(obj) if obj is not None else 0


def _name16(name: str) -> bytes:
    """Object names: at most 15 characters of [A-Za-z0-9_.]."""
    clean = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return clean.encode()[:15]


def load_sched_cls(insns: bytes, name: str = "cni_fan",
                   log_size: int = 1 << 20) -> int:
    """Load a tc classifier program; returns its fd.

    The program is first loaded without a log (faster); if the verifier
    rejects it, it is loaded again with a full log, which goes into the
    raised :class:`BpfError`.
    """
    if len(insns) % 8 or not insns:
        raise ValueError("program must be a non-empty multiple of 8 bytes")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    for level, size in ((0, 0), (1, log_size)):
        logbuf = ctypes.create_string_buffer(size) if size else None
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
        # kern_version, prog_flags, prog_name[16]
        attr = _attr(128, "=IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS,
                     len(insns) // 8, _addr(code), _addr(lic), level, size,
                     _addr(logbuf), 0, 0, _name16(name))
        try:
            fd = _bpf(BPF_PROG_LOAD, attr, f"loading program {name!r}")
        except BpfError as exc:
            if level == 0:
                continue
            text = logbuf.value.decode(errors="replace") if logbuf else ""
            raise BpfError(exc.errno, f"loading program {name!r}",
                           text) from None
        log.debug("loaded program %s: %d instructions, fd %d", name,
                  len(insns) // 8, fd)
        return fd
    raise AssertionError("unreachable")


def create_percpu_array(value_size: int, max_entries: int,
                        name: str = "cni_fan") -> int:
    """A per-CPU array map (u32 keys); returns its fd."""
    attr = _attr(64, "=IIIIIII16s", BPF_MAP_TYPE_PERCPU_ARRAY, 4, value_size,
                 max_entries, 0, 0, 0, _name16(name))
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {name!r}")


def possible_cpus() -> int:
    """How many values a per-CPU map returns per key (possible CPUs)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def read_percpu_u64(map_fd: int, key: int) -> list[int]:
    """One u64 per possible CPU for ``key``."""
    ncpu = possible_cpus()
    k = ctypes.create_string_buffer(struct.pack("=I", key), 4)
    v = ctypes.create_string_buffer(8 * ncpu)
    attr = _attr(32, "=IIQQQ", map_fd, 0, _addr(k), _addr(v), 0)
    _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"reading key {key} of map fd {map_fd}")
    return list(struct.unpack(f"={ncpu}Q", v.raw))


def write_percpu_u64(map_fd: int, key: int, values: list[int]) -> None:
    """Set ``key`` to ``values`` (one per possible CPU); used to reset."""
    ncpu = possible_cpus()
    if len(values) != ncpu:
        raise ValueError(f"need {ncpu} values, got {len(values)}")
    k = ctypes.create_string_buffer(struct.pack("=I", key), 4)
    v = ctypes.create_string_buffer(struct.pack(f"={ncpu}Q", *values))
    attr = _attr(32, "=IIQQQ", map_fd, 0, _addr(k), _addr(v), 0)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, f"writing key {key} of map fd {map_fd}")


class ProgInfo(NamedTuple):
    """What the kernel tells about a loaded program."""

    type: int
    id: int
    tag: str
    name: str


def prog_info(fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a program (type, id, tag, name)."""
    info = ctypes.create_string_buffer(256)
    attr = _attr(16, "=IIQ", fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"querying program fd {fd}")
    # type u32, id u32, tag[8], jited_len u32, xlated_len u32,
    # jited_insns u64, xlated_insns u64, load_time u64, uid u32,
    # nr_map_ids u32, map_ids u64, name[16]
    ptype, pid, tag = struct.unpack_from("=II8s", info, 0)
    name = struct.unpack_from("=16s", info, 64)[0].split(b"\0")[0].decode()
    return ProgInfo(ptype, pid, tag.hex(), name)


def prog_fd_by_id(prog_id: int) -> int:
    """Open a loaded program by its id (e.g. the one tc reports)."""
    attr = _attr(16, "=III", prog_id, 0, 0)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"opening program id {prog_id}")


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps a loaded program uses."""
    info = ctypes.create_string_buffer(256)
    attr = _attr(16, "=IIQ", fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"querying program fd {fd}")
    count = struct.unpack_from("=I", info, 52)[0]  # nr_map_ids
    if not count:
        return []
    ids = ctypes.create_string_buffer(4 * count)
    info = ctypes.create_string_buffer(256)
    struct.pack_into("=IQ", info, 52, count, _addr(ids))  # nr_map_ids, map_ids
    attr = _attr(16, "=IIQ", fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"querying the maps of program fd {fd}")
    return list(struct.unpack(f"={count}I", ids.raw))


def map_fd_by_id(map_id: int) -> int:
    """Open a map by its id (e.g. one of :func:`prog_map_ids`)."""
    attr = _attr(16, "=III", map_id, 0, 0)
    return _bpf(BPF_MAP_GET_FD_BY_ID, attr, f"opening map id {map_id}")


class TestRun(NamedTuple):
    """Result of BPF_PROG_TEST_RUN."""

    retval: int
    data: bytes
    duration_ns: int


def test_run(prog_fd: int, data: bytes, ctx: bytes | None = None,
             repeat: int = 1) -> TestRun:
    """Run a program on ``data`` (an Ethernet frame) inside the kernel.

    ``ctx`` optionally seeds ``struct __sk_buff`` (the kernel accepts only a
    few fields, e.g. mark, ifindex, gso_size). Helpers that send packets
    (redirects) only record their verdict here.
    """
    out = ctypes.create_string_buffer(len(data) + 512)
    din = ctypes.create_string_buffer(data, len(data))
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    # prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
    # repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out
    attr = _attr(80, "=IIIIQQIIIIQQ", prog_fd, 0, len(data), len(out),
                 _addr(din), _addr(out), repeat, 0, len(ctx) if ctx else 0, 0,
                 _addr(cin), 0)
    _bpf(BPF_PROG_TEST_RUN, attr, f"test-running program fd {prog_fd}")
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    return TestRun(retval, out.raw[:size_out], duration)


test_run.__test__ = False  # not a pytest test, despite the name


def bpffs_mounted(path: str = BPFFS) -> bool:
    """Whether a bpf filesystem is mounted exactly at ``path``."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == path and parts[2] == "bpf":
                return True
    return False


def ensure_bpffs(path: str = BPFFS) -> None:
    """Mount bpffs at ``path`` unless one is already there."""
    if bpffs_mounted(path):
        return
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting bpffs at {path}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", path)


def pin(fd: int, path: str) -> None:
    """Pin an object on bpffs so it outlives this process."""
    p = ctypes.create_string_buffer(path.encode())
    attr = _attr(16, "=QII", _addr(p), fd, 0)
    _bpf(BPF_OBJ_PIN, attr, f"pinning fd {fd} at {path}")


def get_pinned(path: str) -> int:
    """Open a pinned object; returns a new fd."""
    p = ctypes.create_string_buffer(path.encode())
    attr = _attr(16, "=QII", _addr(p), 0, 0)
    return _bpf(BPF_OBJ_GET, attr, f"opening pinned object {path}")


def close(fd: int) -> None:
    os.close(fd)
