"""Network namespaces: a netlink socket inside one, without staying there.

A netlink socket stays bound to the namespace it was created in, so the
verbs open one socket per namespace and never leave the process switched.
Standalone, `fan` enters the namespace just long enough to open it; in the
plugin server's child the thin client has opened it already (the call
context's `netlink_fds`), and the child, which may not call setns(2),
uses that one. No `contextlib` and no pyroute2: every CNI call imports this.
"""
from __future__ import annotations

import errno
import os
from typing import Mapping

from cni_fan.net.errors import NetnsError, NetnsMissing
# setns lives in a module of its own, without pyroute2 (the benchmark
# harness and the plugin server use it too).
from cni_fan.net.nsenter import switched
from cni_fan.net.rtnl import Rtnl


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


class entered(switched):
    """`with entered(fd):` switches this thread into the namespace `fd`, and always back; a
    NetnsError if `fd` is not a network namespace."""

    def __enter__(self) -> None:
        try:
            super().__enter__()
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise NetnsError("CNI_NETNS is not a network namespace") from None
            raise


def rtnl_in(path: str, preopened: Mapping[str, int], sockets: Mapping[str, int] | None = None) -> Rtnl:
    """A raw netlink socket in the namespace at `path`.

    `sockets`: netlink sockets already open in namespaces, by path (the thin
    client's, in the plugin server's child); the Rtnl gets a duplicate (it
    closes its own), so the port guard can use the same socket after it.
    """
    if sockets and path in sockets:
        return Rtnl.adopt(os.dup(sockets[path]))
    fd = open_netns(path, preopened)
    try:
        with entered(fd):
            return Rtnl()
    finally:
        os.close(fd)
