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

from cni_fan.cni.errors import CniError, INVALID_CONFIG, TRY_AGAIN_LATER

IFA_F_SECONDARY = 0x01


@dataclass(frozen=True)
class UnderlayAddress:
    address: netaddr.IPAddress
    prefixlen: int
    interface: str
    index: int
    mtu: int


def find_underlay(ipr: IPRoute, underlay: netaddr.IPNetwork, interface: str | None = None) -> UnderlayAddress:
    links = {link["index"]: link for link in ipr.get_links()}
    names = {idx: link.get_attr("IFLA_IFNAME") for idx, link in links.items()}
    if interface is not None and interface not in names.values():
        raise CniError(TRY_AGAIN_LATER, f"underlayInterface {interface!r} does not exist on this node")
    candidates: list[UnderlayAddress] = []
    skipped: list[str] = []
    for msg in ipr.get_addr(family=socket.AF_INET):
        name = names.get(msg["index"], "?")
        if interface is not None and name != interface:
            continue
        addr = netaddr.IPAddress(msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"))
        if addr not in underlay:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if msg["prefixlen"] == 32 and underlay.prefixlen != 32:
            skipped.append(f"{addr}/32 on {name} (a /32 looks like a VIP)")
            continue
        if flags & IFA_F_SECONDARY:
            skipped.append(f"{addr} on {name} (secondary)")
            continue
        candidates.append(UnderlayAddress(addr, msg["prefixlen"], name, msg["index"],
                                          links[msg["index"]].get_attr("IFLA_MTU")))
    where = f"on {interface}" if interface else "on this node"
    if not candidates:
        hint = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise CniError(TRY_AGAIN_LATER, f"no address in the underlay network {underlay} {where}",
                       f"set \"underlayInterface\" or fix \"underlay\"{hint}")
    if len(candidates) > 1:
        found = ", ".join(f"{c.address} on {c.interface}" for c in candidates)
        raise CniError(INVALID_CONFIG, f"several addresses in the underlay network {underlay} {where}: {found}",
                       "set \"underlayInterface\" to choose one")
    return candidates[0]
