"""Which address of this node is its underlay address.

The whole slice follows from it, so the choice must be unambiguous and
explained: /32 addresses (VIPs, kube-vip, keepalived) and secondary
addresses are never chosen automatically.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net.errors import UnderlayAmbiguous, UnderlayMissing

IFA_F_SECONDARY = 0x01


@dataclass(frozen=True)
class UnderlayAddress:
    address: netaddr.IPAddress
    prefixlen: int
    interface: str
    index: int
    mtu: int


def find_underlay(ipr: IPRoute, underlay: netaddr.IPNetwork, interface: str | None = None) -> UnderlayAddress:
    only_index = None
    if interface is not None:
        try:
            only_index = ipr.link("get", ifname=interface)[0]["index"]
        except NetlinkError:
            raise UnderlayMissing(f"underlayInterface {interface!r} does not exist on this node",
                                  subject=interface) from None
    candidates: list[tuple[netaddr.IPAddress, int, int]] = []
    skipped: list[str] = []
    for msg in ipr.get_addr(family=socket.AF_INET):
        if only_index is not None and msg["index"] != only_index:
            continue
        addr = netaddr.IPAddress(msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"))
        if addr not in underlay:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        label = msg.get_attr("IFA_LABEL") or f"ifindex {msg['index']}"
        if msg["prefixlen"] == 32 and underlay.prefixlen != 32:
            skipped.append(f"{addr}/32 on {label} (a /32 looks like a VIP)")
            continue
        if flags & IFA_F_SECONDARY:
            skipped.append(f"{addr} on {label} (secondary)")
            continue
        candidates.append((addr, msg["prefixlen"], msg["index"]))
    where = f"on {interface}" if interface else "on this node"
    if not candidates:
        hint = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise UnderlayMissing(f"no address in the underlay network {underlay} {where}",
                              f"set \"underlayInterface\" or fix \"underlay\"{hint}", subject=str(underlay))
    if len(candidates) > 1:
        found = ", ".join(f"{a} on {_name(ipr, i)}" for a, _, i in candidates)
        raise UnderlayAmbiguous(f"several addresses in the underlay network {underlay} {where}: {found}",
                                "set \"underlayInterface\" to choose one", subject=str(underlay))
    addr, prefixlen, index = candidates[0]
    link = ipr.link("get", index=index)[0]
    return UnderlayAddress(addr, prefixlen, link.get_attr("IFLA_IFNAME"), index, link.get_attr("IFLA_MTU"))


def _name(ipr: IPRoute, index: int) -> str:
    return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
