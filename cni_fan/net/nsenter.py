"""Switch the calling thread into a network namespace and back: setns(2).

Standard library only, on purpose: the benchmark harness (bench/common.py)
imports it, and `bench.run --list` must work without pyroute2. The
product's namespace helpers (cni_fan/net/netns.py) and the lab's
(cni_fan/lab/netns.py) build on it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

CLONE_NEWNET = 0x40000000
# libc is resolved once, at import: pyroute2's helper looks it up with
# ctypes.util.find_library, which runs `ldconfig` in a subprocess per process.
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move this thread into the network namespace `fd`."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def switched(fd: int) -> Iterator[None]:
    """Run the block with this thread in the namespace `fd`, and always switch
    back. An OSError of the switch itself leaves __enter__ as it is; sockets
    opened inside stay bound to the namespace after the switch back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)
