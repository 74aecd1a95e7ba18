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
import os
import socket
import struct
from typing import TYPE_CHECKING

from cni_fan.net import links, rtnl, rtnl_addrs, rtnl_links
from cni_fan.net.errors import LinkError
from cni_fan.net.links import enable_ipv6
from cni_fan.net.rtnl import IFA_F_NODAD, Rtnl
from cni_fan.net.rtnl_links import LinkInfo
from cni_fan.plan import NodePlan, SlicePlan

if TYPE_CHECKING:  # the node keeps pyroute2 for what it makes; STATUS, which reads, imports none of it
    from pyroute2 import IPRoute

log = logging.getLogger("cni_fan.node")

# IFLA_VXLAN_* of include/uapi/linux/if_link.h: what the checks read of the device.
IFLA_VXLAN_ID, IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6, IFLA_VXLAN_UDP_ZERO_CSUM6_RX = 1, 15, 17, 20


def find_tunnel_index(plan: NodePlan) -> int | None:
    """The tunnel device's index in this process's namespace (the agent's), None when it is missing."""
    with Rtnl() as sock:
        return links.link_index(sock, plan.tunnel)


def link_spec(plan: NodePlan) -> dict:
    """The RTM_NEWLINK arguments for this node's tunnel (pure; pyroute2 encodes the VXLAN attributes)."""
    if plan.encap == "vxlan":
        local = ({"vxlan_local6": str(plan.host), "vxlan_udp_zero_csum6_rx": 1, "vxlan_udp_zero_csum6_tx": 1}
                 if plan.ipv6_underlay else {"vxlan_local": str(plan.host)})
        return {"ifname": plan.tunnel, "kind": "vxlan", "vxlan_id": plan.vni, "vxlan_port": plan.vxlan_port,
                "vxlan_learning": 0, "vxlan_link": plan.underlay_ifindex, **local,
                "address": plan.tunnel_mac, "mtu": plan.mtu}
    return {"ifname": plan.tunnel, "kind": "ipip", "ipip_collect_metadata": True,
            "ipip_link": plan.underlay_ifindex, "mtu": plan.mtu}


def _has_address(sock: Rtnl, index: int, slice_plan: SlicePlan) -> bool:
    address = slice_plan.tunnel_address
    family = socket.AF_INET if slice_plan.version == 4 else socket.AF_INET6
    return any(a.address == str(address.ip) and a.prefixlen == address.prefixlen
               for a in rtnl_addrs.addresses(sock, family, index))


def _add_address(sock: Rtnl, index: int, slice_plan: SlicePlan) -> None:
    address = slice_plan.tunnel_address
    code = sock.batch([rtnl_addrs.new_addr(index, str(address.ip), address.prefixlen,
                                           IFA_F_NODAD if slice_plan.version == 6 else 0)])[0].errno
    if code and code != errno.EEXIST:
        raise LinkError(f"failed to add {address} to the tunnel", os.strerror(code), subject=str(index))


def _vxlan_problems(plan: NodePlan, link: LinkInfo) -> list[str]:
    """The VXLAN device's own settings: MAC, VNI and port, and over an IPv6 underlay its local
    address and zero UDP checksums."""
    out = []
    if link.address != plan.tunnel_mac:
        out.append(f"tunnel {plan.tunnel} has MAC {link.address}, want {plan.tunnel_mac}")
    data = link.info_data or {}
    vni = rtnl.u32(data.get(IFLA_VXLAN_ID))
    port = struct.unpack("!H", data[IFLA_VXLAN_PORT])[0] if len(data.get(IFLA_VXLAN_PORT, b"")) == 2 else None
    if vni != plan.vni or port != plan.vxlan_port:
        out.append(f"tunnel {plan.tunnel} has VNI {vni} port {port}, want {plan.vni} port {plan.vxlan_port}")
    if not plan.ipv6_underlay:
        return out
    local6 = data.get(IFLA_VXLAN_LOCAL6)
    local6_text = socket.inet_ntop(socket.AF_INET6, local6) if local6 is not None and len(local6) == 16 else None
    if local6_text != str(plan.host):
        out.append(f"tunnel {plan.tunnel} has local {local6_text}, want {plan.host}")
    if not data.get(IFLA_VXLAN_UDP_ZERO_CSUM6_RX, b"\0")[0]:
        out.append(f"tunnel {plan.tunnel} refuses zero UDP checksums (udp6zerocsumrx is off)")
    return out


class Tunnel:
    """Created through pyroute2 (its VXLAN and IPIP attributes); read, addressed, brought up and
    removed through the raw codec, as `fan`'s STATUS reads it."""
    role = "tunnel"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan

    def problems(self, ipr: IPRoute | None = None) -> list[str]:
        with Rtnl() as sock:
            return self._problems(sock)

    def _problems(self, sock: Rtnl) -> list[str]:
        plan = self.plan
        link = links.get_link(sock, plan.tunnel)
        if link is None:
            return [f"tunnel {plan.tunnel} is missing"]
        out = []
        if link.kind != plan.encap:
            out.append(f"{plan.tunnel} is a {link.kind} device, want {plan.encap}")
            return out
        if not link.up:
            out.append(f"tunnel {plan.tunnel} is down")
        if link.mtu != plan.mtu:
            out.append(f"tunnel {plan.tunnel} has MTU {link.mtu}, want {plan.mtu}")
        if plan.encap == "vxlan":
            out += _vxlan_problems(plan, link)
        for slice_plan in plan.slices:
            if not _has_address(sock, link.index, slice_plan):
                out.append(f"tunnel {plan.tunnel} lacks {slice_plan.tunnel_address}")
        return out

    def ensure(self, ipr: IPRoute) -> None:
        plan = self.plan
        with Rtnl() as sock:
            found = [p for p in self._problems(sock) if p != f"tunnel {plan.tunnel} is down" and " lacks " not in p]
            if found:
                if links.get_link(sock, plan.tunnel) is not None:
                    log.warning("re-creating %s: %s", plan.tunnel, "; ".join(found))
                    links.delete_link(sock, plan.tunnel)
                from pyroute2.netlink.exceptions import NetlinkError

                try:
                    ipr.link("add", **link_spec(plan))
                    log.info("created tunnel %s (%s)", plan.tunnel, plan.encap)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            link = links.get_link(sock, plan.tunnel)
            if link is None:
                raise LinkError(f"tunnel {plan.tunnel!r} disappeared while it was being set up", subject=plan.tunnel)
            if plan.ipv6 is not None:
                enable_ipv6(plan.tunnel)
            for slice_plan in plan.slices:
                if not _has_address(sock, link.index, slice_plan):
                    _add_address(sock, link.index, slice_plan)
            code = sock.batch([rtnl_links.set_link(link.index, up=True)])[0].errno
            if code:
                raise LinkError(f"cannot bring tunnel {plan.tunnel!r} up", os.strerror(code), subject=plan.tunnel)

    def remove(self, ipr: IPRoute) -> list[str]:
        with Rtnl() as sock:
            return [f"tunnel {self.plan.tunnel}"] if links.delete_link(sock, self.plan.tunnel) else []
