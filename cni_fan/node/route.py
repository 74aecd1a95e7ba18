"""The overlay's one route on this node, per family.

`bpf` mapping (`OverlayRoute`): the whole overlay goes into the tunnel via
an on-link next hop whose permanent neighbour entry carries the shared
tunnel MAC (VXLAN; IPIP is layer 3 and needs neither), with `src` = the
gateway, so traffic the node itself sends into the overlay has an overlay
source. `routes` mapping (`UnreachableRoute`): the peers' slices have
routes of their own; what no node owns is unreachable, rather than
leaking out the default route. Either way the node's own slice stays on
the bridge (a longer prefix wins). With `overlay6` each piece exists for
`overlay6` as well (next hop: its network address, as for IPv4).
"""
from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from cni_fan.net import bulk, rtnl_addrs, rtnl_links
from cni_fan.net.rtnl import Rtnl
from cni_fan.node.tunnel import find_tunnel_index
from cni_fan.plan import NodePlan, SlicePlan

if TYPE_CHECKING:  # the node keeps pyroute2 for what it makes; STATUS, which reads, imports none of it
    from pyroute2 import IPRoute

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTN_UNREACHABLE = 7


def family_of(s: SlicePlan) -> int:
    return socket.AF_INET if s.version == 4 else socket.AF_INET6


def route_problems(p: NodePlan, tunnel_index: int | None) -> list[str]:
    """The overlay route and its permanent next-hop neighbour, for every family of the plan
    (raw codec: `fan`'s STATUS asks this too)."""
    out = []
    with Rtnl() as sock:
        for s in p.slices:
            family = family_of(s)
            routes = list(rtnl_addrs.routes(sock, family))
            # The device's neighbour entries (the helper is the bridge's; any device's dump is the same).
            neighbours = (rtnl_links.bridge_neighbours(sock, tunnel_index, family)
                          if tunnel_index is not None and p.encap == "vxlan" else [])
            out += slice_route_problems(p, s, tunnel_index, routes, neighbours)
    return out


def slice_route_problems(p: NodePlan, s: SlicePlan, tunnel_index: int | None, routes: list[rtnl_addrs.RouteInfo],
                         neighbours: list[rtnl_links.NeighEntry]) -> list[str]:
    """What is wrong with one family's overlay route, judged from the kernel's routes and the
    tunnel's neighbour entries (pure)."""
    out = []
    routes = [r for r in routes if r.table == RT_TABLE_MAIN
              and r.dst == str(s.overlay.network) and r.dst_len == s.overlay.prefixlen]
    next_hop = str(s.next_hop) if p.encap == "vxlan" else None  # IPIP is layer 3: no next hop
    if not routes:
        out.append(f"route to {s.overlay_route} is missing")
    elif not any(r.oif == tunnel_index and r.gateway == next_hop and r.prefsrc == str(s.gateway) for r in routes):
        out.append(f"route to {s.overlay_route} does not go via {next_hop or 'link'} on {p.tunnel} src {s.gateway}")
    if tunnel_index is not None and next_hop is not None:
        neigh = [n for n in neighbours if n.ip == next_hop]
        if not neigh or neigh[0].mac != p.tunnel_mac or not neigh[0].state & NUD_PERMANENT:
            out.append(f"permanent neighbour {next_hop} -> {p.tunnel_mac} on {p.tunnel} is missing")
    return out


def ensure_route(ipr: IPRoute, p: NodePlan, tunnel_index: int) -> None:
    """The overlay route (and, for VXLAN, its next hop's neighbour entry first), per family."""
    for s in p.slices:
        family = family_of(s)
        if p.encap == "ipip":
            ipr.route("replace", family=family, dst=str(s.overlay.network), dst_len=s.overlay.prefixlen,
                      oif=tunnel_index, prefsrc=str(s.gateway), scope=RT_SCOPE_LINK, table=RT_TABLE_MAIN)
            continue
        ipr.neigh("replace", family=family, dst=str(s.next_hop), lladdr=p.tunnel_mac, ifindex=tunnel_index,
                  state=NUD_PERMANENT)
        ipr.route("replace", family=family, dst=str(s.overlay.network), dst_len=s.overlay.prefixlen,
                  gateway=str(s.next_hop), oif=tunnel_index, flags=RTNH_F_ONLINK, prefsrc=str(s.gateway),
                  table=RT_TABLE_MAIN)


def remove_overlay_route(ipr: IPRoute, p: NodePlan) -> list[str]:
    """Whichever route to the whole overlay is there, per family (the neighbours go with the tunnel)."""
    from pyroute2.netlink.exceptions import NetlinkError

    removed = []
    for s in p.slices:
        try:
            ipr.route("del", family=family_of(s), dst=str(s.overlay.network), dst_len=s.overlay.prefixlen,
                      table=RT_TABLE_MAIN)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise
            continue
        removed.append(f"route {s.overlay_route}")
    return removed


class OverlayRoute:
    """`bpf` mode: the whole overlay into the tunnel, where the fan program maps it."""
    role = "route"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute) -> list[str]:
        return route_problems(self.plan, find_tunnel_index(self.plan))

    def ensure(self, ipr: IPRoute) -> None:
        ensure_route(ipr, self.plan, find_tunnel_index(self.plan))

    def remove(self, ipr: IPRoute) -> list[str]:
        return remove_overlay_route(ipr, self.plan)


class UnreachableRoute:
    """`routes` mode: overlay addresses no node owns must not leak out the default route."""
    role = "route"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute) -> list[str]:
        out = []
        sock = bulk.open_socket()
        try:
            for s in self.plan.slices:
                dst = s.overlay.network.packed
                # Read each dump to its end (no any()): the socket's next dump cannot start before.
                found = [d == dst and length == s.overlay.prefixlen and rtype == RTN_UNREACHABLE
                         for d, length, rtype, _proto, _oif in bulk.routes(sock, family_of(s))]
                if not any(found):
                    out.append(f"unreachable route for {s.overlay_route} is missing")
        finally:
            sock.close()
        return out

    def ensure(self, ipr: IPRoute) -> None:
        for s in self.plan.slices:
            ipr.route("replace", family=family_of(s), dst=str(s.overlay.network), dst_len=s.overlay.prefixlen,
                      type=RTN_UNREACHABLE, table=RT_TABLE_MAIN)

    def remove(self, ipr: IPRoute) -> list[str]:
        return remove_overlay_route(ipr, self.plan)
