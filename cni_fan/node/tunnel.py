"""The tunnel device, one per node: VXLAN (default) or IPIP.

VXLAN: a plain device (not collect-metadata), no learning, the shared MAC,
no FDB entries: it only *receives*; the fan program sends. IPIP: a
collect-metadata device whose egress program sets the tunnel key per
packet (IPIP is layer 3, so no MAC games). This kernel has no ipip
module: the IPIP device is only checked at the netlink-message level here.
"""
from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net.links import get_link, kind_of
from cni_fan.node.plan import NodePlan

log = logging.getLogger("cni_fan.node")
IFF_UP = 0x1


def link_spec(plan: NodePlan) -> dict:
    """The RTM_NEWLINK arguments for this node's tunnel (pure)."""
    if plan.encap == "vxlan":
        return {"ifname": plan.tunnel, "kind": "vxlan", "vxlan_id": plan.vni, "vxlan_port": plan.vxlan_port,
                "vxlan_learning": 0, "vxlan_link": plan.underlay_ifindex, "vxlan_local": str(plan.host),
                "address": plan.tunnel_mac, "mtu": plan.mtu}
    return {"ifname": plan.tunnel, "kind": "ipip", "ipip_collect_metadata": True,
            "ipip_link": plan.underlay_ifindex, "mtu": plan.mtu}


def problems(ipr: IPRoute, plan: NodePlan) -> list[str]:
    link = get_link(ipr, plan.tunnel)
    if link is None:
        return [f"tunnel {plan.tunnel} is missing"]
    out = []
    if kind_of(link) != plan.encap:
        out.append(f"{plan.tunnel} is a {kind_of(link)} device, want {plan.encap}")
        return out
    if not link["flags"] & IFF_UP:
        out.append(f"tunnel {plan.tunnel} is down")
    if link.get_attr("IFLA_MTU") != plan.mtu:
        out.append(f"tunnel {plan.tunnel} has MTU {link.get_attr('IFLA_MTU')}, want {plan.mtu}")
    if plan.encap == "vxlan":
        if link.get_attr("IFLA_ADDRESS") != plan.tunnel_mac:
            out.append(f"tunnel {plan.tunnel} has MAC {link.get_attr('IFLA_ADDRESS')}, want {plan.tunnel_mac}")
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        if data.get_attr("IFLA_VXLAN_ID") != plan.vni or data.get_attr("IFLA_VXLAN_PORT") != plan.vxlan_port:
            out.append(f"tunnel {plan.tunnel} has VNI {data.get_attr('IFLA_VXLAN_ID')} port "
                       f"{data.get_attr('IFLA_VXLAN_PORT')}, want {plan.vni} port {plan.vxlan_port}")
    return out


def ensure(ipr: IPRoute, plan: NodePlan) -> int:
    found = problems(ipr, plan)
    if found and found != [f"tunnel {plan.tunnel} is down"]:
        if get_link(ipr, plan.tunnel) is not None:
            log.warning("re-creating %s: %s", plan.tunnel, "; ".join(found))
            remove(ipr, plan)
        try:
            ipr.link("add", **link_spec(plan))
            log.info("created tunnel %s (%s)", plan.tunnel, plan.encap)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
    link = get_link(ipr, plan.tunnel)
    ipr.link("set", index=link["index"], state="up")
    return link["index"]


def remove(ipr: IPRoute, plan: NodePlan) -> bool:
    try:
        ipr.link("del", ifname=plan.tunnel)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise
