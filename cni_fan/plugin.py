"""`fan`: the CNI plugin. Each verb reads top to bottom as the story it tells."""
from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Iterable

import netaddr

from cni_fan.adapter_errors import verb_table
from cni_fan.attach_lock import serialized
from cni_fan.cni.call import CallContext, PluginVerbs
from cni_fan.cni.errors import (CHECK_FAILED, CniError, INTERFACE_EXISTS, INVALID_CONFIG, IO_FAILURE,
                                PLUGIN_NOT_AVAILABLE, ROUTE_EXISTS)
from cni_fan.cni.request import CniRequest
from cni_fan.cni.result import Interface, IPConfig, Result, parse_result
from cni_fan.config import FanConfig
from cni_fan.ipam import attachments as ipam
from cni_fan.local_slice import address_pool, find_plan, valid_attachments
from cni_fan.net import links, portguard, portguard_check, rtnl_addrs, rtnl_links, tombstone
from cni_fan.net.errors import LinkError, UnderlayError
from cni_fan.net.netns import netns_exists, open_netns, rtnl_in
from cni_fan.net.rtnl import AF_INET, AF_INET6, IFA_F_NODAD, RT_TABLE_MAIN, RTN_UNICAST, Rtnl, family_of
from cni_fan.plan import NodePlan

log = logging.getLogger("cni_fan.plugin")

IP6_DEFAULT_METRIC = 1024


def _route_conflicts(pod: Rtnl, routes) -> list[str]:
    """The routes of `routes` that the pod's main table already has, as "dst via gw dev name".

    The kernel refuses a second route with the same destination, TOS and
    metric in one table (EEXIST); ours have TOS 0 and metric 0. Typically
    the default route of the pod's first interface, when a second interface
    (Multus' net1) comes from a network that asks for the default route too.
    """
    wanted = {(str(net.network), net.prefixlen) for net in (netaddr.IPNetwork(r.dst) for r in routes)}
    if not wanted:
        return []
    found = []
    for family in sorted({family_of(r.dst) for r in routes}):
        for route in list(rtnl_addrs.routes(pod, family)):  # read to its end: _describe_route asks the socket
            if route.table != RT_TABLE_MAIN or route.type != RTN_UNICAST:
                continue
            if (route.dst, route.dst_len) in wanted and not _metric(route) and not route.tos:
                found.append(_describe_route(pod, route))
    return found


def _metric(route: rtnl_addrs.RouteInfo) -> int:
    """The kernel stores IPv6 routes added with metric 0 as 1024 (IP6_RT_PRIO_USER)."""
    return 0 if route.family == AF_INET6 and route.priority == IP6_DEFAULT_METRIC else route.priority


def _describe_route(pod: Rtnl, route: rtnl_addrs.RouteInfo) -> str:
    text = f"{route.dst}/{route.dst_len}"
    if route.gateway:
        text += f" via {route.gateway}"
    if route.oif:
        try:
            link = rtnl_links.get_link(pod, index=route.oif)
        except OSError:
            link = None
        text += f" dev {link.name}" if link is not None else f" dev #{route.oif}"
    return text


def _refuse_existing_routes(pod: Rtnl, ifname: str, routes) -> None:
    """Refuse before anything is taken or made, so nothing changes (one route dump of the pod)."""
    conflicts = _route_conflicts(pod, routes)
    if conflicts:
        raise _route_exists(ifname, conflicts)


def _route_exists(ifname: str, existing: list[str]) -> CniError:
    return CniError(ROUTE_EXISTS,
                    f"the pod already has the route {' and '.join(existing)}, and this network's config asks for "
                    f"it again on {ifname}; for a second interface give its network config \"routes\": [] "
                    f"(no routes) or only routes the pod does not have yet",
                    "the kernel keeps one route per destination and metric in a table (EEXIST)")


def _configure_pod_side(pod: Rtnl, ifname: str, ips: tuple[IPConfig, ...], routes, mtu: int) -> str:
    """Addresses, link state and routes inside the pod, in one send; returns the pod MAC.

    The kernel takes the requests in order, so the routes find the link up
    and its addresses in place. IPv6 addresses skip duplicate address
    detection: the Fan makes them unique, and DAD would keep a new pod's
    address unusable for a second or more (kubernetes issue 54651).
    """
    link = links.get_link(pod, ifname)
    if link is None:
        raise CniError(IO_FAILURE, f"{ifname!r} vanished from the pod right after it was created")
    requests = [rtnl_addrs.new_addr(link.index, *_split(ip.address), IFA_F_NODAD if ":" in ip.address else 0)
                for ip in ips]
    requests.append(rtnl_links.set_link(link.index, up=True))
    for route in routes:
        dst = netaddr.IPNetwork(route.dst)
        requests.append(rtnl_addrs.new_route(str(dst.network), dst.prefixlen, link.index, route.gw or None))
    replies = pod.batch(requests)
    for ip, reply in zip(ips, replies):
        if reply.errno:
            raise LinkError(f"cannot add {ip.address} to {ifname} in the pod", os.strerror(reply.errno),
                            subject=ifname)
    if replies[len(ips)].errno:
        raise LinkError(f"cannot bring {ifname} up in the pod", os.strerror(replies[len(ips)].errno), subject=ifname)
    for route, reply in zip(routes, replies[len(ips) + 1:]):
        if reply.errno:
            raise _route_failed(pod, ifname, ips, route, reply.errno)
    return link.address or ""


def _split(address: str) -> tuple[str, int]:
    ip, prefixlen = address.split("/")
    return ip, int(prefixlen)


def _route_failed(pod: Rtnl, ifname: str, ips: tuple[IPConfig, ...], route, code: int) -> CniError:
    via = f" via {route.gw}" if route.gw else ""
    if code == errno.EEXIST:  # appeared since cmd_add looked (a concurrent ADD of another interface)
        return _route_exists(ifname, _route_conflicts(pod, [route]) or [route.dst])
    if code == errno.ENETUNREACH:
        return CniError(INVALID_CONFIG, f"routes: the gateway of {route.dst}{via} is not reachable from "
                                        f"{ifname} ({', '.join(ip.address for ip in ips)}); a route's "
                                        "\"gw\" must be in the pod's subnet", os.strerror(code))
    return CniError(IO_FAILURE, f"cannot add the route to {route.dst}{via} on {ifname} in the pod", os.strerror(code))


def cmd_add(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> Result:
    with Rtnl() as host:  # sockets and descriptors closed on every way out
        plan = find_plan(host, cfg)
        pod_fd = open_netns(req.netns, ctx.netns_fds)
        try:
            with rtnl_in(req.netns, ctx.netns_fds, ctx.netlink_fds) as pod:
                return _add(req, cfg, host, plan, pod_fd, pod, ctx.netlink_fds.get(req.netns))
        finally:
            os.close(pod_fd)


def _add(req: CniRequest, cfg: FanConfig, host: Rtnl, plan: NodePlan, pod_fd: int, pod: Rtnl,
         pod_netlink: int | None = None) -> Result:
    """ADD's story, once the host's and the pod's netlink sockets are open.

    `pod_netlink`: the thin client's socket in the pod, for the port guard
    (the plugin server's child may not enter the pod to open its own).
    The veth's pod end is made directly in the pod (its namespace by
    descriptor), which needs NET_ADMIN there, not setns.
    """
    veth = links.host_veth_name(req.container_id, req.ifname)
    tombstone.clear(host, veth)  # a DEL of this attachment just before: its pod end still holds req.ifname in the pod
    if links.link_index(pod, req.ifname) is not None:
        raise CniError(INTERFACE_EXISTS, f"interface {req.ifname!r} already exists in {req.netns}")
    routes = ipam.pod_routes(cfg.params, plan.slices)
    _refuse_existing_routes(pod, req.ifname, routes)
    ips = ipam.allocate(req, cfg.params, plan.slices)
    try:
        bridge_index = links.ensure_bridge(host, plan.bridge, plan.bridge_gateways, plan.mtu)
        veth_link = links.create_veth(host, veth, req.ifname, pod_fd, plan.mtu, bridge_index)  # up, hairpin
        pod_mac = _configure_pod_side(pod, req.ifname, ips, routes, plan.mtu)
        host_mac = veth_link.address
        ip4 = _of_family((i.address for i in ips), 4)  # none on an IPv6-only node
        ip6 = _of_family((i.address for i in ips), 6)
        portguard.install(cfg, bridge_index=bridge_index, veth_index=veth_link.index, pod_netns_fd=pod_fd,
                          pod_ifname=req.ifname, pod_ip=ip4, pod_mac=pod_mac, gateway=str(plan.primary.gateway),
                          pod_ip6=ip6, gateway6=str(plan.ipv6.gateway) if plan.ipv6 else None,
                          pod_netlink_fd=pod_netlink)
    except BaseException:
        _rollback(host, veth, req, cfg)
        raise
    log.info("ADD %s/%s: %s on %s via %s", req.container_id[:12], req.ifname, " ".join(i.address for i in ips), veth,
             plan.bridge)
    return Result(
        interfaces=(Interface(name=veth, mac=host_mac),
                    Interface(name=req.ifname, mac=pod_mac, mtu=plan.mtu, sandbox=req.netns)),
        ips=tuple(IPConfig(address=i.address, gateway=i.gateway, interface=1) for i in ips),
        routes=routes,
        dns=cfg.dns,
    )


def _rollback(host: Rtnl, veth: str, req: CniRequest, cfg: FanConfig) -> None:
    """Undo a failed ADD: the veth (its pod end goes with it) and the address."""
    try:
        portguard.rollback(veth)
        links.delete_link(host, veth)
    except Exception:  # keep the original error; this one goes to the log
        log.exception("rollback: failed to delete %s", veth)
    try:
        ipam.release(req, cfg.params)
    except Exception:
        log.exception("rollback: failed to release the address of %s/%s", req.container_id, req.ifname)


def cmd_del(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    """Idempotent: repeated, after the netns is gone, or with nothing ever added.

    The veth is cut off and renamed to a tombstone, and deleted after the
    answer (`net/tombstone.py`): the kernel's teardown is most of a DEL and
    the runtime need not wait for it.
    """
    veth = links.host_veth_name(req.container_id, req.ifname)
    portguard.remove(veth, cfg, req.container_id, req.ifname)
    tomb = tombstone.bury_in_host(veth)
    ipam.release(req, cfg.params)
    if tomb is not None:
        ctx.defer(functools.partial(tombstone.delete_in_host, tomb))
    log.info("DEL %s/%s%s", req.container_id[:12], req.ifname, "" if tomb else " (no veth left)")


def cmd_check(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    if "prevResult" not in req.config:
        raise CniError(CHECK_FAILED, "CHECK needs a prevResult and the config has none")
    prev = parse_result(req.config["prevResult"])
    pod_iface = next((i for i in prev.interfaces if i.sandbox and i.name == req.ifname), None)
    if pod_iface is None or not prev.ips:
        raise CniError(CHECK_FAILED, f"prevResult has no interface {req.ifname!r} in a sandbox with an address")
    problems: list[str] = []
    with Rtnl() as host:
        plan = find_plan(host, cfg)
        ipam.check_reservation(req, cfg.params, tuple(ip.address for ip in prev.ips))
        veth = links.host_veth_name(req.container_id, req.ifname)
        veth_link = links.get_link(host, veth)
        bridge_index = links.link_index(host, plan.bridge)
        if bridge_index is None:
            problems.append(f"bridge {plan.bridge} is missing")
        if veth_link is None:
            problems.append(f"host veth {veth} is missing")
        elif bridge_index is not None and veth_link.master != bridge_index:
            problems.append(f"host veth {veth} is not attached to {plan.bridge}")
        on_bridge = not problems
    if not netns_exists(req.netns, ctx.netns_fds):
        raise CniError(CHECK_FAILED, f"network namespace {req.netns} is gone")
    with rtnl_in(req.netns, ctx.netns_fds, ctx.netlink_fds) as pod:
        pod_link = links.get_link(pod, req.ifname)
        problems.extend(_check_pod_side(pod, req.ifname, pod_link, pod_iface, prev))
    pod_mac = pod_iface.mac or (pod_link.address if pod_link is not None else "")
    if on_bridge and pod_mac:
        # The port guard (neighSuppress, antiSpoof): only what the config turns on.
        pod_fd = open_netns(req.netns, ctx.netns_fds)
        try:
            problems.extend(portguard_check.problems(
                cfg, veth=veth, pod_ip=_address_of(prev, 4) if plan.ipv4 else None, pod_mac=pod_mac,
                gateway=str(plan.primary.gateway),
                pod_netns_fd=pod_fd, pod_ifname=req.ifname if pod_link is not None else None,
                pod_ip6=_address_of(prev, 6) if plan.ipv6 else None,
                gateway6=str(plan.ipv6.gateway) if plan.ipv6 else None,
                pod_netlink_fd=ctx.netlink_fds.get(req.netns)))
        finally:
            os.close(pod_fd)
    if problems:
        raise CniError(CHECK_FAILED, f"CHECK of {req.container_id}/{req.ifname} failed: " + "; ".join(problems))


def _of_family(addresses: Iterable[str], version: int) -> str | None:
    return next((a for a in addresses if (":" in a) == (version == 6)), None)


def _address_of(prev: Result, version: int) -> str | None:
    """The prevResult's address of one family (IPv4 falls back to the first, as before dual-stack)."""
    found = _of_family((ip.address for ip in prev.ips), version)
    return found if found is not None or version == 6 else prev.ips[0].address


def _check_pod_side(pod: Rtnl, ifname: str, link: rtnl_links.LinkInfo | None, expected: Interface,
                    prev: Result) -> list[str]:
    if link is None:
        return [f"interface {ifname} is missing in the pod"]
    problems = []
    if expected.mac and link.address != expected.mac.lower():
        problems.append(f"{ifname} has MAC {link.address}, prevResult says {expected.mac}")
    have = {f"{a.address}/{a.prefixlen}" for a in rtnl_addrs.addresses(pod, index=link.index)}
    for ip in prev.ips:
        if ip.address not in have:
            problems.append(f"{ifname} lacks address {ip.address} (has {', '.join(sorted(have)) or 'none'})")
    routes = {(f"{r.dst}/{r.dst_len}", r.gateway or "") for family in (AF_INET, AF_INET6)
              for r in rtnl_addrs.routes(pod, family) if r.oif == link.index and r.table == RT_TABLE_MAIN}
    for route in prev.routes:
        dst = netaddr.IPNetwork(route.dst)
        if (f"{dst.network}/{dst.prefixlen}", route.gw) not in routes:
            problems.append(f"route to {route.dst} via {route.gw or 'link'} is missing in the pod")
    return problems


def cmd_gc(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    """Release every address and veth whose attachment the runtime no longer knows."""
    valid = valid_attachments(req.config)
    ipam.gc(req, cfg.params)
    keep = {links.host_veth_name(cid, ifname) for cid, ifname in valid}
    with Rtnl() as host:
        for tomb in tombstone.sweep(host):  # left by a DEL whose process died between its answer and the deletion
            log.info("GC: deleted tombstone %s", tomb)
        try:
            bridge = find_plan(host, cfg).bridge
        except (CniError, UnderlayError) as exc:
            log.warning("GC: cannot find this node's bridge (%s); leaving veths alone", exc)
            return
        bridge_index = links.link_index(host, bridge)
        if bridge_index is None:
            return
        for port in links.bridge_ports(host, bridge_index):
            if port.startswith(links.HOST_VETH_PREFIX) and port not in keep:
                log.info("GC: deleting orphan veth %s", port)
                links.delete_link(host, port)
        portguard.gc(bridge_index)


def cmd_status(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    """Ready when this node has its underlay address and room for a pod."""
    try:
        with Rtnl() as host:
            plan = find_plan(host, cfg)
        pool = address_pool(cfg.params, plan.primary)
        with ipam.pool_errors():
            full = pool.used() >= pool.capacity()
    except (CniError, UnderlayError) as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan is not ready on this node: {exc.msg}", exc.details) from None
    if full:
        raise CniError(PLUGIN_NOT_AVAILABLE,
                       f"fan is not ready on this node: no free address left in {plan.primary.slice}")
    from cni_fan.readiness import datapath_problems  # STATUS only: the other verbs need none of it

    problems = datapath_problems(plan)
    if problems:
        # Pods on this node still get addresses (ADD works on the bridge);
        # only traffic to other nodes waits for the node agent.
        raise CniError(PLUGIN_NOT_AVAILABLE, "the fan datapath of this node is not up (is the cni-fan agent running?)",
                       "; ".join(problems))


def _state_dir(cfg: FanConfig) -> str:
    return cfg.params.state_dir


# The config is parsed once per call, before the verb; the lock wrapper
# finds its state directory in the parsed config.
PLUGIN = PluginVerbs(
    parse_config=FanConfig.from_dict,
    verbs=verb_table({"ADD": serialized(cmd_add, _state_dir), "DEL": serialized(cmd_del, _state_dir),
                      "CHECK": cmd_check, "GC": serialized(cmd_gc, _state_dir), "STATUS": cmd_status}),
)
