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

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net import bulk, links
from cni_fan.plan import NodePlan, SlicePlan

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTN_UNREACHABLE = 7


def family_of(s: SlicePlan) -> int:
    return socket.AF_INET if s.version == 4 else socket.AF_INET6


def route_problems(ipr: IPRoute, p: NodePlan, tunnel_index: int | None) -> list[str]:
    """The overlay route and its permanent next-hop neighbour, for every family of the plan."""
    out = []
    for s in p.slices:
        out += _slice_route_problems(ipr, p, s, tunnel_index)
    return out


def _slice_route_problems(ipr: IPRoute, p: NodePlan, s: SlicePlan, tunnel_index: int | None) -> list[str]:
    out = []
    family = family_of(s)
    routes = [r for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
              if r.get_attr("RTA_DST") == str(s.overlay.network) and r["dst_len"] == s.overlay.prefixlen]
    next_hop = str(s.next_hop) if p.encap == "vxlan" else None  # IPIP is layer 3: no next hop
    if not routes:
        out.append(f"route to {s.overlay_route} is missing")
    elif not any(r.get_attr("RTA_OIF") == tunnel_index and r.get_attr("RTA_GATEWAY") == next_hop
                 and r.get_attr("RTA_PREFSRC") == str(s.gateway) for r in routes):
        out.append(f"route to {s.overlay_route} does not go via {next_hop or 'link'} on {p.tunnel} src {s.gateway}")
    if tunnel_index is not None and next_hop is not None:
        neigh = [n for n in ipr.get_neighbours(ifindex=tunnel_index, family=family)
                 if n.get_attr("NDA_DST") == next_hop]
        if not neigh or neigh[0].get_attr("NDA_LLADDR") != p.tunnel_mac or not neigh[0]["state"] & NUD_PERMANENT:
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
        return route_problems(ipr, self.plan, links.link_index(ipr, self.plan.tunnel))

    def ensure(self, ipr: IPRoute) -> None:
        ensure_route(ipr, self.plan, links.link_index(ipr, self.plan.tunnel))

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
