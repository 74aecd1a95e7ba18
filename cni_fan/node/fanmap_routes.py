"""The `routes` fan mapping, for nodes where eBPF cannot be used.

Deterministic state for every possible peer in the underlay, computed
from the Fan map alone (no database, no discovery): for each peer host
h, a route to h's slice via h's gateway (on-link, src = our gateway), a
permanent neighbour entry giving h's gateway the MAC `peer_mac(h)`, and a
VXLAN FDB entry sending that MAC to h's underlay address. Each node's
tunnel carries its own `peer_mac`, so the receiver accepts the frame
(and the VXLAN loop check, which drops frames from its own MAC, does not
fire). Cost: three kernel entries per peer (196,599 on a /16 underlay);
they are streamed with `cni_fan.net.bulk`.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Iterator

from pyroute2 import IPRoute

from cni_fan.net import bulk
from cni_fan.node.plan import NodePlan

log = logging.getLogger("cni_fan.node")
FULL_CHECK_EVERY = 30.0
# Distinct metrics keep route installation linear (see bulk.route_add).
METRIC_BASE = 1000


def _host_range(plan: NodePlan) -> tuple[int, int]:
    net = plan.underlay
    return (net.first + 1, net.last - 1) if net.prefixlen <= 30 else (net.first, net.last)


def expected_entries(plan: NodePlan) -> int:
    first, last = _host_range(plan)
    return last - first  # every host but this one


def messages(plan: NodePlan, tunnel_index: int, start_seq: int = 100) -> Iterator[bytes]:
    """Neighbour, FDB and route messages for every peer, in integer math
    (netaddr objects cost tens of microseconds each; there are 65,533 peers)."""
    src = socket.inet_aton(str(plan.gateway))
    container_bits = 32 - plan.slice.prefixlen
    overlay_base = int(plan.overlay.network)
    underlay_base = int(plan.underlay.network)
    own = int(plan.host)
    first, last = _host_range(plan)
    seq = start_seq
    for index, host in enumerate(range(first, last + 1)):
        if host == own:
            continue
        slice_base = overlay_base | ((host - underlay_base) << container_bits)
        gw = (slice_base + 1).to_bytes(4, "big")  # FanMap.gateway_for: the first usable address
        host_bytes = host.to_bytes(4, "big")
        mac = b"\x02\xfb" + host_bytes
        yield bulk.neigh_add(seq, tunnel_index, gw, mac)
        yield bulk.fdb_add(seq + 1, tunnel_index, mac, host_bytes)
        yield bulk.route_add(seq + 2, slice_base.to_bytes(4, "big"), plan.slice.prefixlen, gw, tunnel_index, src,
                             metric=METRIC_BASE + index)
        seq += 3


class RoutesFanmap:
    def __init__(self, fanmap) -> None:
        self.fanmap = fanmap
        self.last_full_check = 0.0
        self.installed_on: int | None = None

    def ensure(self, ipr: IPRoute, plan: NodePlan, tunnel_index: int) -> bool:
        if not self.problems(ipr, plan, tunnel_index, force=self.installed_on != tunnel_index):
            return False
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
        log.info("installed %d peers' routes, neighbours and FDB entries in %.1fs",
                 expected_entries(plan), time.monotonic() - started)
        return True

    def problems(self, ipr: IPRoute, plan: NodePlan, tunnel_index: int | None, force: bool = False) -> list[str]:
        if tunnel_index is None:
            return ["fan routes: no tunnel"]
        if not force and time.monotonic() - self.last_full_check < FULL_CHECK_EVERY:
            return []
        sock = bulk.open_socket()
        try:
            have = bulk.count_routes(sock, tunnel_index)
        finally:
            sock.close()
        self.last_full_check = time.monotonic()
        want = expected_entries(plan)
        return [] if have >= want else [f"fan routes: {have} of {want} peer routes on {plan.tunnel}"]

    def remove(self, ipr: IPRoute, tunnel_index: int | None) -> bool:
        """The entries all live on the tunnel device and go with it."""
        self.installed_on = None
        return False

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
