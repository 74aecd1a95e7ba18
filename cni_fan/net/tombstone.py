"""DEL answers before the kernel has torn the pod's veth down.

Deleting a veth makes the kernel wait for RCU grace periods before the
request returns: most of a DEL, and nothing the runtime needs to wait for.
What it needs is that the pod is cut off, the attachment's names are free
and its address is released. So DEL `bury`s the host end: down and off the
bridge (the pod end loses its carrier: no path to the node or other pods),
then renamed to a tombstone (`fanz` + the veth's hash, so the attachment's
`fanv` name is free at once). The tombstone is deleted after the answer
(`delete`: by the plugin server's child after its reply, standalone by a
detached process), or by whoever meets it first:

- the next ADD of the same attachment (`clear`): its pod end still holds the
  interface's name inside the pod, which the new ADD wants;
- GC (`sweep`: every tombstone, whoever left it: a crash between answer and
  deletion);
- the kernel, when the pod's namespace goes: a veth is deleted with either
  end's namespace.

Every tombstone is garbage, so deleting one by name can never hurt a live
pod, whichever DEL made it. Raw codec: one socket, a few small requests,
no pyroute2.
"""
from __future__ import annotations

import errno
import logging
import os

from cni_fan.net import links, rtnl
from cni_fan.net.errors import LinkError
from cni_fan.net.rtnl import AF_UNSPEC, IFINFOMSG, Reply, Rtnl
from cni_fan.net.rtnl_links import link_info, set_link

log = logging.getLogger("cni_fan.net")

TOMBSTONE_PREFIX = "fanz"


def tombstone_name(veth: str) -> str:
    """The tombstone of a host veth: same hash, another prefix (IFNAMSIZ holds both)."""
    if not veth.startswith(links.HOST_VETH_PREFIX):
        raise ValueError(f"{veth!r} is not a pod's host veth")
    return TOMBSTONE_PREFIX + veth[len(links.HOST_VETH_PREFIX):]


def _failed(reply: Reply, what: str, name: str) -> LinkError:
    return LinkError(f"failed to {what} {name!r}", os.strerror(reply.errno), subject=name)


def bury(host: Rtnl, veth: str) -> str | None:
    """Cut `veth` off and rename it to its tombstone; returns the tombstone's name, None if there is no veth.

    Down first: the kernel renames only a link that is down. A tombstone
    of the same name still there (an earlier DEL's, not yet deleted) is
    deleted first, here.
    """
    link = links.get_link(host, veth)
    if link is None:
        return None
    tomb = tombstone_name(veth)
    for attempt in (1, 2):
        cut, renamed = host.batch([set_link(link.index, up=False, master=0), set_link(link.index, tomb)])
        if cut.errno:
            raise _failed(cut, "take down", veth)
        if renamed.errno == errno.EEXIST and attempt == 1:
            delete(host, tomb)
            continue
        if renamed.errno:
            raise _failed(renamed, f"rename to {tomb}", veth)
        return tomb
    raise LinkError(f"failed to rename {veth!r} to {tomb!r}", "the tombstone's name stays taken", subject=veth)


def delete(host: Rtnl, name: str) -> bool:
    """Delete the link `name` (the slow part: the kernel's teardown); True when it was there."""
    return links.delete_link(host, name)


def clear(host: Rtnl, veth: str) -> bool:
    """ADD: delete the tombstone of this attachment, if a DEL left one (frees the pod's interface name)."""
    if delete(host, tombstone_name(veth)):
        log.info("deleted tombstone %s of an earlier DEL of this attachment", tombstone_name(veth))
        return True
    return False


def sweep(host: Rtnl) -> list[str]:
    """GC: delete every tombstone in this namespace; returns their names."""
    names = [info.name for _kind, data, start, end in host.dump(rtnl.RTM_GETLINK, IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0))
             if (info := link_info(data, start, end)).name and info.name.startswith(TOMBSTONE_PREFIX)]
    return [name for name in names if delete(host, name)]


def bury_in_host(veth: str) -> str | None:
    """`bury` with a socket of its own in this process's namespace (the node's)."""
    with Rtnl() as host:
        return bury(host, veth)


def delete_in_host(name: str) -> None:
    """After the answer: delete a tombstone; failures only go to the log (GC or the next ADD retry)."""
    try:
        with Rtnl() as host:
            delete(host, name)
    except (OSError, LinkError) as exc:
        log.warning("could not delete tombstone %s (GC will): %s", name, exc)
