"""The tunnel device, one per node: VXLAN (default) or IPIP.

VXLAN: a plain device (not collect-metadata), no learning, the shared MAC,
no FDB entries: it only *receives*; the fan program sends. IPIP: a
collect-metadata device whose egress program sets the tunnel key per
packet (IPIP is layer 3, so no MAC games). This kernel has no ipip
module: the IPIP device is only checked at the netlink-message level here.

The tunnel also carries the node's gateway as a /32 (the plan's
`tunnel_address`), and with `overlay6` the IPv6 gateway as a /128 too:
kube-proxy masquerades NodePort and host-network Service traffic as it
leaves through the tunnel, and MASQUERADE takes the outgoing device's
address. Without one the kernel picks the underlay address, which the
receiving node's reverse-path filter drops (its route back to an underlay
address is not the tunnel); an overlay source is routed back through the
tunnel on every node, so the peer accepts it and answers encapsulated.
IPv6 has no rp_filter, but the same holds: an overlay source is the one
the peer routes back through its tunnel (a link-local or underlay source
is not). IPv6 MASQUERADE picks by source address selection, which
prefers the outgoing device's addresses (and with `use_oif_addrs_only`
takes nothing else): the /128 makes that the gateway. It skips duplicate
address detection: a tentative address cannot be a source.

On an IPv6-only node (an IPv6 underlay) the VXLAN device's `local` is the
node's IPv6 underlay address, which makes it listen on UDP over IPv6, and
it takes zero UDP checksums both ways (`udp6zerocsumrx`: the program sends
them, docs/datapath.md "Outer IPv6"; `udp6zerocsumtx` for symmetry, the
device itself never sends). Its only address is the IPv6 gateway's /128.
"""
from __future__ import annotations

import errno
import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net.links import IFA_F_NODAD, enable_ipv6, get_link, kind_of
from cni_fan.plan import NodePlan, SlicePlan

log = logging.getLogger("cni_fan.node")
IFF_UP = 0x1


def link_spec(plan: NodePlan) -> dict:
    """The RTM_NEWLINK arguments for this node's tunnel (pure)."""
    if plan.encap == "vxlan":
        local = ({"vxlan_local6": str(plan.host), "vxlan_udp_zero_csum6_rx": 1, "vxlan_udp_zero_csum6_tx": 1}
                 if plan.ipv6_underlay else {"vxlan_local": str(plan.host)})
        return {"ifname": plan.tunnel, "kind": "vxlan", "vxlan_id": plan.vni, "vxlan_port": plan.vxlan_port,
                "vxlan_learning": 0, "vxlan_link": plan.underlay_ifindex, **local,
                "address": plan.tunnel_mac, "mtu": plan.mtu}
    return {"ifname": plan.tunnel, "kind": "ipip", "ipip_collect_metadata": True,
            "ipip_link": plan.underlay_ifindex, "mtu": plan.mtu}


def _has_address(ipr: IPRoute, index: int, slice_plan: SlicePlan) -> bool:
    address = slice_plan.tunnel_address
    family = socket.AF_INET if slice_plan.version == 4 else socket.AF_INET6
    return any(a.get_attr("IFA_ADDRESS") == str(address.ip) and a["prefixlen"] == address.prefixlen
               for a in ipr.get_addr(index=index, family=family))


def _add_address(ipr: IPRoute, index: int, slice_plan: SlicePlan) -> None:
    address = slice_plan.tunnel_address
    try:
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.prefixlen,
                 **({"flags": IFA_F_NODAD} if slice_plan.version == 6 else {}))
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _underlay6_problems(plan: NodePlan, data) -> list[str]:
    """Over an IPv6 underlay: bound to the node's IPv6 address, taking zero checksums."""
    if not plan.ipv6_underlay:
        return []
    out = []
    if data.get_attr("IFLA_VXLAN_LOCAL6") != str(plan.host):
        out.append(f"tunnel {plan.tunnel} has local {data.get_attr('IFLA_VXLAN_LOCAL6')}, want {plan.host}")
    if not data.get_attr("IFLA_VXLAN_UDP_ZERO_CSUM6_RX"):
        out.append(f"tunnel {plan.tunnel} refuses zero UDP checksums (udp6zerocsumrx is off)")
    return out


class Tunnel:
    role = "tunnel"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute) -> list[str]:
        plan = self.plan
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
            out += _underlay6_problems(plan, data)
        for slice_plan in plan.slices:
            if not _has_address(ipr, link["index"], slice_plan):
                out.append(f"tunnel {plan.tunnel} lacks {slice_plan.tunnel_address}")
        return out

    def ensure(self, ipr: IPRoute) -> None:
        plan = self.plan
        found = [p for p in self.problems(ipr) if p != f"tunnel {plan.tunnel} is down" and " lacks " not in p]
        if found:
            if get_link(ipr, plan.tunnel) is not None:
                log.warning("re-creating %s: %s", plan.tunnel, "; ".join(found))
                self.remove(ipr)
            try:
                ipr.link("add", **link_spec(plan))
                log.info("created tunnel %s (%s)", plan.tunnel, plan.encap)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        link = get_link(ipr, plan.tunnel)
        if plan.ipv6 is not None:
            enable_ipv6(plan.tunnel)
        for slice_plan in plan.slices:
            if not _has_address(ipr, link["index"], slice_plan):
                _add_address(ipr, link["index"], slice_plan)
        ipr.link("set", index=link["index"], state="up")

    def remove(self, ipr: IPRoute) -> list[str]:
        try:
            ipr.link("del", ifname=self.plan.tunnel)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return []
            raise
        return [f"tunnel {self.plan.tunnel}"]
