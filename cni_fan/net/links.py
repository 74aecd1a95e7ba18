"""Host-side links: the fan bridge and the pods' veth pairs.

Every step is idempotent in the way runtimes need: create, accept EEXIST,
re-read, and verify that what exists is what we expect.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
from typing import Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net.errors import LinkConflict, LinkError
from cni_fan.plan import bridge_mac_for

log = logging.getLogger("cni_fan.net")

HOST_VETH_PREFIX = "fanv"


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL finds the veth without any saved state."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:11]


IFF_UP = 0x1


def get_link(ipr: IPRoute, name: str):
    """One RTM_GETLINK by name (a dump would grow with the number of pods)."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise


def link_index(ipr: IPRoute, name: str) -> int | None:
    link = get_link(ipr, name)
    return link["index"] if link is not None else None


def kind_of(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def link_kind(ipr: IPRoute, index: int) -> str | None:
    return kind_of(ipr.link("get", index=index)[0])


def gateway_mac(gateway: str) -> str:
    """The fan bridge's MAC (defined by the node plan)."""
    return bridge_mac_for(gateway)


IFA_F_NODAD = 0x02


def ensure_bridge(ipr: IPRoute, name: str, gateways: Sequence[tuple[str, int]], mtu: int) -> int:
    """The node's fan bridge with its gateway addresses (IPv4 first), up; safe under races.

    An existing bridge that is up is taken as set up (it is brought up only
    after its addresses are added) once it has every gateway: a family added
    to the config later gets its gateway here; the node agent repairs
    anything else.
    IPv6 gateways skip duplicate address detection: the address is the
    node's by construction, and DAD would hold it "tentative" (unusable as
    a source) for a second or more.
    """
    gateway = gateways[0][0]
    existing = get_link(ipr, name)
    if existing is not None and kind_of(existing) == "bridge" and existing["flags"] & IFF_UP:
        # Set up, unless the config gained a family since (`overlay6` added on a running node).
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=existing["index"])}
        missing = [g for g in gateways if str(g[0]) not in have]
        if not missing:
            return existing["index"]
        _add_gateways(ipr, name, existing["index"], missing)
        return existing["index"]
    try:
        # A fixed MAC: otherwise the bridge takes its lowest port's, and every
        # pod's ARP entry for the gateway goes stale when a pod comes or goes.
        ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=gateway_mac(gateway))
        log.info("created bridge %s (mtu %d)", name, mtu)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise LinkError(f"failed to create bridge {name!r}", exc.args[1] if len(exc.args) > 1 else str(exc),
                            subject=name) from None
    index = link_index(ipr, name)
    if index is None:
        raise LinkError(f"bridge {name!r} disappeared while it was being set up", subject=name)
    kind = link_kind(ipr, index)
    if kind != "bridge":
        raise LinkConflict(f"interface {name!r} exists and is not a bridge",
                           f"it is a {kind or 'device of unknown kind'}; set \"bridge\" in the config to another name",
                           subject=name)
    _add_gateways(ipr, name, index, gateways)
    ipr.link("set", index=index, state="up")
    return index


def _add_gateways(ipr: IPRoute, name: str, index: int, gateways: Sequence[tuple[str, int]]) -> None:
    for address, prefixlen in gateways:
        ipv6 = ":" in address
        for attempt in (1, 2):
            try:
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen,
                         **({"flags": IFA_F_NODAD} if ipv6 else {}))
                break
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    break
                # A bridge made while the node's default has IPv6 off refuses IPv6 addresses; it is ours.
                if ipv6 and exc.code == errno.EACCES and attempt == 1 and enable_ipv6(name):
                    continue
                hint = (" (IPv6 is off on it: net.ipv6.conf.default.disable_ipv6 or the kernel's ipv6.disable; "
                        "overlay6 needs IPv6 on, see docs/install.md)") if ipv6 and exc.code == errno.EACCES else ""
                raise LinkError(f"failed to add {address}/{prefixlen} to bridge {name!r}", str(exc) + hint,
                                subject=name) from None


def enable_ipv6(name: str) -> bool:
    """Turn IPv6 on for one of our devices (`net.ipv6.conf.<name>.disable_ipv6=0`, in the caller's
    namespace): one made while the node's default has IPv6 off refuses IPv6 addresses (EACCES).

    In the agent's container (the plugin server's calls) /proc/sys is
    read-only and the host's is mounted where CNI_FAN_PROC_SYS says, as
    for the node's own sysctls. The device is ours and goes with it, so
    there is nothing to restore. Whether IPv6 is on afterwards.
    """
    path = f"{os.environ.get('CNI_FAN_PROC_SYS', '/proc/sys')}/net/ipv6/conf/{name}/disable_ipv6"
    try:
        with open(path) as f:
            if f.read().strip() == "0":
                return True
        with open(path, "w") as f:
            f.write("0")
    except OSError as exc:
        log.warning("cannot turn IPv6 on for %s: %s", name, exc)
        return False
    log.info("turned IPv6 on for %s (it was created with IPv6 disabled)", name)
    return True


def create_veth(ipr: IPRoute, host_name: str, pod_ifname: str, pod_netns_fd: int, mtu: int, bridge_index: int):
    """A veth pair, its pod end created directly inside the pod's namespace and
    its host end already on the bridge; returns the host end's link message."""
    for attempt in (1, 2):
        try:
            ipr.link("add", ifname=host_name, kind="veth", mtu=mtu, master=bridge_index,
                     peer={"ifname": pod_ifname, "net_ns_fd": pod_netns_fd, "mtu": mtu})
            break
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and attempt == 1 and delete_link(ipr, host_name):
                # Left behind by an ADD that was killed half-way: same owner, so replace it.
                log.warning("replaced stale %s left by an interrupted ADD", host_name)
                continue
            raise LinkError(f"failed to create veth pair {host_name!r}/{pod_ifname!r}", str(exc),
                            subject=host_name) from None
    link = get_link(ipr, host_name)
    if link is None:
        raise LinkError(f"veth {host_name!r} disappeared right after it was created", subject=host_name)
    return link


def attach_to_bridge(ipr: IPRoute, index: int, hairpin: bool = True) -> None:
    """Hairpin lets a pod reach itself via a service address; then up."""
    if hairpin:
        ipr.brport("set", index=index, mode=1)
    ipr.link("set", index=index, state="up")


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete `name` if it exists; True when something was deleted."""
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise LinkError(f"failed to delete {name!r}", str(exc), subject=name) from None
    return True


def bridge_ports(ipr: IPRoute, bridge_index: int) -> list[str]:
    return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
            if link.get_attr("IFLA_MASTER") == bridge_index]

