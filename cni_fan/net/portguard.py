"""A pod's bridge port guard: install it at ADD, remove it at DEL, collect what is left at GC.

Neighbour suppression (`neighSuppress`) and anti-spoofing (`antiSpoof`),
for IPv4 and, given the pod's IPv6 address, for IPv6 too;
docs/portguard.md says what each piece is and why. CHECK's judgement is in
portguard_check.py, the node agent's repair in portguard_repair.py, the
anti-spoofing program in cni_fan/bpf/guardprog.py. Everything here goes
through one raw rtnetlink socket per namespace and one batch per ADD.
"""
from __future__ import annotations

import errno
import logging
import os

import netaddr

from cni_fan.net import rtnl_links, rtnl_mdb, tc
from cni_fan.net.errors import GuardError
from cni_fan.net.netns import entered
from cni_fan.net.rtnl import (IFLA_BRPORT_BCAST_FLOOD, IFLA_BRPORT_LEARNING, IFLA_BRPORT_MCAST_FLOOD,
                              IFLA_BRPORT_MODE, IFLA_BRPORT_NEIGH_SUPPRESS, IFLA_BRPORT_PROXYARP,
                              IFLA_BRPORT_PROXYARP_WIFI, IFLA_BRPORT_UNICAST_FLOOD, NUD_PERMANENT, Reply, Rtnl,
                              check)
from cni_fan.net.rtnl_links import (AF_INET, AF_INET6, bridge_neighbours, del_neigh, getlink, link_info,
                                    permanent_neigh, port_links)

log = logging.getLogger("cni_fan.portguard")

ALIAS_PREFIX = "cni-fan "
NEIGH_PROTOCOL = 0xFC   # NDA_PROTOCOL of our neighbour entries on the bridge
GUARD_NAME = "cni-fan-guard"
GUARD_NAME6 = "cni-fan-guard6"   # the dual-stack program: CHECK tells the two apart by the filter's name
# tc filter slot of the guard on the host veth's ingress. Its own handle, so a
# filter another component attaches at prio 1 (the fan program's default
# slot is prio 1, handle 1) sits beside it instead of replacing it.
GUARD_HOOK = "ingress"
GUARD_PRIO = 1
GUARD_HANDLE = 0xFC

# The bridge port flags of neighbour suppression: (IFLA_BRPORT_*, value, the name `ip -d link` shows).
# install sets them, CHECK and repair judge them: one list.
PORT_FLAGS = ((IFLA_BRPORT_MODE, 1, "hairpin"), (IFLA_BRPORT_LEARNING, 0, "learning"),
              (IFLA_BRPORT_UNICAST_FLOOD, 0, "flood"), (IFLA_BRPORT_MCAST_FLOOD, 0, "mcast_flood"),
              (IFLA_BRPORT_BCAST_FLOOD, 0, "bcast_flood"), (IFLA_BRPORT_PROXYARP, 0, "proxy_arp"),
              (IFLA_BRPORT_PROXYARP_WIFI, 1, "proxy_arp_wifi"), (IFLA_BRPORT_NEIGH_SUPPRESS, 0, "neigh_suppress"))

# Dual-stack pods: the MDB entries one pod port may hold (its solicited-node groups and a few of its
# own), and the bridge's room for them; a full MDB turns the bridge's snooping off for every pod.
POD_MAX_GROUPS = 16
BRIDGE_HASH_MAX = 65536

Labels = list[tuple[str, tuple[int, ...]]]   # per request: what it does, the errnos it tolerates


# -- pure helpers ---------------------------------------------------------------

def gateway_mac(gateway: str | netaddr.IPAddress) -> str:
    """The fan bridge's MAC (one definition, in links: the node agent sets it too)."""
    from cni_fan.net.links import gateway_mac as derived

    return derived(str(gateway))


NO_IPV4 = "-"  # in an alias, where an IPv6-only pod's IPv4 address would be


def port_alias(ip: str | None, mac: str, ip6: str | None = None) -> str:
    """`cni-fan <ip> <mac>`, then ` <ip6>` for a dual-stack pod (at most 80 bytes: IFALIASZ is 256);
    `cni-fan - <mac> <ip6>` for a pod of an IPv6-only cluster."""
    tail = f" {netaddr.IPAddress(ip6, 6)}" if ip6 else ""
    return f"{ALIAS_PREFIX}{ip or NO_IPV4} {mac.lower()}{tail}"


def _alias_parts(alias: str | None) -> tuple[str | None, str, str | None] | None:
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    parts = alias[len(ALIAS_PREFIX):].split()
    if len(parts) not in (2, 3) or parts[0] == NO_IPV4 and len(parts) != 3:
        return None
    try:
        ip = None if parts[0] == NO_IPV4 else str(netaddr.IPAddress(parts[0], 4))
        mac = netaddr.EUI(parts[1])
        ip6 = str(netaddr.IPAddress(parts[2], 6)) if len(parts) == 3 else None
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    return ip, str(mac).replace("-", ":").lower(), ip6


def parse_alias(alias: str | None) -> tuple[str | None, str] | None:
    """(ip, mac) from a host veth alias we wrote (with or without the IPv6 address; ip None for an
    IPv6-only pod), else None."""
    parts = _alias_parts(alias)
    return None if parts is None else parts[:2]


def alias_ip6(alias: str | None) -> str | None:
    """The pod's IPv6 address from a host veth alias we wrote, None if it names none."""
    parts = _alias_parts(alias)
    return None if parts is None else parts[2]


def raise_for(replies: list[Reply], labels: Labels) -> None:
    """GuardError for the first request that failed with an errno it does not tolerate."""
    failed = check(replies, labels)
    if failed is not None:
        raise GuardError(f"port guard: {failed[0]} failed", os.strerror(failed[1]))


def guard_name(ip6: str | None) -> str:
    """The tc filter name of a pod's guard: one for IPv4-only pods, one for dual-stack ones."""
    return GUARD_NAME6 if ip6 else GUARD_NAME


def rtnl_in(netns_fd: int | None, netlink_fd: int | None = None) -> Rtnl:
    """A raw socket in the pod's namespace (NetnsError if `netns_fd` is not one).

    `netlink_fd`: a netlink socket already open in that namespace (the thin
    client's, in the plugin server's child); used through a duplicate
    instead of entering the namespace.
    """
    if netlink_fd is not None:
        return Rtnl.adopt(os.dup(netlink_fd))
    if netns_fd is None:
        return Rtnl()
    with entered(netns_fd):
        return Rtnl()


def load_program(mac: str, ip: str | None, ip6: str | None = None) -> int:
    """The pod's anti-spoofing program, loaded; the caller closes the descriptor.

    Imported here, not at the top: only ADD builds and loads a program (the
    generator and `ctypes` are start-up time DEL, CHECK and GC do without).
    """
    from cni_fan.bpf.guardprog import guard_program
    from cni_fan.bpf.syscall import load_sched_cls

    try:
        return load_sched_cls(guard_program(mac, ip, ip6), name="cni_fan_guard")
    except OSError as exc:
        raise GuardError("port guard: cannot load the anti-spoofing program "
                         "(\"antiSpoof\": false turns it off)", str(exc)) from None


# -- ADD --------------------------------------------------------------------------

def install(cfg, *, bridge_index: int, veth_index: int, pod_netns_fd: int, pod_ifname: str,
            pod_ip: str | None, pod_mac: str, gateway: str, pod_ip6: str | None = None,
            gateway6: str | None = None, pod_netlink_fd: int | None = None) -> None:
    """ADD: after the veth is on the bridge and the pod side is configured.

    `pod_ip6` (with or without its prefix) makes the guard dual-stack: the
    IPv6 rules in the program, the IPv6 neighbour entry on the bridge, the
    MDB entry of its solicited-node group, and, with `gateway6`, the pod's
    entry for its IPv6 gateway. A pod of an IPv6-only cluster has no
    `pod_ip` (its `gateway` is then the IPv6 one, naming the bridge's MAC):
    no IPv4 entry, and its program drops IPv4 and ARP. Idempotent (a repeated ADD replaces
    everything). Raises GuardError after deleting the neighbour entries it
    may have added on the bridge; the rest goes with the veth, which the
    caller's rollback deletes. `pod_netlink_fd`: a netlink socket open in
    the pod (see `rtnl_in`).
    """
    suppress, spoof = cfg.neigh_suppress, cfg.anti_spoof
    if not (suppress or spoof):
        return
    ip, mac = pod_ip.split("/")[0] if pod_ip else None, pod_mac.lower()
    ip6 = str(netaddr.IPAddress(pod_ip6.split("/")[0], 6)) if pod_ip6 else None
    prog_fd = load_program(mac, ip, ip6) if spoof else None
    host = Rtnl()
    try:
        replies = install_host(host, bridge_index, veth_index, ip, mac, suppress, prog_fd, ip6)
        if suppress:
            want = gateway_mac(gateway)
            if link_info(replies[1].body).address != want:
                pin_bridge_mac(host, bridge_index, want)
            gateways = list(dict.fromkeys(([gateway] if ip else []) + ([gateway6] if ip6 and gateway6 else [])))
            with rtnl_in(pod_netns_fd, pod_netlink_fd) as pod:
                link = pod.batch([getlink(pod_ifname)])[0]
                raise_for([link], [(f"finding {pod_ifname} in the pod", ())])
                index = link_info(link.body).index
                raise_for(pod.batch([permanent_neigh(index, gw, want) for gw in gateways]),
                          [(f"neighbour entry for the gateway {gw} in the pod", ()) for gw in gateways])
    except BaseException:
        if suppress:
            host.batch([del_neigh(bridge_index, a) for a in (ip, ip6) if a])
        raise
    finally:
        host.close()
        if prog_fd is not None:
            os.close(prog_fd)


def install_host(host: Rtnl, bridge_index: int, veth_index: int, ip: str | None, mac: str, suppress: bool,
                 prog_fd: int | None, ip6: str | None = None) -> list[Reply]:
    """The node side of a guard in one batch (idempotent); with `suppress`, replies[1] is the bridge."""
    flags = tuple((kind, value) for kind, value, _name in PORT_FLAGS) if suppress else ()
    requests = [rtnl_links.port_setup(veth_index, port_alias(ip, mac, ip6), flags)]
    labels: Labels = [("setting up the bridge port", ())]
    if suppress:
        requests += [getlink(index=bridge_index), rtnl_links.static_fdb(veth_index, mac)]
        labels += [("reading the bridge", ()), (f"static FDB entry for {mac}", ())]
        if ip:
            requests.append(permanent_neigh(bridge_index, ip, mac, NEIGH_PROTOCOL))
            labels.append((f"neighbour entry {ip} on the bridge", ()))
        if ip6:
            group = rtnl_mdb.solicited_node(ip6)
            # Snooping on before the MDB entry (the kernel refuses one while it is off), the entry before
            # the port's cap (a port at its cap takes no new entry).
            requests += [permanent_neigh(bridge_index, ip6, mac, NEIGH_PROTOCOL),
                         rtnl_mdb.bridge_response_interval(bridge_index),
                         rtnl_mdb.bridge_querier(bridge_index, BRIDGE_HASH_MAX),
                         rtnl_mdb.permanent_group(bridge_index, veth_index, group),
                         rtnl_mdb.port_group_limit(veth_index, POD_MAX_GROUPS)]
            labels += [(f"neighbour entry {ip6} on the bridge", ()),
                       ("setting the bridge's query response interval", ()),
                       ("turning on the bridge's multicast snooping and querier", ()),
                       (f"MDB entry {group} on the port", ()),
                       ("capping the port's multicast groups (kernel 6.3+)", ())]
    if prog_fd is not None:
        requests += [tc.clsact_request(veth_index),
                     tc.filter_request(veth_index, prog_fd, GUARD_HOOK, name=guard_name(ip6), prio=GUARD_PRIO,
                                       handle=GUARD_HANDLE)]
        labels += [("adding the clsact qdisc", (errno.EEXIST,)), ("attaching the anti-spoofing program", ())]
    replies = host.batch(requests)
    raise_for(replies, labels)
    return replies


def pin_bridge_mac(host: Rtnl, bridge_index: int, mac: str) -> None:
    """Give the bridge its derived MAC, then put back every pod's neighbour entry.

    Setting a device's MAC flushes its neighbour table, permanent entries
    included (`neigh_changeaddr`), also those that parallel ADDs have just
    added. Each ADD that sets the MAC therefore re-adds the entries of all
    ports from their aliases afterwards: every flush is followed by a
    restore that sees every port whose entry the flush could have removed
    (a port's alias is set before its entry). This happens once per bridge
    (a few times if several ADDs race on a new bridge).
    """
    raise_for(host.batch([rtnl_links.set_mac(bridge_index, mac)]), [("setting the bridge MAC", ())])
    restore = [permanent_neigh(bridge_index, address, claimed[1], NEIGH_PROTOCOL) for claimed in
               (_alias_parts(link.alias) for link in port_links(host, bridge_index)) if claimed
               for address in (claimed[0], claimed[2]) if address]
    raise_for(host.batch(restore), [("restoring a neighbour entry on the bridge", ())] * len(restore))
    log.info("bridge (ifindex %d) now has MAC %s; %d neighbour entr%s restored", bridge_index, mac, len(restore),
             "y" if len(restore) == 1 else "ies")


# -- DEL and rollback ----------------------------------------------------------------

def remove(veth: str, cfg=None, container_id: str | None = None, ifname: str | None = None) -> str | None:
    """DEL and rollback: delete the pod's neighbour entries (IPv4, and IPv6 if any) on the bridge.

    Call before the veth is deleted: its alias names the addresses. When the
    veth is already gone and `cfg` is given, the IPv4 address comes from the
    pod's IPAM record (still held: DEL releases it afterwards) and the IPv6
    one from it (`paired_ip6`). Returns the IPv4 address whose entry was
    deleted. Everything else of the guard (MDB entry included) goes with
    the veth.
    """
    with Rtnl() as host:
        reply = host.batch([getlink(veth)])[0]
        if reply.errno == 0:
            link = link_info(reply.body)
            claimed = _alias_parts(link.alias)
            if claimed is None or link.master is None:
                return None
            if claimed[2]:
                _forget(host, link.master, claimed[2])
            return _forget(host, link.master, claimed[0]) if claimed[0] else None
        if reply.errno not in (errno.ENODEV, errno.ENOENT):
            raise GuardError(f"port guard: cannot read {veth}", os.strerror(reply.errno), subject=veth)
        if cfg is None or container_id is None or not cfg.neigh_suppress:
            return None
        from cni_fan.local_slice import address_pool
        from cni_fan.plan import bridge_name

        try:
            held = address_pool(cfg.params).lookup(container_id, ifname or "")
        except OSError as exc:
            log.warning("port guard: cannot read the IPAM record of %s (%s); GC will clean up", container_id, exc)
            return None
        if held is None:
            return None
        bridge = bridge_name(cfg, netaddr.IPNetwork(f"{held}/{cfg.params.fanmaps[0].slice_prefixlen}").cidr)
        reply = host.batch([getlink(bridge)])[0]
        if reply.errno:
            return None
        bridge_index = link_info(reply.body).index
        ip6 = paired_ip6(cfg.params, str(held))
        if ip6:
            _forget(host, bridge_index, ip6)
        return _forget(host, bridge_index, str(held))


def paired_ip6(params, ip: str) -> str | None:
    """Pure: the IPv6 address of the pod holding IPv4 `ip` (the same container index in the node's
    IPv6 slice), None without `overlay6` or for an address that is no pod's."""
    if params.fanmap is None or params.fanmap6 is None:
        return None
    from cni_fan.fanmap import FanMapError
    from cni_fan.plan import partner_address

    try:
        return str(partner_address(ip, params.fanmap, params.fanmap6))
    except FanMapError:
        return None


def rollback(veth: str) -> None:
    """`remove` for a failed ADD: never raises (the ADD's own error is what the runtime must see)."""
    try:
        remove(veth)
    except Exception:
        log.exception("rollback: failed to remove the port guard of %s", veth)


def _forget(host: Rtnl, bridge_index: int, ip: str) -> str | None:
    reply = host.batch([del_neigh(bridge_index, ip)])[0]
    if reply.errno in (errno.ENOENT, errno.ENODEV):
        return None
    raise_for([reply], [(f"deleting the neighbour entry {ip} on the bridge", ())])
    log.debug("deleted neighbour entry %s on ifindex %d", ip, bridge_index)
    return ip


# -- GC ---------------------------------------------------------------------------------

def gc(bridge_index: int) -> list[str]:
    """Delete our neighbour entries on the bridge that no port claims; returns their addresses.

    Both families. The anti-spoofing programs, FDB and MDB entries and port
    flags live on the ports themselves, so a port that no longer exists has
    none left. The neighbour dumps come before the link dump: an ADD sets
    its alias before it adds its entries, so an entry seen here belongs to
    a port seen below.
    """
    with Rtnl() as host:
        ours = [n for family in (AF_INET, AF_INET6) for n in bridge_neighbours(host, bridge_index, family)
                if n.protocol == NEIGH_PROTOCOL and n.state & NUD_PERMANENT]
        claimed = {a for c in (_alias_parts(link.alias) for link in port_links(host, bridge_index)) if c
                   for a in (c[0], c[2]) if a}
        removed = [n.ip for n in ours if n.ip not in claimed and _forget(host, bridge_index, n.ip)]
    if removed:
        log.info("GC: deleted %d neighbour entr%s of pods that are gone: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed[:20]))
    return removed
