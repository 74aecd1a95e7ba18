"""`fan`: the CNI plugin. Each verb reads top to bottom as the story it tells."""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
from typing import Iterable

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
from cni_fan.net import links, portguard, portguard_check, tombstone
from cni_fan.net.errors import UnderlayError
from cni_fan.net.netns import ipr_in, netns_exists, open_netns
from cni_fan.net.rtnl import Rtnl
from cni_fan.plan import NodePlan

log = logging.getLogger("cni_fan.plugin")




MAIN_TABLE = 254
RTN_UNICAST = 1
IP6_DEFAULT_METRIC = 1024
_ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def _route_conflicts(pod: IPRoute, routes) -> list[str]:
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
    for family in sorted({_family(r.dst) for r in routes}):
        for msg in pod.get_routes(family=family, table=MAIN_TABLE):
            if (msg.get_attr("RTA_TABLE") or msg["table"]) != MAIN_TABLE or msg["type"] != RTN_UNICAST:
                continue
            if (msg.get_attr("RTA_DST") or _ANY[family], msg["dst_len"]) in wanted \
                    and not _metric(msg, family) and not msg["tos"]:
                found.append(_describe_route(pod, msg))
    return found


def _family(text: str) -> int:
    return socket.AF_INET6 if ":" in text else socket.AF_INET


def _metric(msg, family: int) -> int:
    """The kernel stores IPv6 routes added with metric 0 as 1024 (IP6_RT_PRIO_USER)."""
    metric = msg.get_attr("RTA_PRIORITY") or 0
    return 0 if family == socket.AF_INET6 and metric == IP6_DEFAULT_METRIC else metric


def _describe_route(pod: IPRoute, msg) -> str:
    text = f"{msg.get_attr('RTA_DST') or _ANY[msg['family']]}/{msg['dst_len']}"
    if msg.get_attr("RTA_GATEWAY"):
        text += f" via {msg.get_attr('RTA_GATEWAY')}"
    oif = msg.get_attr("RTA_OIF")
    if oif:
        try:
            text += f" dev {pod.get_links(oif)[0].get_attr('IFLA_IFNAME')}"
        except NetlinkError:
            text += f" dev #{oif}"
    return text


def _refuse_existing_routes(pod: IPRoute, ifname: str, routes) -> None:
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


def _configure_pod_side(pod: IPRoute, ifname: str, ips: tuple[IPConfig, ...], routes, mtu: int) -> str:
    """Addresses, routes and link state inside the pod; returns the pod MAC.

    IPv6 addresses skip duplicate address detection: the Fan makes them
    unique, and DAD would keep a new pod's address unusable for a second or
    more (kubernetes issue 54651).
    """
    link = links.get_link(pod, ifname)
    if link is None:
        raise CniError(IO_FAILURE, f"{ifname!r} vanished from the pod right after it was created")
    index = link["index"]
    for ip in ips:
        address, prefixlen = ip.address.split("/")
        pod.addr("add", index=index, address=address, prefixlen=int(prefixlen),
                 **({"flags": links.IFA_F_NODAD} if ":" in address else {}))
    pod.link("set", index=index, state="up")
    for route in routes:
        dst = netaddr.IPNetwork(route.dst)
        kwargs = {"dst": str(dst.network), "dst_len": dst.prefixlen, "oif": index}
        if route.gw:
            kwargs["gateway"] = route.gw
        try:
            pod.route("add", **kwargs)
        except NetlinkError as exc:
            via = f" via {route.gw}" if route.gw else ""
            if exc.code == errno.EEXIST:  # appeared since cmd_add looked (a concurrent ADD of another interface)
                raise _route_exists(ifname, _route_conflicts(pod, [route]) or [route.dst]) from None
            if exc.code == errno.ENETUNREACH:
                raise CniError(INVALID_CONFIG, f"routes: the gateway of {route.dst}{via} is not reachable from "
                                               f"{ifname} ({', '.join(ip.address for ip in ips)}); a route's "
                                               "\"gw\" must be in the pod's subnet", os.strerror(exc.code)) from None
            raise CniError(IO_FAILURE, f"cannot add the route to {route.dst}{via} on {ifname} in the pod",
                           os.strerror(exc.code) if isinstance(exc.code, int) else str(exc)) from None
    return link.get_attr("IFLA_ADDRESS")


def cmd_add(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> Result:
    with contextlib.ExitStack() as held:  # sockets and descriptors closed on every way out
        host = held.enter_context(contextlib.closing(IPRoute()))
        plan = find_plan(host, cfg)
        pod_fd = open_netns(req.netns, ctx.netns_fds)
        held.callback(os.close, pod_fd)
        pod = held.enter_context(contextlib.closing(ipr_in(req.netns, ctx.netns_fds, ctx.netlink_fds)))
        return _add(req, cfg, host, plan, pod_fd, pod, ctx.netlink_fds.get(req.netns))


def _add(req: CniRequest, cfg: FanConfig, host: IPRoute, plan: NodePlan, pod_fd: int, pod: IPRoute,
         pod_netlink: int | None = None) -> Result:
    """ADD's story, once the host's and the pod's netlink sockets are open.

    `pod_netlink`: the thin client's socket in the pod, for the port guard
    (the plugin server's child may not enter the pod to open its own).
    The veth's pod end is made directly in the pod (its namespace by
    descriptor), which needs NET_ADMIN there, not setns.
    """
    with Rtnl() as raw:  # a DEL of this attachment just before: its pod end still holds req.ifname in the pod
        tombstone.clear(raw, links.host_veth_name(req.container_id, req.ifname))
    if links.link_index(pod, req.ifname) is not None:
        raise CniError(INTERFACE_EXISTS, f"interface {req.ifname!r} already exists in {req.netns}")
    routes = ipam.pod_routes(cfg.params, plan.slices)
    _refuse_existing_routes(pod, req.ifname, routes)
    ips = ipam.allocate(req, cfg.params, plan.slices)
    veth = links.host_veth_name(req.container_id, req.ifname)
    try:
        bridge_index = links.ensure_bridge(host, plan.bridge, plan.bridge_gateways, plan.mtu)
        veth_link = links.create_veth(host, veth, req.ifname, pod_fd, plan.mtu, bridge_index)
        links.attach_to_bridge(host, veth_link["index"], hairpin=True)
        pod_mac = _configure_pod_side(pod, req.ifname, ips, routes, plan.mtu)
        host_mac = veth_link.get_attr("IFLA_ADDRESS")
        ip4 = _of_family((i.address for i in ips), 4)  # none on an IPv6-only node
        ip6 = _of_family((i.address for i in ips), 6)
        portguard.install(cfg, bridge_index=bridge_index, veth_index=veth_link["index"], pod_netns_fd=pod_fd,
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


def _rollback(host: IPRoute, veth: str, req: CniRequest, cfg: FanConfig) -> None:
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
    host = IPRoute()
    try:
        plan = find_plan(host, cfg)
        ipam.check_reservation(req, cfg.params, tuple(ip.address for ip in prev.ips))
        veth = links.host_veth_name(req.container_id, req.ifname)
        veth_index = links.link_index(host, veth)
        bridge_index = links.link_index(host, plan.bridge)
        if bridge_index is None:
            problems.append(f"bridge {plan.bridge} is missing")
        if veth_index is None:
            problems.append(f"host veth {veth} is missing")
        elif bridge_index is not None and host.get_links(veth_index)[0].get_attr("IFLA_MASTER") != bridge_index:
            problems.append(f"host veth {veth} is not attached to {plan.bridge}")
        on_bridge = not problems
    finally:
        host.close()
    if not netns_exists(req.netns, ctx.netns_fds):
        raise CniError(CHECK_FAILED, f"network namespace {req.netns} is gone")
    pod = ipr_in(req.netns, ctx.netns_fds, ctx.netlink_fds)
    try:
        problems.extend(_check_pod_side(pod, req.ifname, pod_iface, prev))
        pod_link = links.get_link(pod, req.ifname)
    finally:
        pod.close()
    pod_mac = pod_iface.mac or (pod_link.get_attr("IFLA_ADDRESS") if pod_link is not None else "")
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


def _check_pod_side(pod: IPRoute, ifname: str, expected: Interface, prev: Result) -> list[str]:
    index = links.link_index(pod, ifname)
    if index is None:
        return [f"interface {ifname} is missing in the pod"]
    problems = []
    link = pod.get_links(index)[0]
    if expected.mac and link.get_attr("IFLA_ADDRESS") != expected.mac.lower():
        problems.append(f"{ifname} has MAC {link.get_attr('IFLA_ADDRESS')}, prevResult says {expected.mac}")
    have = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in pod.get_addr(index=index)}
    for ip in prev.ips:
        if ip.address not in have:
            problems.append(f"{ifname} lacks address {ip.address} (has {', '.join(sorted(have)) or 'none'})")
    routes = {(f"{r.get_attr('RTA_DST') or _ANY[family]}/{r['dst_len']}", r.get_attr("RTA_GATEWAY") or "")
              for family in (socket.AF_INET, socket.AF_INET6) for r in pod.get_routes(family=family, oif=index)}
    for route in prev.routes:
        dst = netaddr.IPNetwork(route.dst)
        if (f"{dst.network}/{dst.prefixlen}", route.gw) not in routes:
            problems.append(f"route to {route.dst} via {route.gw or 'link'} is missing in the pod")
    return problems


def cmd_gc(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    """Release every address and veth whose attachment the runtime no longer knows."""
    valid = valid_attachments(req.config)
    ipam.gc(req, cfg.params)
    with Rtnl() as raw:  # left by a DEL whose process died between its answer and the deletion
        for tomb in tombstone.sweep(raw):
            log.info("GC: deleted tombstone %s", tomb)
    keep = {links.host_veth_name(cid, ifname) for cid, ifname in valid}
    host = IPRoute()
    try:
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
    finally:
        host.close()


def cmd_status(req: CniRequest, cfg: FanConfig, ctx: CallContext) -> None:
    """Ready when this node has its underlay address and room for a pod."""
    host = IPRoute()
    try:
        plan = find_plan(host, cfg)
        pool = address_pool(cfg.params, plan.primary)
        with ipam.pool_errors():
            full = pool.used() >= pool.capacity()
    except (CniError, UnderlayError) as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan is not ready on this node: {exc.msg}", exc.details) from None
    finally:
        host.close()
    if full:
        raise CniError(PLUGIN_NOT_AVAILABLE,
                       f"fan is not ready on this node: no free address left in {plan.primary.slice}")
    from cni_fan.readiness import datapath_problems  # STATUS only: the other verbs need none of it

    host = IPRoute()
    try:
        problems = datapath_problems(host, plan)
    finally:
        host.close()
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
