"""Network namespaces: enter one just long enough to open a netlink socket.

A netlink socket stays bound to the namespace it was created in, so the
verbs open one socket per namespace and never leave the process switched.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

from pyroute2 import IPRoute

from cni_fan.net.errors import NetnsError, NetnsMissing
# setns and libc live in a module of their own, without pyroute2 (the
# benchmark harness uses them too); the plugin server takes both from here.
from cni_fan.net.nsenter import CLONE_NEWNET, _libc, setns, switched  # noqa: F401


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
        raise NetnsMissing(f"network namespace {path} does not exist", subject=path) from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}", exc.strerror, subject=path) from None


def netns_exists(path: str) -> bool:
    return path in PREOPENED or os.path.exists(path)


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Switch this thread into the namespace `fd`, and always back; a
    NetnsError if `fd` is not a network namespace."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(switched(fd))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise NetnsError("CNI_NETNS is not a network namespace") from None
            raise
        yield


def ipr_in(path: str) -> IPRoute:
    """An IPRoute whose socket lives in the namespace at `path`."""
    fd = open_netns(path)
    try:
        with entered(fd):
            return IPRoute()
    finally:
        os.close(fd)
