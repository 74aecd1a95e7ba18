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

from pyroute2 import IPRoute

from cni_fan.bpf.fanprog import Hook
from cni_fan.net import links, tc
from cni_fan.net.rtnl import Rtnl
from cni_fan.node.fanmap_routes import peer_route_problems
from cni_fan.node import sysctl
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
    values = [sysctl.read(f"net.ipv4.conf.{name}.rp_filter") for name in ("all", plan.underlay_ifname)]
    effective = max(int(v) for v in values if v is not None and v.isdigit()) if any(values) else 0
    if effective == 1:
        return [f"direct routing is on in segment {plan.segment} but {plan.underlay_ifname}'s reverse-path "
                "filter is strict: unencapsulated packets from the segment's pods are dropped"]
    return []
