"""Shared helpers of the benchmarks: tools, processes, namespaces and the run's `Lab`
(what they record about a run is in `bench.record`).

Everything a benchmark creates on the machine carries its run's prefix
`bfan-<6 hex>-` (namespaces, the temporary directory, cnitool's cache
files) and is removed when its `Lab` closes: at the end, on an error, on
Ctrl-C and on SIGTERM/SIGHUP. A run holds a lock file under /run/bfan/
while it lives; a later run removes what a killed run (`kill -9`) left
behind, and only namespaces whose run no longer holds its lock.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from cni_fan.net.nsenter import switched

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DOC_PATH = REPO / "docs" / "benchmarks.md"
NETNS_DIR = Path("/var/run/netns")
LOCK_DIR = Path("/run/bfan")
CNI_CACHE_RESULTS = Path("/var/lib/cni/results")
PREFIX = "bfan-"
RUN_RE = re.compile(r"^bfan-([0-9a-f]{6})-")


class BenchError(RuntimeError):
    """The benchmark could not run (set-up, a failed call): not a slow result."""


# -- tools --------------------------------------------------------------------

def find_cnitool() -> str:
    for candidate in (REPO / ".cache" / "bin" / "cnitool", shutil.which("cnitool")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError("cnitool not found: run `make setup` (it builds .cache/bin/cnitool)")


def cni_fan_command() -> list[str]:
    """`cni-fan` of the environment running the benchmark."""
    beside = Path(sys.executable).with_name("cni-fan")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("cni-fan")
    if found:
        return [found]
    raise BenchError("cni-fan not found: run `make setup` (it installs the project into .venv)")


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("benchmarks need root (network namespaces)")


# -- processes ------------------------------------------------------------------

@dataclass
class Call:
    argv: list[str]
    start: float = 0.0
    end: float = 0.0
    returncode: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0

    def check(self, what: str) -> "Call":
        if self.returncode != 0:
            tail = (self.stderr.decode(errors="replace")[-1500:] + self.stdout.decode(errors="replace")[-1500:])
            raise BenchError(f"{what} failed (exit {self.returncode}): {' '.join(self.argv)}\n{tail}")
        return self


def run_batch(argvs: Sequence[Sequence[str]], env: Mapping[str, str], timeout: float = 120.0) -> list[Call]:
    """Start every command at once; each Call times its own process from spawn to exit.

    The end of each process is seen through a pidfd, so one slow call does
    not delay the timing of the others.
    """
    files = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in argvs]
    calls = [Call(list(argv)) for argv in argvs]
    procs: list[subprocess.Popen] = []
    pidfds: dict[int, int] = {}
    poller = select.poll()
    try:
        for i, (call, (out, err)) in enumerate(zip(calls, files)):
            call.start = time.perf_counter()
            proc = subprocess.Popen(call.argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            procs.append(proc)
            fd = os.pidfd_open(proc.pid)
            pidfds[fd] = i
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while pidfds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{len(pidfds)} call(s) still running after {timeout:.0f} s: "
                                 f"{' '.join(calls[next(iter(pidfds.values()))].argv)}")
            for fd, _event in poller.poll(left * 1000):
                calls[pidfds[fd]].end = time.perf_counter()
                poller.unregister(fd)
                os.close(fd)
                i = pidfds.pop(fd)
                calls[i].returncode = procs[i].wait()
    finally:
        for fd in pidfds:
            os.close(fd)
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for call, (out, err) in zip(calls, files):
            out.seek(0)
            err.seek(0)
            call.stdout, call.stderr = out.read(), err.read()
            out.close()
            err.close()
    return calls


def run_one(argv: Sequence[str], env: Mapping[str, str], timeout: float = 120.0) -> Call:
    return run_batch([argv], env, timeout)[0]


# -- namespaces -----------------------------------------------------------------

@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run this thread (and whatever it spawns) in the named namespace, then come back
    (the product's switch: cni_fan.net.nsenter imports nothing but the standard library)."""
    target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with switched(target):
            yield
    finally:
        os.close(target)


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def ip_batch(lines: Iterable[str], force: bool = False) -> subprocess.CompletedProcess:
    text = "".join(line + "\n" for line in lines)
    if not text:
        return subprocess.CompletedProcess(["ip"], 0, "", "")
    argv = ["ip"] + (["-force"] if force else []) + ["-batch", "-"]
    return subprocess.run(argv, input=text, capture_output=True, text=True, timeout=300)


def ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def _remove_run_leftovers(run_id: str) -> None:
    ip_batch([f"netns del {n}" for n in list_netns() if n.startswith(f"{PREFIX}{run_id}-")], force=True)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}{run_id}-*"):
        shutil.rmtree(path, ignore_errors=True)
    if CNI_CACHE_RESULTS.is_dir():
        for path in CNI_CACHE_RESULTS.glob(f"{PREFIX}{run_id}-*"):
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def run_is_over(run_id: str) -> Iterator[bool]:
    """Whether run `run_id` is over: False while it holds its lock file (it is alive);
    True when it has none or does not hold it, the lock then held here until the
    block ends."""
    try:
        fd = os.open(LOCK_DIR / f"{run_id}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_stale_runs() -> list[str]:
    """Remove what runs killed without cleaning up left behind; returns their ids."""
    ids = {m.group(1) for n in list_netns() if (m := RUN_RE.match(n))}
    if LOCK_DIR.is_dir():
        ids |= {p.stem for p in LOCK_DIR.glob("*.lock")}
    stale = []
    for run_id in sorted(ids):
        with run_is_over(run_id) as over:
            if not over:
                continue  # that run is alive
            _remove_run_leftovers(run_id)
            stale.append(run_id)
            with contextlib.suppress(FileNotFoundError):
                (LOCK_DIR / f"{run_id}.lock").unlink()
    return stale


PR_SET_PDEATHSIG = 1
# The preexec_fn below calls libc through this. It used to sit with the harness's own
# setns copy; removing it along with that copy makes every spawn fail with a bare
# "Exception occurred in preexec_fn." (the child's NameError is not passed back).
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In a spawned child: get SIGTERM when the benchmark dies, even by SIGKILL."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class _Terminated(KeyboardInterrupt):
    pass


def _raise_terminated(signum, _frame):
    raise _Terminated(f"stopped by signal {signal.Signals(signum).name}")


@dataclass
class Lab:
    """One run's namespaces, temporary directory and background processes.

    Use as a context manager: `close()` removes everything, whatever
    happened. SIGTERM and SIGHUP are turned into KeyboardInterrupt while it
    is open, so they clean up like Ctrl-C.
    """
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    tmp: Path = field(init=False)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _lock_fd: int | None = None
    _old_handlers: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.run_id}-"

    def name(self, suffix: str) -> str:
        return self.prefix + suffix

    def __enter__(self) -> "Lab":
        require_root()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, _raise_terminated)
        try:
            stale = remove_stale_runs()
            if stale:
                print(f"bench: removed leftovers of killed runs {', '.join(stale)}", file=sys.stderr)
            LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Locked before it gets its name: a visible lock file of a live run is always held.
            fresh = LOCK_DIR / f".{self.run_id}.lock.new"
            self._lock_fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            os.rename(fresh, LOCK_DIR / f"{self.run_id}.lock")
            self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def add_netns(self, suffixes: Iterable[str]) -> list[str]:
        names = [self.name(s) for s in suffixes]
        out = ip_batch(f"netns add {n}" for n in names)
        if out.returncode != 0:
            raise BenchError(f"creating namespaces failed: {out.stderr.strip()}")
        return names

    def spawn(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """A background process that close() stops (SIGTERM, then SIGKILL)."""
        proc = subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.procs.clear()
            _remove_run_leftovers(self.run_id)
            if self._lock_fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    (LOCK_DIR / f"{self.run_id}.lock").unlink()
                os.close(self._lock_fd)
                self._lock_fd = None
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def wait_for_path(path: Path, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what or proc.args} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what or path} did not appear within {timeout:.0f} s")
        time.sleep(0.02)


def proc_children_cpu_seconds(pid: int) -> float:
    """CPU time of the reaped children of `pid` (cutime + cstime), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return math.nan
        raise
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[13]) + int(fields[14])) / ticks  # fields 16, 17 of proc(5), counted from pid
