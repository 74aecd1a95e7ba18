"""The `routes` fan mapping, for nodes where eBPF cannot be used.

Deterministic state for every possible peer in the underlay, computed
from the Fan map alone (`FanMap.host_ints`, `slice_and_gateway_ints`; no
database, no discovery): for each peer host h, a route to h's slice via
h's gateway (on-link, src = our gateway), a permanent neighbour entry
giving h's gateway the MAC `peer_mac(h)`, and a VXLAN FDB entry sending
that MAC to h's underlay address. Each node's tunnel carries its own
`peer_mac`, so the receiver accepts the frame (and the VXLAN loop check,
which drops frames from its own MAC, does not fire). With `overlay6`,
also per peer h: a route to h's IPv6 slice via h's IPv6 gateway (on-link,
src = our IPv6 gateway) and a permanent IPv6 neighbour entry giving that
gateway the same `peer_mac(h)`; the FDB entry serves both families. Cost:
three kernel entries per peer, five with `overlay6` (196,599 and 327,665
on a /16 underlay), whatever the number of live nodes; they are streamed
with `cni_fan.net.bulk`.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Iterator

from cni_fan.net import bulk
from cni_fan.node.tunnel import find_tunnel_index
from cni_fan.plan import NodePlan

if TYPE_CHECKING:  # the node keeps pyroute2 for what it makes; STATUS, which reads, imports none of it
    from pyroute2 import IPRoute

log = logging.getLogger("cni_fan.node")
FULL_CHECK_EVERY = 30.0
# Distinct metrics keep route installation linear (see bulk.route_add).
METRIC_BASE = 1000


def expected_entries(plan: NodePlan) -> int:
    """Peer routes per family: every host of the underlay but this one."""
    return len(plan.primary.fanmap.host_ints()) - 1


def messages(plan: NodePlan, tunnel_index: int, start_seq: int = 100) -> Iterator[bytes]:
    """Neighbour, FDB and route messages for every peer, in integer math
    (no netaddr object per peer: a /16 underlay has 65,533 peers); per peer
    the IPv4 neighbour, FDB entry and route, then (with `overlay6`) the IPv6
    neighbour and route."""
    v4, v6 = plan.ipv4, plan.ipv6
    assert v4 is not None, "the config refuses fanmap \"routes\" on an IPv6 underlay"
    fanmap = v4.fanmap
    src = v4.gateway.packed
    prefixlen = fanmap.slice_prefixlen
    src6 = v6.gateway.packed if v6 is not None else b""
    own = int(v4.host)
    seq = start_seq
    for index, host in enumerate(fanmap.host_ints()):
        if host == own:
            continue
        slice_base, gateway = fanmap.slice_and_gateway_ints(host)
        gw = gateway.to_bytes(4, "big")
        host_bytes = host.to_bytes(4, "big")
        mac = b"\x02\xfb" + host_bytes  # plan.peer_mac(host)
        yield bulk.neigh_add(seq, tunnel_index, gw, mac)
        yield bulk.fdb_add(seq + 1, tunnel_index, mac, host_bytes)
        yield bulk.route_add(seq + 2, slice_base.to_bytes(4, "big"), prefixlen, gw, tunnel_index, src,
                             metric=METRIC_BASE + index)
        seq += 3
        if v6 is not None:
            slice6, gateway6 = v6.fanmap.slice_and_gateway_ints(host)
            gw6 = gateway6.to_bytes(16, "big")
            yield bulk.neigh_add(seq, tunnel_index, gw6, mac)
            yield bulk.route_add(seq + 1, slice6.to_bytes(16, "big"), v6.fanmap.slice_prefixlen, gw6,
                                 tunnel_index, src6, metric=METRIC_BASE + index)
            seq += 2


def peer_route_problems(plan: NodePlan, tunnel_index: int | None) -> list[str]:
    """Whether every peer's route is on the tunnel, per family (one dump each, counted)."""
    if tunnel_index is None:
        return ["fan routes: no tunnel"]
    want = expected_entries(plan)
    out = []
    sock = bulk.open_socket()
    try:
        for s in plan.slices:
            family = socket.AF_INET if s.version == 4 else socket.AF_INET6
            have = bulk.count_routes(sock, tunnel_index, family=family)
            if have < want:
                name = "" if s.version == 4 else "IPv6 "
                out.append(f"fan routes: {have} of {want} {name}peer routes on {plan.tunnel}")
    finally:
        sock.close()
    return out


class RoutesFanmap:
    role = "fanmap"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.last_full_check = 0.0
        self.installed_on: int | None = None

    def ensure(self, ipr: IPRoute) -> None:
        plan = self.plan
        tunnel_index = find_tunnel_index(plan)
        if not self._problems(tunnel_index, force=self.installed_on != tunnel_index):
            return
        started = time.monotonic()
        sock = bulk.open_socket()
        try:
            failures = sock.send_all(messages(plan, tunnel_index))
        finally:
            sock.close()
        if failures:
            raise bulk.BulkError(failures[0], f"{len(failures)} route/neighbour/FDB entries were refused: "
                                              f"{bulk.describe(failures)}")
        self.installed_on = tunnel_index
        self.last_full_check = time.monotonic()
        log.info("installed %d peers' routes, neighbours and FDB entries (%s) in %.1fs",
                 expected_entries(plan), "IPv4 and IPv6" if plan.ipv6 is not None else "IPv4",
                 time.monotonic() - started)

    def problems(self, ipr: IPRoute) -> list[str]:
        """Counts the peers' routes at most every FULL_CHECK_EVERY seconds (a dump of them all)."""
        return self._problems(find_tunnel_index(self.plan))

    def _problems(self, tunnel_index: int | None, force: bool = False) -> list[str]:
        if tunnel_index is not None and not force and time.monotonic() - self.last_full_check < FULL_CHECK_EVERY:
            return []
        out = peer_route_problems(self.plan, tunnel_index)
        if tunnel_index is not None:
            self.last_full_check = time.monotonic()
        return out

    def remove(self, ipr: IPRoute) -> list[str]:
        """The entries all live on the tunnel device and go with it."""
        self.installed_on = None
        return []

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
