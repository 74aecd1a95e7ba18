"""STATUS's question: is this node's Fan datapath carrying traffic?

A cheap probe for the plugin, not the node agent's full check: it asks
only the components that decide whether traffic to other nodes flows
(tunnel, overlay route, fan mapping), with a few netlink requests, and
imports none of the agent, the firewall or the program loader. With
`overlay6` the same components check the IPv6 side too: the tunnel's /128,
the IPv6 overlay route and its neighbour (`bpf`), the IPv6 peer routes
(`routes`).
"""
from __future__ import annotations

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
    out += route_problems(ipr, plan, tunnel_index)
    if tunnel_index is None:
        return out
    with Rtnl() as sock:
        attached = tc.find(sock, tunnel_index, Hook.EGRESS)
    if attached is None:
        out.append(f"fan program is not attached to {plan.tunnel} egress")
    return out
