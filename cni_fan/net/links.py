"""Host-side links: the fan bridge and the pods' veth pairs, on the raw codec.

Every step is idempotent in the way runtimes need: create, accept EEXIST,
re-read, and verify that what exists is what we expect. The raw codec
(not pyroute2), because `fan` runs these on every pod start and stop and
pyroute2's import alone costs several times the call (docs/architecture.md,
"The per-call path"); the node agent's bridge uses the same functions.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Sequence

from cni_fan.digest import sha256
from cni_fan.net import rtnl_addrs, rtnl_links
from cni_fan.net.errors import LinkConflict, LinkError
from cni_fan.net.rtnl import IFA_F_NODAD, IFLA_BRPORT_MODE, Rtnl
from cni_fan.net.rtnl_links import LinkInfo
from cni_fan.plan import bridge_mac_for

log = logging.getLogger("cni_fan.net")

HOST_VETH_PREFIX = "fanv"


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL finds the veth without any saved state."""
    digest = sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:11]


def get_link(sock: Rtnl, name: str) -> LinkInfo | None:
    """One RTM_GETLINK by name (a dump would grow with the number of pods); LinkError on failure."""
    try:
        return rtnl_links.get_link(sock, name)
    except OSError as exc:
        raise LinkError(f"cannot read link {name!r}", os.strerror(exc.errno), subject=name) from None


def link_index(sock: Rtnl, name: str) -> int | None:
    link = get_link(sock, name)
    return link.index if link is not None else None


def gateway_mac(gateway: str) -> str:
    """The fan bridge's MAC (defined by the node plan)."""
    return bridge_mac_for(gateway)


def _send_one(sock: Rtnl, request, what: str, subject: str, tolerated: tuple[int, ...] = ()) -> int:
    """Send one request; its errno when it succeeded (0) or failed with a tolerated one, else LinkError."""
    code = sock.batch([request])[0].errno
    if code and code not in tolerated:
        raise LinkError(what, os.strerror(code), subject=subject)
    return code


def ensure_bridge(sock: Rtnl, name: str, gateways: Sequence[tuple[str, int]], mtu: int) -> int:
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
    existing = get_link(sock, name)
    if existing is not None and existing.kind == "bridge" and existing.up:
        # Set up, unless the config gained a family since (`overlay6` added on a running node).
        have = {a.address for a in rtnl_addrs.addresses(sock, index=existing.index)}
        missing = [g for g in gateways if str(g[0]) not in have]
        if missing:
            _add_gateways(sock, name, existing.index, missing)
        return existing.index
    # A fixed MAC: otherwise the bridge takes its lowest port's, and every
    # pod's ARP entry for the gateway goes stale when a pod comes or goes.
    if not _send_one(sock, rtnl_links.new_bridge(name, mtu, gateway_mac(gateway)), f"failed to create bridge {name!r}",
                    name, (errno.EEXIST,)):
        log.info("created bridge %s (mtu %d)", name, mtu)
    link = get_link(sock, name)
    if link is None:
        raise LinkError(f"bridge {name!r} disappeared while it was being set up", subject=name)
    if link.kind != "bridge":
        raise LinkConflict(f"interface {name!r} exists and is not a bridge",
                           f"it is a {link.kind or 'device of unknown kind'}; set \"bridge\" in the config to another "
                           "name", subject=name)
    _add_gateways(sock, name, link.index, gateways)
    _send_one(sock, rtnl_links.set_link(link.index, up=True), f"failed to bring bridge {name!r} up", name)
    return link.index


def _add_gateways(sock: Rtnl, name: str, index: int, gateways: Sequence[tuple[str, int]]) -> None:
    for address, prefixlen in gateways:
        ipv6 = ":" in address
        for attempt in (1, 2):
            code = sock.batch([rtnl_addrs.new_addr(index, address, prefixlen, IFA_F_NODAD if ipv6 else 0)])[0].errno
            if code in (0, errno.EEXIST):
                break
            # A bridge made while the node's default has IPv6 off refuses IPv6 addresses; it is ours.
            if ipv6 and code == errno.EACCES and attempt == 1 and enable_ipv6(name):
                continue
            hint = (" (IPv6 is off on it: net.ipv6.conf.default.disable_ipv6 or the kernel's ipv6.disable; "
                    "overlay6 needs IPv6 on, see docs/install.md)") if ipv6 and code == errno.EACCES else ""
            raise LinkError(f"failed to add {address}/{prefixlen} to bridge {name!r}",
                            f"[Errno {code}] {os.strerror(code)}{hint}", subject=name)


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


def create_veth(sock: Rtnl, host_name: str, pod_ifname: str, pod_netns_fd: int, mtu: int,
                bridge_index: int) -> LinkInfo:
    """A veth pair, its pod end created directly inside the pod's namespace and its host end
    already on the bridge, in hairpin mode (a pod reaches itself via a service address) and up;
    returns the host end. One send: create, set, read back."""
    for attempt in (1, 2):
        created, set_up, read = sock.batch([
            rtnl_links.new_veth(host_name, pod_ifname, pod_netns_fd, mtu, bridge_index),
            rtnl_links.set_link(name=host_name, up=True, port_flags=((IFLA_BRPORT_MODE, 1),)),
            rtnl_links.getlink(host_name)])
        if created.errno == errno.EEXIST and attempt == 1 and delete_link(sock, host_name):
            # Left behind by an ADD that was killed half-way: same owner, so replace it.
            log.warning("replaced stale %s left by an interrupted ADD", host_name)
            continue
        if created.errno:
            raise LinkError(f"failed to create veth pair {host_name!r}/{pod_ifname!r}",
                            f"[Errno {created.errno}] {os.strerror(created.errno)}", subject=host_name)
        if set_up.errno:
            raise LinkError(f"failed to put {host_name!r} up in hairpin mode", os.strerror(set_up.errno),
                            subject=host_name)
        if read.errno:
            raise LinkError(f"veth {host_name!r} disappeared right after it was created", os.strerror(read.errno),
                            subject=host_name)
        return rtnl_links.link_info(read.body)
    raise AssertionError("unreachable")


def delete_link(sock: Rtnl, name: str) -> bool:
    """Delete `name` if it exists; True when something was deleted."""
    return not _send_one(sock, rtnl_links.del_link(name), f"failed to delete {name!r}", name,
                        (errno.ENODEV, errno.ENOENT))


def bridge_ports(sock: Rtnl, bridge_index: int) -> list[str]:
    return [link.name for link in rtnl_links.port_links(sock, bridge_index) if link.name]
