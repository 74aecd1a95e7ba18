"""STATUS's question: is this node's Fan datapath carrying traffic?

A cheap probe for the plugin, not the node agent's full check: it asks
only the components that decide whether traffic to other nodes flows
(tunnel, overlay route, fan mapping), with a few netlink requests, and
imports none of the agent, the firewall or the program loader. With
`overlay6` the same components check the IPv6 side too: the tunnel's /128,
the IPv6 overlay route and its neighbour (`bpf`), the IPv6 peer routes
(`routes`). With direct routing it also checks that the underlay
interface's reverse-path filter is not strict (the agent sets it loose):
strict, it drops the direct packets from the segment's pods.
"""
from __future__ import annotations

import os
from pathlib import Path

from pyroute2 import IPRoute

from cni_fan.bpf.fanprog import Hook
from cni_fan.net import links, tc
from cni_fan.net.rtnl import Rtnl
from cni_fan.node.fanmap_routes import peer_route_problems
from cni_fan.node.route import route_problems
from cni_fan.node.tunnel import Tunnel
from cni_fan.plan import NodePlan


def datapath_problems(ipr: IPRoute, plan: NodePlan) -> list[str]:
    """What keeps pods of this node from reaching other nodes; [] when ready."""
    out = Tunnel(plan).problems(ipr)
    tunnel_index = links.link_index(ipr, plan.tunnel)
    if plan.fanmap_mode == "routes":
        return out + peer_route_problems(plan, tunnel_index)
    out += route_problems(ipr, plan, tunnel_index) + direct_routing_problems(plan)
    if tunnel_index is None:
        return out
    with Rtnl() as sock:
        attached = tc.find(sock, tunnel_index, Hook.EGRESS)
    if attached is None:
        out.append(f"fan program is not attached to {plan.tunnel} egress")
    return out


def direct_routing_problems(plan: NodePlan) -> list[str]:
    """With direct routing: the underlay's rp_filter must not be strict (the kernel uses the larger
    of `all` and the device's value, so 2 on the device wins over a strict `all`)."""
    if not plan.direct or plan.ipv4 is None:
        return []
    values = [_rp_filter(name) for name in ("all", plan.underlay_ifname)]
    if max((v for v in values if v is not None), default=0) == 1:
        return [f"direct routing is on in segment {plan.segment} but {plan.underlay_ifname}'s reverse-path "
                "filter is strict: unencapsulated packets from the segment's pods are dropped"]
    return []


def _rp_filter(ifname: str) -> int | None:
    """The IPv4 rp_filter of `ifname` ("all" for the default), read where the agent's sysctls live
    (CNI_FAN_PROC_SYS, as in cni_fan.net.links); None when it cannot be read. Not through
    cni_fan.node.sysctl: the probe imports no component it does not ask."""
    path = Path(os.environ.get("CNI_FAN_PROC_SYS", "/proc/sys"), "net", "ipv4", "conf", ifname, "rp_filter")
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
