"""tc: a `clsact` qdisc and `bpf` filters in direct-action mode, on the raw codec.

One module for every tc filter we attach: the fan program on the tunnel's
egress (node agent) and each pod's anti-spoofing program on its host veth's
ingress (port guard, inside ADD's one batch, hence the request builders).
A filter is identified by (hook, prio, handle); attaching replaces what is
in that slot, so re-running it repairs a deleted filter or swaps a program.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from typing import NamedTuple

from cni_fan.net import rtnl
from cni_fan.net.errors import TcError
from cni_fan.net.rtnl import Reply, Request, Rtnl

log = logging.getLogger("cni_fan.tc")

PARENT = {"ingress": (rtnl.TC_H_CLSACT & 0xFFFF0000) | rtnl.TC_H_MIN_INGRESS,
          "egress": (rtnl.TC_H_CLSACT & 0xFFFF0000) | rtnl.TC_H_MIN_EGRESS}
DEFAULT_NAME = "cni-fan"
DEFAULT_PRIO = 1
DEFAULT_HANDLE = 1


class AttachedProgram(NamedTuple):
    """A filter found on a device: a bpf program (`kind` "bpf"), or another kind in one of our slots."""

    ifindex: int
    hook: str
    prio: int
    handle: int
    name: str
    prog_id: int | None
    tag: str | None
    direct_action: bool
    kind: str = "bpf"


def _hook(hook: str) -> str:
    """The hook's name, "ingress" or "egress", also from cni_fan.bpf.fanprog.Hook (a str Enum)."""
    return str(getattr(hook, "value", hook))


def _parent(hook: str) -> int:
    try:
        return PARENT[_hook(hook)]
    except KeyError:
        raise ValueError(f"tc hook must be ingress or egress, not {hook!r}") from None


# -- requests (for a caller's own batch) ----------------------------------------------------------

def clsact_request(ifindex: int) -> Request:
    """Add the clsact qdisc; EEXIST when the device has one (callers tolerate it)."""
    body = rtnl.TCMSG.pack(rtnl.AF_UNSPEC, ifindex, 0xFFFF0000, rtnl.TC_H_CLSACT, 0)
    body += rtnl.attr_str(rtnl.TCA_KIND, "clsact")
    return rtnl.RTM_NEWQDISC, rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL, body


def filter_request(ifindex: int, prog_fd: int, hook: str, *, name: str = DEFAULT_NAME, prio: int = DEFAULT_PRIO,
                   handle: int = DEFAULT_HANDLE) -> Request:
    """Put the program `prog_fd` into the slot (hook, prio, handle), direct action; replaces what is there."""
    info = (prio << 16) | socket.htons(rtnl.ETH_P_ALL)
    options = rtnl.nested(rtnl.TCA_OPTIONS, rtnl.attr_u32(rtnl.TCA_BPF_FD, prog_fd),
                          rtnl.attr_str(rtnl.TCA_BPF_NAME, name),
                          rtnl.attr_u32(rtnl.TCA_BPF_FLAGS, rtnl.TCA_BPF_FLAG_ACT_DIRECT))
    body = rtnl.TCMSG.pack(rtnl.AF_UNSPEC, ifindex, handle, _parent(hook), info) + rtnl.attr_str(rtnl.TCA_KIND, "bpf")
    return rtnl.RTM_NEWTFILTER, rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE, body + options


def delete_filter_request(ifindex: int, hook: str, *, prio: int = DEFAULT_PRIO,
                          handle: int = DEFAULT_HANDLE) -> Request:
    info = (prio << 16) | socket.htons(rtnl.ETH_P_ALL)
    body = rtnl.TCMSG.pack(rtnl.AF_UNSPEC, ifindex, handle, _parent(hook), info) + rtnl.attr_str(rtnl.TCA_KIND, "bpf")
    return rtnl.RTM_DELTFILTER, rtnl.NLM_F_ACK, body


def decode_filter(ifindex: int, hook: str, data: bytes, start: int, end: int) -> AttachedProgram | None:
    """An RTM_NEWTFILTER message of a dump; None for the chain head the dump lists per prio (no handle)."""
    _family, _index, handle, _parent_id, info = rtnl.TCMSG.unpack_from(data, start)
    if not handle:
        return None
    attrs = rtnl.parse_attrs(data, start + rtnl.TCMSG.size, end)
    options = rtnl.parse_attrs(attrs.get(rtnl.TCA_OPTIONS, b""))
    tag = options.get(rtnl.TCA_BPF_TAG)
    return AttachedProgram(ifindex=ifindex, hook=_hook(hook), prio=info >> 16, handle=handle,
                           name=rtnl.cstr(options.get(rtnl.TCA_BPF_NAME)) or "",
                           prog_id=rtnl.u32(options.get(rtnl.TCA_BPF_ID)), tag=tag.hex() if tag else None,
                           direct_action=bool((rtnl.u32(options.get(rtnl.TCA_BPF_FLAGS)) or 0)
                                              & rtnl.TCA_BPF_FLAG_ACT_DIRECT),
                           kind=rtnl.cstr(attrs.get(rtnl.TCA_KIND)) or "")


# -- verbs ------------------------------------------------------------------------------------------

def attach(sock: Rtnl, ifindex: int, prog_fd: int, hook: str, *, name: str = DEFAULT_NAME,
           prio: int = DEFAULT_PRIO, handle: int = DEFAULT_HANDLE) -> None:
    """Attach (or atomically replace) the program in the slot (hook, prio, handle), adding clsact if needed."""
    replies = sock.batch([clsact_request(ifindex),
                          filter_request(ifindex, prog_fd, hook, name=name, prio=prio, handle=handle)])
    _raise_for(replies, ifindex, [("adding the clsact qdisc", (errno.EEXIST,)), (f"attaching {name}", ())])
    log.info("attached %s on ifindex %d %s (prio %d, handle %d)", name, ifindex, _hook(hook),
             prio, handle)


def detach(sock: Rtnl, ifindex: int, hook: str, *, prio: int = DEFAULT_PRIO, handle: int = DEFAULT_HANDLE) -> bool:
    """Remove the filter in the slot; True if one was there. The clsact qdisc stays
    (other tools may have filters on it)."""
    if find(sock, ifindex, hook, prio=prio, handle=handle) is None:
        return False
    reply = sock.batch([delete_filter_request(ifindex, hook, prio=prio, handle=handle)])[0]
    if reply.errno in (errno.ENOENT, errno.EINVAL):
        return False
    _raise_for([reply], ifindex, [("detaching the filter", ())])
    log.info("detached filter from ifindex %d %s", ifindex, _hook(hook))
    return True


def filters(sock: Rtnl, ifindex: int, hook: str) -> list[AttachedProgram]:
    """Every filter on `hook` of the device, of any kind; [] without a clsact qdisc or device.

    Raises OSError when the kernel refuses the dump for another reason.
    """
    request = rtnl.TCMSG.pack(rtnl.AF_UNSPEC, ifindex, 0, _parent(hook), 0)
    found = []
    try:
        for _kind, data, start, end in sock.dump(rtnl.RTM_GETTFILTER, request):
            program = decode_filter(ifindex, hook, data, start, end)
            if program is not None:
                found.append(program)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise
    return found


def list_attached(sock: Rtnl, ifindex: int, hook: str) -> list[AttachedProgram]:
    """Every bpf filter on `hook` of the device (ours or not)."""
    return [f for f in filters(sock, ifindex, hook) if f.kind == "bpf"]


def find(sock: Rtnl, ifindex: int, hook: str, *, prio: int = DEFAULT_PRIO,
         handle: int = DEFAULT_HANDLE) -> AttachedProgram | None:
    """The filter in the slot (hook, prio, handle), whatever program it holds."""
    for program in list_attached(sock, ifindex, hook):
        if program.prio == prio and program.handle == handle:
            return program
    return None


def is_attached(sock: Rtnl, ifindex: int, hook: str, *, prog_id: int | None = None, name: str = DEFAULT_NAME,
                prio: int = DEFAULT_PRIO, handle: int = DEFAULT_HANDLE) -> bool:
    """Whether the slot holds our program in direct-action mode.

    With `prog_id` (see cni_fan.bpf.syscall.prog_info) it must be exactly
    that program; otherwise the filter's name must match.
    """
    program = find(sock, ifindex, hook, prio=prio, handle=handle)
    if program is None or not program.direct_action:
        return False
    if prog_id is not None:
        return program.prog_id == prog_id
    return program.name == name


def _raise_for(replies: list[Reply], ifindex: int, what: list[tuple[str, tuple[int, ...]]]) -> None:
    failed = rtnl.check(replies, what)
    if failed is not None:
        label, code = failed
        raise TcError(f"tc: {label} on ifindex {ifindex} failed", os.strerror(code), subject=str(ifindex))
