"""Network namespaces: enter one just long enough to open a netlink socket.

A netlink socket stays bound to the namespace it was created in, so the
verbs open one socket per namespace and never leave the process switched.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

import ctypes

from pyroute2 import IPRoute

from cni_fan.cni.errors import CniError, INVALID_ENVIRONMENT, UNKNOWN_CONTAINER

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


# Namespace files the thin client opened for us (server mode): path -> fd.
# The child of the plugin server may not see the runtime's paths, but it
# holds descriptors the client passed over the socket.
PREOPENED: dict[str, int] = {}


def open_netns(path: str) -> int:
    """A descriptor for the namespace at `path`; caller closes it."""
    if path in PREOPENED:
        return os.dup(PREOPENED[path])
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise CniError(INVALID_ENVIRONMENT, f"cannot open network namespace {path}", exc.strerror) from None


def netns_exists(path: str) -> bool:
    return path in PREOPENED or os.path.exists(path)


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Switch this thread into the namespace `fd`, and always back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS is not a network namespace") from None
            raise
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def ipr_in(path: str) -> IPRoute:
    """An IPRoute whose socket lives in the namespace at `path`."""
    fd = open_netns(path)
    try:
        with entered(fd):
            return IPRoute()
    finally:
        os.close(fd)
