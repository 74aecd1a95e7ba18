"""One node's datapath: set up, check, tear down. Every step idempotent.

What `up` makes (and `down` removes): the fan bridge with the gateway
address; the tunnel device; one route for the whole overlay through the
tunnel, via an on-link next hop whose permanent neighbour entry carries
the shared tunnel MAC, with `src` = the gateway; the fan program on the
tunnel's egress; the nftables table (egress NAT, tunnel input filter); the
sysctls (their previous values are saved and restored by `down`).
Nothing in it depends on how many other nodes there are.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan import attach_lock
from cni_fan.bpf.fanprog import Hook
from cni_fan.config import FanConfig
from cni_fan.local_slice import local_slice
from cni_fan.net import bulk, links, tc
from cni_fan.net.portguard_repair import repair as repair_port_guards
from cni_fan.net.rtnl import Rtnl
from cni_fan.node import firewall, sysctl, tunnel
from cni_fan.node.fanmap_bpf import BpfFanmap
from cni_fan.node.fanmap_routes import RoutesFanmap
from cni_fan.node.plan import NodePlan, make_plan

log = logging.getLogger("cni_fan.node")
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254
RTN_UNREACHABLE = 7


def plan_for(ipr: IPRoute, cfg: FanConfig) -> NodePlan:
    local = local_slice(ipr, cfg.params)
    u = local.underlay
    return make_plan(cfg, u.address, u.interface, u.index, u.mtu)


def route_problems(ipr: IPRoute, p: NodePlan, tunnel_index: int | None) -> list[str]:
    """The overlay route and its permanent next-hop neighbour."""
    out = []
    routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN)
              if r.get_attr("RTA_DST") == str(p.overlay.network) and r["dst_len"] == p.overlay.prefixlen]
    next_hop = str(p.next_hop) if p.encap == "vxlan" else None  # IPIP is layer 3: no next hop
    if not routes:
        out.append(f"route to {p.overlay_route} is missing")
    elif not any(r.get_attr("RTA_OIF") == tunnel_index and r.get_attr("RTA_GATEWAY") == next_hop
                 and r.get_attr("RTA_PREFSRC") == str(p.gateway) for r in routes):
        out.append(f"route to {p.overlay_route} does not go via {next_hop or 'link'} on {p.tunnel} src {p.gateway}")
    if tunnel_index is not None and next_hop is not None:
        neigh = [n for n in ipr.get_neighbours(ifindex=tunnel_index, family=socket.AF_INET)
                 if n.get_attr("NDA_DST") == str(p.next_hop)]
        if not neigh or neigh[0].get_attr("NDA_LLADDR") != p.tunnel_mac or not neigh[0]["state"] & NUD_PERMANENT:
            out.append(f"permanent neighbour {p.next_hop} -> {p.tunnel_mac} on {p.tunnel} is missing")
    return out


def readiness_problems(ipr: IPRoute, cfg: FanConfig) -> list[str]:
    """Cheap check for the plugin's STATUS: is the tunnel carrying the Fan?"""
    plan = plan_for(ipr, cfg)
    out = tunnel.problems(ipr, plan)
    tunnel_index = links.link_index(ipr, plan.tunnel)
    if plan.fanmap_mode == "routes":
        return out + RoutesFanmap(cfg.fanmap).problems(ipr, plan, tunnel_index, force=True)
    out += route_problems(ipr, plan, tunnel_index)
    if tunnel_index is None:
        return out
    with Rtnl() as sock:
        attached = tc.find(sock, tunnel_index, Hook.EGRESS)
    if attached is None:
        out.append(f"fan program is not attached to {plan.tunnel} egress")
    return out


@dataclass
class NodeState:
    """What must survive the agent: the sysctl values `up` replaced, and
    which firewall rules it applied (their source and the firewall's own
    listing of them, so a later `up` can tell they are still in place)."""
    path: Path
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    firewall: str = ""
    firewall_rules: str = ""
    firewall_listing: str = ""

    @classmethod
    def load(cls, data_dir: str) -> "NodeState":
        path = Path(data_dir) / "node-state.json"
        try:
            raw = json.loads(path.read_text())
            return cls(path, dict(raw.get("saved_sysctls", {})), str(raw.get("firewall", "")),
                       str(raw.get("firewall_rules", "")), str(raw.get("firewall_listing", "")))
        except (OSError, ValueError):
            return cls(path)

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"saved_sysctls": self.saved_sysctls, "firewall": self.firewall,
                                   "firewall_rules": self.firewall_rules,
                                   "firewall_listing": self.firewall_listing}, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def forget(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class NodeDatapath:
    def __init__(self, cfg: FanConfig, ipr: IPRoute | None = None) -> None:
        self.cfg = cfg
        self.ipr = ipr or IPRoute()
        self.plan = plan_for(self.ipr, cfg)
        self.fanmap = BpfFanmap() if self.plan.fanmap_mode == "bpf" else RoutesFanmap(cfg.fanmap)
        self.state = NodeState.load(cfg.params.data_dir)
        self.firewall = firewall.detect(previous=self.state.firewall)
        self._applied_rules: str | None = None

    # -- pieces ---------------------------------------------------------------
    def _ensure_route(self, tunnel_index: int) -> None:
        p = self.plan
        if p.encap == "ipip":
            self.ipr.route("replace", dst=str(p.overlay.network), dst_len=p.overlay.prefixlen, oif=tunnel_index,
                           prefsrc=str(p.gateway), scope=253, table=RT_TABLE_MAIN)  # scope link
            return
        self.ipr.neigh("replace", dst=str(p.next_hop), lladdr=p.tunnel_mac, ifindex=tunnel_index,
                       state=NUD_PERMANENT)
        self.ipr.route("replace", dst=str(p.overlay.network), dst_len=p.overlay.prefixlen, gateway=str(p.next_hop),
                       oif=tunnel_index, flags=RTNH_F_ONLINK, prefsrc=str(p.gateway), table=RT_TABLE_MAIN)

    def _unreachable_problems(self) -> list[str]:
        """routes mode: overlay addresses no node owns must not leak out the default route."""
        p = self.plan
        dst = socket.inet_aton(str(p.overlay.network))
        sock = bulk.open_socket()
        try:
            found = any(d == dst and length == p.overlay.prefixlen and rtype == RTN_UNREACHABLE
                        for d, length, rtype, _proto, _oif in bulk.routes(sock))
        finally:
            sock.close()
        return [] if found else [f"unreachable route for {p.overlay_route} is missing"]

    def _ensure_unreachable(self) -> None:
        p = self.plan
        self.ipr.route("replace", dst=str(p.overlay.network), dst_len=p.overlay.prefixlen, type=RTN_UNREACHABLE,
                       table=RT_TABLE_MAIN)

    def _bridge_problems(self) -> list[str]:
        p = self.plan
        link = links.get_link(self.ipr, p.bridge)
        if link is None:
            return [f"bridge {p.bridge} is missing"]
        out = []
        if not link["flags"] & links.IFF_UP:
            out.append(f"bridge {p.bridge} is down")
        if link.get_attr("IFLA_ADDRESS") != links.gateway_mac(str(p.gateway)):
            out.append(f"bridge {p.bridge} has MAC {link.get_attr('IFLA_ADDRESS')}, "
                       f"want {links.gateway_mac(str(p.gateway))}")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in self.ipr.get_addr(index=link["index"])}
        if (str(p.gateway), p.slice.prefixlen) not in have:
            out.append(f"bridge {p.bridge} lacks {p.gateway}/{p.slice.prefixlen}")
        if link.get_attr("IFLA_MTU") != p.mtu:
            out.append(f"bridge {p.bridge} has MTU {link.get_attr('IFLA_MTU')}, want {p.mtu}")
        return out

    def _ensure_bridge(self) -> None:
        p = self.plan
        link = links.get_link(self.ipr, p.bridge)
        if link is not None and link.get_attr("IFLA_MTU") != p.mtu:
            self.ipr.link("set", index=link["index"], mtu=p.mtu)
        if link is not None and self._bridge_problems():
            # ensure_bridge trusts a bridge that is up; make it check everything.
            self.ipr.link("set", index=link["index"], state="down",
                          address=links.gateway_mac(str(p.gateway)))
        links.ensure_bridge(self.ipr, p.bridge, str(p.gateway), p.slice.prefixlen, p.mtu)

    def _sysctls(self) -> dict[str, str]:
        return sysctl.wanted(self.plan.bridge, self.plan.tunnel)

    # -- verbs ----------------------------------------------------------------
    def problems(self) -> list[str]:
        """Everything that differs from the plan, in words for the log."""
        out = self._bridge_problems()
        out += tunnel.problems(self.ipr, self.plan)
        tunnel_index = links.link_index(self.ipr, self.plan.tunnel)
        if self.plan.fanmap_mode == "bpf":
            out += route_problems(self.ipr, self.plan, tunnel_index)
        else:
            out += self._unreachable_problems()
        out += self.fanmap.problems(self.ipr, self.plan, tunnel_index)
        current = self.firewall.current()
        if current is None:
            out.append(f"{self.firewall.name} rules are missing")
        elif self._applied_rules is not None and current != self._applied_rules:
            out.append(f"{self.firewall.name} rules were changed")
        out += sysctl.differences(self._sysctls())
        return out

    def up(self) -> list[str]:
        """Make the node match the plan; returns what was wrong before."""
        before = self.problems()
        failed = sysctl.apply({"net.ipv4.ip_forward": "1"}, self.state.saved_sysctls)
        self._ensure_bridge()
        tunnel_index = tunnel.ensure(self.ipr, self.plan)
        if self.plan.fanmap_mode == "bpf":
            self._ensure_route(tunnel_index)
        else:
            self._ensure_unreachable()
        self.fanmap.ensure(self.ipr, self.plan, tunnel_index)
        rules = firewall.FirewallRules.from_plan(self.plan)
        current = self.firewall.current()
        if (self._applied_rules is None and current is not None and self.state.firewall_rules == repr(rules)
                and current == self.state.firewall_listing):
            # An earlier `up` applied exactly these rules and nobody changed
            # them: keep them (re-applying would only reset their counters).
            self._applied_rules = current
        if self._applied_rules is None or current != self._applied_rules:
            self.firewall.apply(rules)
            self._applied_rules = self.firewall.current()
        self.state.firewall_rules, self.state.firewall_listing = repr(rules), self._applied_rules or ""
        failed += sysctl.apply(self._sysctls(), self.state.saved_sysctls)
        for key in failed:
            log.warning("could not set %s (is br_netfilter loaded on the host?)", key)
        self.state.firewall = self.firewall.name
        self.state.save()
        return before

    def repair_guards(self) -> list[str]:
        """Put back what is missing of the pods' port guards (node side); returns what was.

        Under the attachment lock of the whole network, taken without
        waiting: while an ADD, DEL or GC holds it the sweep is skipped (it
        runs again soon) rather than judging a half-installed guard.
        """
        bridge_index = links.link_index(self.ipr, self.plan.bridge)
        if bridge_index is None:
            return []
        try:
            with attach_lock.locked(self.cfg.params.state_dir, None, wait=False):
                return repair_port_guards(self.cfg, bridge_index=bridge_index, gateway=str(self.plan.gateway))
        except BlockingIOError:
            return []

    def is_up(self) -> bool:
        return not [p for p in self.problems() if not p.startswith("sysctl ")]

    def down(self, keep_bridge: bool = False) -> list[str]:
        """Remove exactly what `up` made; returns what was removed.
        `keep_bridge`: leave the bridge (and the pods on it) in place, for
        an `up` with a changed plan that uses the same bridge."""
        p = self.plan
        removed = []
        tunnel_index = links.link_index(self.ipr, p.tunnel)
        if self.fanmap.remove(self.ipr, tunnel_index):
            removed.append("fan program")
        try:
            self.ipr.route("del", dst=str(p.overlay.network), dst_len=p.overlay.prefixlen, table=RT_TABLE_MAIN)
            removed.append(f"route {p.overlay_route}")
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise
        if tunnel.remove(self.ipr, p):
            removed.append(f"tunnel {p.tunnel}")
        if not keep_bridge and links.delete_link(self.ipr, p.bridge):
            removed.append(f"bridge {p.bridge}")
        if self.firewall.remove():
            removed.append(f"{self.firewall.name} rules")
        sysctl.restore(self.state.saved_sysctls)
        if self.state.saved_sysctls:
            removed.append("sysctls restored: " + ", ".join(sorted(self.state.saved_sysctls)))
        self.state.forget()
        return removed

    def close(self) -> None:
        self.fanmap.close()
        self.ipr.close()
