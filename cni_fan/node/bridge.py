"""The fan bridge: the pods' ports, the gateway address, the gateway's MAC."""
from __future__ import annotations

from pyroute2 import IPRoute

from cni_fan.net import links
from cni_fan.plan import NodePlan


class Bridge:
    role = "bridge"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute) -> list[str]:
        p = self.plan
        link = links.get_link(ipr, p.bridge)
        if link is None:
            return [f"bridge {p.bridge} is missing"]
        out = []
        if not link["flags"] & links.IFF_UP:
            out.append(f"bridge {p.bridge} is down")
        if link.get_attr("IFLA_ADDRESS") != p.bridge_mac:
            out.append(f"bridge {p.bridge} has MAC {link.get_attr('IFLA_ADDRESS')}, want {p.bridge_mac}")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=link["index"])}
        for gateway, prefixlen in p.bridge_gateways:
            if (gateway, prefixlen) not in have:
                out.append(f"bridge {p.bridge} lacks {gateway}/{prefixlen}")
        if link.get_attr("IFLA_MTU") != p.mtu:
            out.append(f"bridge {p.bridge} has MTU {link.get_attr('IFLA_MTU')}, want {p.mtu}")
        return out

    def ensure(self, ipr: IPRoute) -> None:
        p = self.plan
        link = links.get_link(ipr, p.bridge)
        if link is not None and link.get_attr("IFLA_MTU") != p.mtu:
            ipr.link("set", index=link["index"], mtu=p.mtu)
        if link is not None and self.problems(ipr):
            # ensure_bridge trusts a bridge that is up; make it check everything.
            ipr.link("set", index=link["index"], state="down", address=p.bridge_mac)
        links.ensure_bridge(ipr, p.bridge, p.bridge_gateways, p.mtu)

    def remove(self, ipr: IPRoute) -> list[str]:
        return [f"bridge {self.plan.bridge}"] if links.delete_link(ipr, self.plan.bridge) else []
