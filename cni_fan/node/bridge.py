"""The fan bridge: the pods' ports, the gateway address, the gateway's MAC.

On the raw codec, as `fan` makes it (cni_fan/net/links.py: one
implementation); the socket is opened here, in the agent's namespace,
where `ipr` lives too.
"""
from __future__ import annotations

import os

from pyroute2 import IPRoute

from cni_fan.net import links, rtnl_addrs, rtnl_links
from cni_fan.net.errors import LinkError
from cni_fan.net.rtnl import Rtnl
from cni_fan.plan import NodePlan


class Bridge:
    role = "bridge"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute) -> list[str]:
        with Rtnl() as sock:
            return self._problems(sock)

    def _problems(self, sock: Rtnl) -> list[str]:
        p = self.plan
        link = links.get_link(sock, p.bridge)
        if link is None:
            return [f"bridge {p.bridge} is missing"]
        out = []
        if not link.up:
            out.append(f"bridge {p.bridge} is down")
        if link.address != p.bridge_mac:
            out.append(f"bridge {p.bridge} has MAC {link.address}, want {p.bridge_mac}")
        have = {(a.address, a.prefixlen) for a in rtnl_addrs.addresses(sock, index=link.index)}
        for gateway, prefixlen in p.bridge_gateways:
            if (gateway, prefixlen) not in have:
                out.append(f"bridge {p.bridge} lacks {gateway}/{prefixlen}")
        if link.mtu != p.mtu:
            out.append(f"bridge {p.bridge} has MTU {link.mtu}, want {p.mtu}")
        return out

    def ensure(self, ipr: IPRoute) -> None:
        p = self.plan
        with Rtnl() as sock:
            link = links.get_link(sock, p.bridge)
            if link is not None and link.mtu != p.mtu:
                self._set(sock, rtnl_links.set_link(link.index, mtu=p.mtu), "set the MTU of")
            if link is not None and self._problems(sock):
                # ensure_bridge trusts a bridge that is up; make it check everything.
                self._set(sock, rtnl_links.set_link(link.index, up=False, mac=p.bridge_mac), "reset")
            links.ensure_bridge(sock, p.bridge, p.bridge_gateways, p.mtu)

    def _set(self, sock: Rtnl, request, what: str) -> None:
        code = sock.batch([request])[0].errno
        if code:
            raise LinkError(f"cannot {what} bridge {self.plan.bridge!r}", os.strerror(code), subject=self.plan.bridge)

    def remove(self, ipr: IPRoute) -> list[str]:
        with Rtnl() as sock:
            return [f"bridge {self.plan.bridge}"] if links.delete_link(sock, self.plan.bridge) else []
