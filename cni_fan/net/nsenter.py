"""Switch the calling thread into a network namespace and back: setns(2).

Standard library only, on purpose, and only its cheapest parts: the thin
client (cni_fan/entry.py) enters the pod with it on every served ADD and
CHECK, where `contextlib` or the `ctypes` package would cost more than the
rest of the call; the benchmark harness (bench/common.py) imports it too,
and `bench.run --list` must work without pyroute2. The product's
namespace helpers (cni_fan/net/netns.py) and the lab's
(cni_fan/lab/netns.py) build on it.
"""
from __future__ import annotations

import os

CLONE_NEWNET = 0x40000000


def _libc_setns():
    """libc's setns through the C module `_ctypes` (Pythons before 3.12 have no `os.setns`).

    Not the `ctypes` package: it defines every C type on import.
    """
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    function = Function(_ctypes.dlsym(_ctypes.dlopen(None), "setns"))

    def setns(fd: int) -> None:
        if function(fd, CLONE_NEWNET) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return setns


def _os_setns(fd: int) -> None:
    os.setns(fd, CLONE_NEWNET)


# Move this thread into the network namespace `fd` (OSError when it cannot).
setns = _os_setns if hasattr(os, "setns") else _libc_setns()


class switched:
    """`with switched(fd):` runs the block with this thread in the namespace
    `fd`, and always switches back. An OSError of the switch itself leaves
    __enter__ as it is; sockets opened inside stay bound to the namespace
    after the switch back. A class, not a contextlib generator: see above."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.home = -1

    def __enter__(self) -> None:
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.fd)
        except BaseException:
            os.close(self.home)
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            setns(self.home)
        finally:
            os.close(self.home)
