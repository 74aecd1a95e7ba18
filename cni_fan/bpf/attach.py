"""Attach, replace, query and detach our tc program on a device.

Adapter around pyroute2: a ``clsact`` qdisc and one ``bpf`` filter in
direct-action mode, identified by (hook, prio, handle). Attaching is
idempotent (``replace``), so an agent can simply re-run it when someone
deleted the filter or when the program changed. The caller passes an
``IPRoute`` bound to the right network namespace.
"""
from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyroute2.netlink.exceptions import NetlinkError

from .fanprog import Hook

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger("cni_fan.bpf")

PARENT = {Hook.INGRESS: 0xFFFFFFF2, Hook.EGRESS: 0xFFFFFFF3}
ETH_P_ALL = 0x0003
DEFAULT_NAME = "cni-fan"
DEFAULT_PRIO = 1
DEFAULT_HANDLE = 1
# TCA_BPF_* attribute types (include/uapi/linux/pkt_cls.h); pyroute2 0.9.7
# does not decode the last three, so they are read from the raw message.
TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG, TCA_BPF_ID = 7, 8, 10, 11
TCA_BPF_FLAG_ACT_DIRECT = 1


@dataclass(frozen=True)
class AttachedProgram:
    """A bpf filter found on a device."""

    ifindex: int
    hook: Hook
    prio: int
    handle: int
    name: str
    prog_id: int | None
    tag: str | None
    direct_action: bool


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    """Add the clsact qdisc unless the device already has one."""
    try:
        ipr.tc("add", "clsact", ifindex)
        log.debug("added clsact on ifindex %d", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach(ipr: IPRoute, ifindex: int, prog_fd: int, hook: Hook | str, *,
           name: str = DEFAULT_NAME, prio: int = DEFAULT_PRIO,
           handle: int = DEFAULT_HANDLE) -> None:
    """Attach (or atomically replace) the program on ``hook`` of a device."""
    hook = Hook(hook)
    ensure_clsact(ipr, ifindex)
    ipr.tc("replace-filter", "bpf", ifindex, handle, fd=prog_fd, name=name,
           parent=PARENT[hook], prio=prio, protocol=ETH_P_ALL,
           direct_action=True)
    log.info("attached %s on ifindex %d %s (prio %d, handle %d)", name,
             ifindex, hook.value, prio, handle)


def detach(ipr: IPRoute, ifindex: int, hook: Hook | str, *,
           prio: int = DEFAULT_PRIO, handle: int = DEFAULT_HANDLE) -> bool:
    """Remove our filter; True if one was there. The clsact qdisc stays
    (other tools may have filters on it)."""
    hook = Hook(hook)
    if find(ipr, ifindex, hook, prio=prio, handle=handle) is None:
        return False
    try:
        ipr.tc("del-filter", "bpf", ifindex, handle, parent=PARENT[hook],
               prio=prio, protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL):
            return False
        raise
    log.info("detached filter from ifindex %d %s", ifindex, hook.value)
    return True


def list_attached(ipr: IPRoute, ifindex: int,
                  hook: Hook | str) -> list[AttachedProgram]:
    """Every bpf filter on ``hook`` of the device (ours or not)."""
    hook = Hook(hook)
    try:
        msgs = ipr.get_filters(index=ifindex, parent=PARENT[hook])
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []  # no clsact qdisc, or no such device
        raise
    found = []
    for msg in msgs:
        if msg.get_attr("TCA_KIND") != "bpf" or not msg["handle"]:
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        if opts is None:
            continue
        raw = _raw_attrs(opts)
        name = raw.get(TCA_BPF_NAME, b"").split(b"\0")[0].decode()
        flags = struct.unpack("=I", raw[TCA_BPF_FLAGS][:4])[0] \
            if TCA_BPF_FLAGS in raw else 0
        prog_id = struct.unpack("=I", raw[TCA_BPF_ID][:4])[0] \
            if TCA_BPF_ID in raw else None
        tag = raw[TCA_BPF_TAG].hex() if TCA_BPF_TAG in raw else None
        found.append(AttachedProgram(
            ifindex=ifindex, hook=hook, prio=msg["info"] >> 16,
            handle=msg["handle"], name=name, prog_id=prog_id, tag=tag,
            direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT)))
    return found


def find(ipr: IPRoute, ifindex: int, hook: Hook | str, *,
         prio: int = DEFAULT_PRIO,
         handle: int = DEFAULT_HANDLE) -> AttachedProgram | None:
    """Our filter slot (hook, prio, handle), whatever program is in it."""
    for prog in list_attached(ipr, ifindex, hook):
        if prog.prio == prio and prog.handle == handle:
            return prog
    return None


def is_attached(ipr: IPRoute, ifindex: int, hook: Hook | str, *,
                prog_id: int | None = None, name: str = DEFAULT_NAME,
                prio: int = DEFAULT_PRIO,
                handle: int = DEFAULT_HANDLE) -> bool:
    """Whether our slot holds our program in direct-action mode.

    With ``prog_id`` (see :func:`cni_fan.bpf.syscall.prog_info`) it must be
    exactly that program; otherwise the filter name must match.
    """
    prog = find(ipr, ifindex, hook, prio=prio, handle=handle)
    if prog is None or not prog.direct_action:
        return False
    if prog_id is not None:
        return prog.prog_id == prog_id
    return prog.name == name


def _raw_attrs(nla: object) -> dict[int, bytes]:
    """The nested attributes of a decoded NLA, from its raw bytes."""
    data: bytes = nla.data  # type: ignore[attr-defined]
    start: int = nla.offset  # type: ignore[attr-defined]
    end = start + nla.length  # type: ignore[attr-defined]
    pos = start + 4  # skip the container's own header
    out: dict[int, bytes] = {}
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = bytes(data[pos + 4:pos + length])
        pos += (length + 3) & ~3
    return out
