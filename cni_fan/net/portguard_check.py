"""CHECK of a pod's port guard: what of it is missing or changed, one phrase each.

`observe` reads the kernel (a few gets and one dump of the port's own
ingress filters, nothing that grows with the number of pods), `missing`
judges (pure), so the node agent's repair uses the same judgement. CHECK
repairs nothing.
"""
from __future__ import annotations

import errno
import os
from types import MappingProxyType
from typing import Mapping, NamedTuple

from cni_fan.net import rtnl_mdb, tc
from cni_fan.net.errors import GuardError
from cni_fan.net.portguard import (BRIDGE_HASH_MAX, GUARD_HANDLE, GUARD_HOOK, GUARD_PRIO, POD_MAX_GROUPS,
                                   PORT_FLAGS, gateway_mac, guard_name,
                                   port_alias, raise_for, rtnl_in)
from cni_fan.net.rtnl import NDMSG, NUD_NOARP, NUD_PERMANENT, Rtnl
from cni_fan.net.rtnl_links import NeighEntry, get_fdb, get_neigh, getlink, link_info, neigh_entry, port_flags

NUD_STATIC = NUD_NOARP | NUD_PERMANENT  # a static FDB entry is NUD_NOARP, `bridge fdb ... permanent` NUD_PERMANENT


class GuardFilter(NamedTuple):
    """A tc filter in the guard's slot (ingress, GUARD_PRIO, GUARD_HANDLE) of a host veth."""
    kind: str
    name: str
    direct_action: bool
    prog_id: int | None


class GuardState(NamedTuple):
    """What the kernel holds of one pod's guard; `observe` reads it, `missing` judges it.

    Fields not looked at (the feature is off, or the pod side was not given)
    keep their defaults and are not judged.
    """
    veth: str
    veth_index: int | None = None        # None: no such link
    master: int | None = None
    alias: str | None = None
    port_flags: Mapping[int, int] = MappingProxyType({})  # empty and read-only by default
    fdb: tuple[int, int] | None = None   # (port ifindex, NUD state) of the FDB entry for the pod's MAC
    bridge_mac: str | None = None
    bridge_neigh: NeighEntry | None = None
    filters: tuple[GuardFilter, ...] = ()
    pod_looked_at: bool = False
    gateway_neigh: NeighEntry | None = None
    bridge_neigh6: NeighEntry | None = None   # dual-stack pods only, like the fields below
    mdb_state: int | None = None              # the port's state in the group of the pod's IPv6 address
    querier: bool = True
    hash_max: int | None = None
    max_groups: int | None = None
    gateway6_neigh: NeighEntry | None = None


def missing(state: GuardState, *, suppress: bool, spoof: bool, pod_ip: str | None, pod_mac: str,
            gateway: str, pod_ip6: str | None = None, gateway6: str | None = None) -> list[str]:
    """Pure: what `install` would have put in place and `state` lacks, one phrase each ([] when complete).

    `pod_ip` None: a pod of an IPv6-only cluster (`gateway` is then its IPv6 gateway)."""
    veth = state.veth
    if not (suppress or spoof):
        return []
    if state.veth_index is None:
        return [f"host veth {veth} is missing (and with it the port guard)"]
    out: list[str] = []
    if suppress:
        if state.master is None:
            out.append(f"port guard: {veth} is not a bridge port")
        else:
            ip6 = pod_ip6.split("/")[0] if pod_ip6 else None
            out += _suppression_missing(state, pod_ip.split("/")[0] if pod_ip else None, pod_mac.lower(), gateway,
                                        ip6)
            if ip6:
                out += _suppression6_missing(state, ip6, pod_mac.lower(), gateway, gateway6)
    if spoof:
        out += _spoofing_missing(state, guard_name(pod_ip6))
    return out


def _entry_wrong(what: str, n: NeighEntry | None, mac: str) -> list[str]:
    if n is None:
        return [f"port guard: {what} lladdr {mac} is missing"]
    if n.mac != mac or not n.state & NUD_PERMANENT:
        return [f"port guard: {what} is {n.mac or 'without a MAC'} "
                f"{'permanent' if n.state & NUD_PERMANENT else 'not permanent'}, should be {mac} permanent"]
    return []


def _suppression6_missing(state: GuardState, ip6: str, mac: str, gateway: str, gateway6: str | None) -> list[str]:
    out = _entry_wrong(f"neighbour entry {ip6} on the bridge", state.bridge_neigh6, mac)
    group = rtnl_mdb.solicited_node(ip6)
    if state.mdb_state is None:
        out.append(f"port guard: MDB entry {group} on {state.veth} is missing (solicitations for {ip6} "
                   "reach no port)")
    elif not state.mdb_state & rtnl_mdb.MDB_PERMANENT:
        out.append(f"port guard: MDB entry {group} on {state.veth} is not permanent (learned; it ages out)")
    if not state.querier:
        out.append("port guard: the bridge's multicast snooping or querier is off (solicitations reach no pod)")
    if state.hash_max is not None and state.hash_max < BRIDGE_HASH_MAX:
        out.append(f"port guard: the bridge's mcast_hash_max is {state.hash_max}, should be {BRIDGE_HASH_MAX} "
                   "(a full MDB turns snooping off)")
    if state.max_groups is not None and state.max_groups != POD_MAX_GROUPS:  # None: a kernel before 6.3
        out.append(f"port guard: mcast_max_groups of {state.veth} is {state.max_groups}, should be "
                   f"{POD_MAX_GROUPS} (one pod could fill the bridge's MDB)")
    if state.pod_looked_at and gateway6:
        out += _entry_wrong(f"neighbour entry of the gateway {gateway6} in the pod", state.gateway6_neigh,
                            gateway_mac(gateway))
    return out


def _suppression_missing(state: GuardState, ip: str | None, mac: str, gateway: str,
                         ip6: str | None = None) -> list[str]:
    veth, out = state.veth, []
    wrong = [f"{name} is {'on' if state.port_flags[kind] else 'off'}, should be {'on' if want else 'off'}"
             for kind, want, name in PORT_FLAGS if kind in state.port_flags and bool(state.port_flags[kind]) != want]
    if wrong:
        out.append(f"port guard: bridge port flags of {veth} changed ({'; '.join(wrong)})")
    if state.alias != port_alias(ip, mac, ip6):
        out.append(f"port guard: {veth} has alias {state.alias!r}, not {port_alias(ip, mac, ip6)!r} "
                   "(DEL finds the bridge's neighbour entry through it)")
    if state.fdb is None:
        out.append(f"port guard: static FDB entry {mac} on {veth} is missing")
    elif state.fdb[0] != state.veth_index:
        out.append(f"port guard: FDB entry {mac} is on ifindex {state.fdb[0]}, not on {veth}")
    elif not state.fdb[1] & NUD_STATIC:
        out.append(f"port guard: FDB entry {mac} on {veth} is not static (learned; it ages out)")
    n = state.bridge_neigh
    if ip is None:  # an IPv6-only pod: its entry is `_suppression6_missing`'s
        pass
    elif n is None:
        out.append(f"port guard: neighbour entry {ip} lladdr {mac} on the bridge is missing")
    elif n.mac != mac or not n.state & NUD_PERMANENT:
        out.append(f"port guard: neighbour entry {ip} on the bridge is {n.mac or 'without a MAC'} "
                   f"{'permanent' if n.state & NUD_PERMANENT else 'not permanent'}, should be {mac} permanent")
    want_gw_mac = gateway_mac(gateway)
    if state.bridge_mac != want_gw_mac:
        out.append(f"port guard: the bridge has MAC {state.bridge_mac}, the pods' gateway entries "
                   f"say {want_gw_mac}")
    if state.pod_looked_at:
        n = state.gateway_neigh
        if n is None:
            out.append(f"port guard: permanent neighbour entry {gateway} lladdr {want_gw_mac} (the gateway) "
                       "in the pod is missing")
        elif n.mac != want_gw_mac or not n.state & NUD_PERMANENT:
            out.append(f"port guard: neighbour entry of the gateway {gateway} in the pod is "
                       f"{n.mac or 'without a MAC'} {'permanent' if n.state & NUD_PERMANENT else 'not permanent'}, "
                       f"should be {want_gw_mac} permanent")
    return out


def _spoofing_missing(state: GuardState, name: str) -> list[str]:
    veth = state.veth
    slot = f"tc ingress filter prio {GUARD_PRIO} handle {GUARD_HANDLE:#x}"
    ours = [f for f in state.filters if f.kind == "bpf" and f.name == name]
    if not state.filters:
        return [f"port guard: anti-spoofing program ({name}, {slot}) on {veth} is missing"]
    if not ours:
        found = ", ".join(f"{f.kind} {f.name!r}" for f in state.filters)
        return [f"port guard: {slot} on {veth} holds {found}, not the anti-spoofing program {name}"]
    if not all(f.direct_action and f.prog_id for f in ours):
        return [f"port guard: anti-spoofing program {name} on {veth} is not attached in "
                "direct-action mode with a program"]
    return []


def problems(cfg, *, veth: str, pod_ip: str | None, pod_mac: str, gateway: str, pod_netns_fd: int | None = None,
             pod_ifname: str | None = None, pod_ip6: str | None = None, gateway6: str | None = None,
             pod_netlink_fd: int | None = None) -> list[str]:
    """What of the guard of the pod on host veth `veth` is missing or changed, as phrases for a person.

    For CHECK (and the node agent): read-only, in the caller's namespace (the
    node's); the pod's gateway entry too when the pod's namespace and
    interface are given. Only what the config turns on is looked at.
    """
    suppress, spoof = cfg.neigh_suppress, cfg.anti_spoof
    if not (suppress or spoof):
        return []
    state = observe(veth, suppress=suppress, spoof=spoof, pod_ip=pod_ip, pod_mac=pod_mac, gateway=gateway,
                    pod_netns_fd=pod_netns_fd, pod_ifname=pod_ifname, pod_ip6=pod_ip6, gateway6=gateway6,
                    pod_netlink_fd=pod_netlink_fd)
    return missing(state, suppress=suppress, spoof=spoof, pod_ip=pod_ip, pod_mac=pod_mac, gateway=gateway,
                   pod_ip6=pod_ip6, gateway6=gateway6)


def observe(veth: str, *, suppress: bool, spoof: bool, pod_ip: str | None, pod_mac: str, gateway: str,
            pod_netns_fd: int | None = None, pod_ifname: str | None = None, pod_ip6: str | None = None,
            gateway6: str | None = None, pod_netlink_fd: int | None = None) -> GuardState:
    """Read the guard's pieces: a few gets and one dump of the port's own ingress filters, no dump that
    grows with the number of pods."""
    ip, mac = pod_ip.split("/")[0] if pod_ip else None, pod_mac.lower()
    ip6 = pod_ip6.split("/")[0] if pod_ip6 else None
    with Rtnl() as host:
        reply = host.batch([getlink(veth)])[0]
        if reply.errno in (errno.ENODEV, errno.ENOENT):
            return GuardState(veth=veth)
        raise_for([reply], [(f"reading {veth}", ())])
        link = link_info(reply.body)
        state = {"veth": veth, "veth_index": link.index, "master": link.master, "alias": link.alias}
        if suppress and link.master is not None:  # not a bridge port: `missing` says so
            state["port_flags"] = port_flags(reply, tuple(kind for kind, _want, _name in PORT_FLAGS))
            replies = host.batch([get_fdb(link.index, mac), getlink(index=link.master),
                                  *([get_neigh(link.master, ip)] if ip else [])])
            raise_for(replies, [("reading the FDB entry", (errno.ENOENT,)), ("reading the bridge", ()),
                                ("reading the neighbour entry on the bridge", (errno.ENOENT,))])
            if replies[0].errno == 0:
                _family, index, nud, _flags, _type = NDMSG.unpack_from(replies[0].body)
                state["fdb"] = (index, nud)
            state["bridge_mac"] = link_info(replies[1].body).address
            state["bridge_neigh"] = neigh_entry(replies[2].body) if ip and replies[2].errno == 0 else None
            if ip6:
                more = host.batch([get_neigh(link.master, ip6),
                                   rtnl_mdb.get_group(link.master, rtnl_mdb.solicited_node(ip6))])
                raise_for(more, [("reading the IPv6 neighbour entry on the bridge", (errno.ENOENT,)),
                                 ("reading the MDB entry", (errno.ENOENT,))])
                state["bridge_neigh6"] = neigh_entry(more[0].body) if more[0].errno == 0 else None
                state["mdb_state"] = rtnl_mdb.group_ports(more[1]).get(link.index)
                state["querier"] = rtnl_mdb.querier_on(replies[1])
                state["hash_max"] = rtnl_mdb.hash_max(replies[1])
                state["max_groups"] = rtnl_mdb.port_max_groups(reply)
        if spoof:
            state["filters"] = _guard_filters(host, link.index)
    if suppress and pod_netns_fd is not None and pod_ifname:
        with rtnl_in(pod_netns_fd, pod_netlink_fd) as pod:
            reply = pod.batch([getlink(pod_ifname)])[0]
            if reply.errno == 0:
                gw = pod.batch([get_neigh(link_info(reply.body).index, gateway)])[0]
                raise_for([gw], [("reading the gateway's neighbour entry in the pod", (errno.ENOENT,))])
                state["pod_looked_at"] = True
                state["gateway_neigh"] = neigh_entry(gw.body) if gw.errno == 0 else None
                if ip6 and gateway6:
                    gw6 = pod.batch([get_neigh(link_info(reply.body).index, gateway6)])[0]
                    raise_for([gw6], [("reading the IPv6 gateway's neighbour entry in the pod", (errno.ENOENT,))])
                    state["gateway6_neigh"] = neigh_entry(gw6.body) if gw6.errno == 0 else None
    return GuardState(**state)


def _guard_filters(host: Rtnl, veth_index: int) -> tuple[GuardFilter, ...]:
    """The filters in the guard's slot of the port's ingress, of any kind (none without a clsact qdisc)."""
    try:
        found = tc.filters(host, veth_index, GUARD_HOOK)
    except OSError as exc:
        raise GuardError(f"port guard: cannot read the tc filters of ifindex {veth_index}",
                         os.strerror(exc.errno)) from None
    return tuple(GuardFilter(kind=f.kind, name=f.name, direct_action=f.direct_action, prog_id=f.prog_id)
                 for f in found if f.handle == GUARD_HANDLE and f.prio == GUARD_PRIO)
