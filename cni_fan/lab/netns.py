"""Namespaces, veths and the underlay bridge of a lab, with pyroute2.

Nothing here touches the host's own namespace: every link is created
inside a lab namespace, a veth's far end directly inside the other
namespace, so no name can clash with the host's interfaces.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Iterator

from pyroute2 import IPRoute, netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.lab.topology import NETNS_DIR
from cni_fan.net.nsenter import switched

IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate address detection


class LabNetError(RuntimeError):
    """A namespace or link of the lab could not be made or removed."""


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace `name`; sockets opened
    inside stay bound to it after the thread switches back. The product's
    switch (cni_fan.net.nsenter), without the plugin's CNI error: a failed
    switch is an OSError here, as the lab's callers expect."""
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabNetError(f"network namespace {name} does not exist") from None
    try:
        with switched(target):
            yield
    finally:
        os.close(target)


def ipr_in(name: str) -> IPRoute:
    """An IPRoute whose netlink socket lives in namespace `name`."""
    with entered(name):
        return IPRoute()


def create(name: str) -> None:
    """A new named namespace with its loopback up; fails if it exists."""
    if exists(name):
        raise LabNetError(f"network namespace {name} already exists")
    try:
        pr_netns.create(name)
    except OSError as exc:
        raise LabNetError(f"cannot create network namespace {name}: {exc}") from None
    with ipr_in(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> bool:
    """Remove namespace `name` (its devices go with it); True if it existed."""
    path = netns_path(name)
    if not os.path.exists(path):
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise LabNetError(f"cannot remove network namespace {name}: {exc}") from None
    return True


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabNetError(f"interface {ifname} not found")
    return found[0]


def make_bridge(ns: str, bridge: str, mtu: int) -> None:
    """A plain Linux bridge, no STP, no address: the underlay switch."""
    with ipr_in(ns) as ipr:
        try:
            ipr.link("add", ifname=bridge, kind="bridge", br_stp_state=0, br_forward_delay=0, mtu=mtu)
        except NetlinkError as exc:
            raise LabNetError(f"cannot create bridge {bridge} in {ns}: {exc}") from None
        ipr.link("set", index=_index(ipr, bridge), state="up")


def plug(switch_ns: str, bridge: str, port: str, host_ns: str, ifname: str, cidr: str | None, mtu: int,
         cidr6: str | None = None) -> None:
    """Connect `host_ns` to the switch: veth `port` on `bridge` in `switch_ns`,
    its peer `ifname` in `host_ns` with address `cidr` (and `cidr6`, without
    DAD so it is usable at once), both up."""
    host_fd = os.open(netns_path(host_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ipr_in(switch_ns) as ipr:
            try:
                ipr.link("add", ifname=port, kind="veth", mtu=mtu, master=_index(ipr, bridge),
                         peer={"ifname": ifname, "net_ns_fd": host_fd, "mtu": mtu})
            except NetlinkError as exc:
                raise LabNetError(f"cannot create veth {port}/{ifname} ({switch_ns} -> {host_ns}): {exc}") from None
            ipr.link("set", index=_index(ipr, port), state="up")
    finally:
        os.close(host_fd)
    with ipr_in(host_ns) as ipr:
        index = _index(ipr, ifname)
        for one in (cidr, cidr6):
            if one:
                address, prefixlen = one.split("/")
                ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen),
                         **({"flags": IFA_F_NODAD} if ":" in address else {}))
        ipr.link("set", index=index, state="up")


def ipv4_of(ns: str, ifname: str) -> list[str]:
    """The IPv4 addresses (CIDR) on `ifname` in `ns`; empty if it is missing."""
    return addresses_of(ns, ifname, socket.AF_INET)


def ipv6_of(ns: str, ifname: str) -> list[str]:
    """The global IPv6 addresses (CIDR) on `ifname` in `ns`, link-local left out; empty if it is missing."""
    return [a for a in addresses_of(ns, ifname, socket.AF_INET6) if not a.lower().startswith("fe80:")]


def addresses_of(ns: str, ifname: str, family: int) -> list[str]:
    """The addresses (CIDR) of `family` on `ifname` in `ns`; empty if it is missing."""
    with ipr_in(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return []
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(family=family, index=found[0])]


def add_route(ns: str, dst: str, gateway: str) -> None:
    """A route in `ns` for `dst` (CIDR) via `gateway`: a node's or ext's way across the router."""
    with ipr_in(ns) as ipr:
        try:
            ipr.route("add", dst=dst, gateway=gateway, family=socket.AF_INET6 if ":" in dst else socket.AF_INET)
        except NetlinkError as exc:
            raise LabNetError(f"cannot add route {dst} via {gateway} in {ns}: {exc}") from None


def enable_forwarding(ns: str) -> None:
    """IPv4 and IPv6 forwarding on in `ns` (the router): its own /proc/sys/net, opened from inside it."""
    with entered(ns):
        for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            try:
                with open(f"/proc/sys/net/{key}", "w") as knob:
                    knob.write("1\n")
            except OSError as exc:
                raise LabNetError(f"cannot turn on {key} in {ns}: {exc}") from None
