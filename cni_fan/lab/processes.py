"""The processes the lab starts and stops: how they are run, and how they end.

Commands run inside a namespace through `ip netns exec` (same pid, and
/sys shows the namespace's own devices), with a small, predictable
environment. The only processes the lab ends are the agents it started and
processes still running inside its own namespaces (see run.down).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Iterable

from cni_fan.lab import netns

STOP_TIMEOUT = 10.0
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cni_fan_argv() -> list[str]:
    """How to run `cni-fan` with this very installation."""
    script = Path(sys.executable).with_name("cni-fan")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cni_fan.cli import main; sys.argv[0] = 'cni-fan'; main()"]


def find_tool(name: str) -> str:
    """The path of a system tool (`ip`, `bridge`), found on BASE_PATH."""
    return shutil.which(name, path=BASE_PATH) or name


def in_netns(ns: str, argv: list[str]) -> list[str]:
    """argv run in namespace `ns` the way an operator would (`ip netns exec`
    execs it: same pid; /sys shows the namespace's own devices)."""
    return [find_tool("ip"), "netns", "exec", ns, *argv]


def lab_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A small, predictable environment for what the lab starts."""
    env = {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def cmdline(pid: int) -> str:
    """The command line of `pid`, spaces between its arguments; "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie does not; our own child is reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def stop(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, wait, then SIGKILL; True when the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return True
            time.sleep(0.05)
    return not alive(pid)


def pids_in(namespaces: Iterable[str]) -> dict[int, str]:
    """Processes whose network namespace is one of `namespaces` (as `ip netns pids`)."""
    inodes = {}
    for name in namespaces:
        try:
            inodes[os.stat(netns.netns_path(name)).st_ino] = name
        except OSError:
            pass
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ino = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if ino in inodes:
            found[int(entry)] = inodes[ino]
    return found
