"""What every lab of the tests stands on: where the programs under test are,
the environment their commands get, running a command, entering a
namespace, and the root check.

One copy of each, so the labs (netlab, nodelab, podlab, bpflab) and the
tests never grow their own.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cni_fan.net.nsenter import switched

REPO = Path(__file__).resolve().parents[2]
CNITOOL = REPO / ".cache" / "bin" / "cnitool"
CNI_BIN = REPO / ".cache" / "cni-bin"
REFERENCE_BIN = Path("/usr/lib/cni")
CNI_FAN = REPO / ".venv" / "bin" / "cni-fan"
LIBCNI_CACHE = Path("/var/lib/cni/results")
# A short PATH for the plugin processes; nothing else leaks in from the
# environment pytest runs in (CNI_FAN_AGENT_SOCKET, say).
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The tools every kernel lab runs; a lab names the others it needs.
LAB_TOOLS = ("nsenter", "ip", "ping")


# Bits of /proc/<pid>/status CapEff (include/uapi/linux/capability.h).
CAP_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21, "BPF": 39}


def effective_caps(pid: int) -> int:
    """The effective capability set of process `pid`, as a bit mask (CAP_BITS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for pid {pid}")


def capped_argv(caps: Iterable[str]) -> list[str]:
    """setpriv's prefix that runs a program as root with only `caps` (e.g. "NET_ADMIN"):
    inheritable, ambient and bounding sets alike, as a container runtime grants a
    container's `capabilities.add` after dropping ALL."""
    capset = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps])
    return ["setpriv", f"--inh-caps={capset}", f"--ambient-caps={capset}", f"--bounding-set={capset}", "--"]


def run(argv: Iterable[Any], check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`argv` with BASE_ENV (unless `env` is given), text output captured;
    a failure raises with both outputs when `check`."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=kwargs.pop("env", BASE_ENV), **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stdout.strip()}\n{proc.stderr.strip()}")
    return proc


def require_kernel_lab(tools: Iterable[str] = (), plugins: bool = True) -> None:
    """Skip without root; fail when the plugin launchers (with `plugins`), or
    one of LAB_TOOLS and `tools`, is missing."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces)")
    if plugins:
        for program in (CNITOOL, CNI_BIN / "fan", CNI_BIN / "fan-ipam", CNI_FAN):
            if not program.exists():
                pytest.fail(f"{program} is missing: run tools/setup.sh")
    for tool in (*LAB_TOOLS, *tools):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run tools/setup.sh")


@contextlib.contextmanager
def inside(netns_path: str) -> Iterator[None]:
    """This thread in the namespace at `netns_path` for the block, and always
    back; sockets made inside stay in that namespace."""
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with switched(target):
            yield
    finally:
        os.close(target)


def in_netns(netns_path: str, fn: Callable[[], Any]) -> Any:
    """fn() called in a thread of its own inside the namespace at
    `netns_path` (for callers that must not move their own thread)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with inside(netns_path):
                box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
