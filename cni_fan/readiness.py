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

from cni_fan.bpf.fanprog import Hook
from cni_fan.net import links, tc
from cni_fan.net.rtnl import Rtnl
from cni_fan.node.fanmap_routes import peer_route_problems
from cni_fan.node.route import route_problems
from cni_fan.node.tunnel import Tunnel
from cni_fan.plan import NodePlan


def datapath_problems(plan: NodePlan) -> list[str]:
    """What keeps pods of this node from reaching other nodes; [] when ready.

    The checks are the node components' own (one definition of "up"),
    which read through the raw codec: no pyroute2 here.
    """
    with Rtnl() as sock:
        out = Tunnel(plan).problems()
        tunnel_index = links.link_index(sock, plan.tunnel)
        if plan.fanmap_mode == "routes":
            return out + peer_route_problems(plan, tunnel_index)
        out += route_problems(plan, tunnel_index)
        if tunnel_index is not None and tc.find(sock, tunnel_index, Hook.EGRESS) is None:
            out.append(f"fan program is not attached to {plan.tunnel} egress")
        return out
