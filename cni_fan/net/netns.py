"""Network namespaces: a netlink socket inside one, without staying there.

A netlink socket stays bound to the namespace it was created in, so the
verbs open one socket per namespace and never leave the process switched.
Standalone, `fan` enters the namespace just long enough to open it; in the
plugin server's child the thin client has opened it already (the call
context's `netlink_fds`), and the child, which may not call setns(2),
uses that one.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator, Mapping

from pyroute2 import IPRoute

from cni_fan.net.errors import NetnsError, NetnsMissing
# setns lives in a module of its own, without pyroute2 (the benchmark
# harness and the plugin server use it too).
from cni_fan.net.nsenter import switched


def open_netns(path: str, preopened: Mapping[str, int]) -> int:
    """A descriptor for the namespace at `path`; caller closes it.

    `preopened` (the call context's `netns_fds`): descriptors the thin
    client opened, by path; the plugin server's child may not see the
    runtime's paths, but it holds those descriptors.
    """
    if path in preopened:
        return os.dup(preopened[path])
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsMissing(f"network namespace {path} does not exist", subject=path) from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}", exc.strerror, subject=path) from None


def netns_exists(path: str, preopened: Mapping[str, int]) -> bool:
    return path in preopened or os.path.exists(path)


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


def ipr_in(path: str, preopened: Mapping[str, int], sockets: Mapping[str, int] | None = None) -> IPRoute:
    """An IPRoute whose socket lives in the namespace at `path`.

    `sockets`: netlink sockets already open in namespaces, by path; the
    IPRoute gets a duplicate (it closes its own), so the raw codec can use
    the same socket after it, one at a time.
    """
    if sockets and path in sockets:
        return IPRoute(fileno=os.dup(sockets[path]))
    fd = open_netns(path, preopened)
    try:
        with entered(fd):
            return IPRoute()
    finally:
        os.close(fd)
