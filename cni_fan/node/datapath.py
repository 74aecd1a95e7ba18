"""One node's datapath: set up, check, tear down. Every step idempotent.

What `up` makes (and `down` removes), one component each (`Component`):
the fan bridge with the gateway address; the tunnel device with the
gateway as a /32; the overlay route (in `bpf` mode through the tunnel via
an on-link next hop with a permanent neighbour entry, `src` = the
gateway; in `routes` mode an unreachable route under the peers' own);
the fan mapping (the program on the tunnel's egress, or every peer's
route, neighbour and FDB entry); the firewall (egress NAT, tunnel input
filter); the sysctls (their previous values are saved and restored by
`down`). Nothing in it depends on how many other nodes there are.
"""
from __future__ import annotations

import logging
from typing import Collection

from pyroute2 import IPRoute

from cni_fan import attach_lock
from cni_fan.config import FanConfig
from cni_fan.local_slice import find_plan
from cni_fan.net import links
from cni_fan.net.rtnl import Rtnl
from cni_fan.net.portguard_repair import repair as repair_port_guards
from cni_fan.node.bridge import Bridge
from cni_fan.node.component import Component
from cni_fan.node.fanmap_bpf import BpfFanmap
from cni_fan.node.fanmap_routes import RoutesFanmap
from cni_fan.node.firewall import NodeFirewall
from cni_fan.node.route import OverlayRoute, UnreachableRoute
from cni_fan.node.state import NodeState
from cni_fan.node.sysctl import Sysctls
from cni_fan.node.tunnel import Tunnel

log = logging.getLogger("cni_fan.node")


class NodeDatapath:
    def __init__(self, cfg: FanConfig, ipr: IPRoute | None = None) -> None:
        self.cfg = cfg
        self.ipr = ipr or IPRoute()
        with Rtnl() as sock:  # in this process's namespace, as `ipr`
            self.plan = find_plan(sock, cfg)
        self.state = NodeState.load(cfg.params.data_dir)
        bpf = self.plan.fanmap_mode == "bpf"
        self.fanmap: BpfFanmap | RoutesFanmap = BpfFanmap(self.plan) if bpf else RoutesFanmap(self.plan)
        self.firewall = NodeFirewall(self.plan, self.state)
        # In the order `up` makes them; `down` removes them in reverse.
        self.components: list[Component] = [
            Bridge(self.plan),
            Tunnel(self.plan),
            OverlayRoute(self.plan) if bpf else UnreachableRoute(self.plan),
            self.fanmap,
            self.firewall,
            Sysctls(self.plan, self.state),
        ]

    def problems(self) -> list[str]:
        """Everything that differs from the plan, in words for the log."""
        return [problem for component in self.components for problem in component.problems(self.ipr)]

    def up(self) -> list[str]:
        """Make the node match the plan; returns what was wrong before."""
        before = self.problems()
        for component in self.components:
            component.ensure(self.ipr)
        self.state.save()
        return before

    def is_up(self) -> bool:
        return not [p for p in self.problems() if not p.startswith("sysctl ")]

    def down(self, keep: Collection[str] = ()) -> list[str]:
        """Remove exactly what `up` made; returns what was removed.

        `keep`: roles of components to leave in place ("bridge": the bridge
        and the pods on it, for an `up` with a changed plan that uses the
        same bridge)."""
        removed = []
        for component in reversed(self.components):
            if component.role not in keep:
                removed += component.remove(self.ipr)
        self.state.forget()
        return removed

    def repair_guards(self) -> list[str]:
        """Put back what is missing of the pods' port guards (node side); returns what was.

        Under the attachment lock of the whole network, taken without
        waiting: while an ADD, DEL or GC holds it the sweep is skipped (it
        runs again soon) rather than judging a half-installed guard.
        """
        with Rtnl() as sock:
            bridge_index = links.link_index(sock, self.plan.bridge)
        if bridge_index is None:
            return []
        try:
            with attach_lock.locked(self.cfg.params.state_dir, None, wait=False):
                return repair_port_guards(self.cfg, bridge_index=bridge_index, gateway=str(self.plan.primary.gateway))
        except BlockingIOError:
            return []

    def close(self) -> None:
        self.fanmap.close()
        self.ipr.close()
