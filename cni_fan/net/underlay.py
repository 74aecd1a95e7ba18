"""Which address of this node is its underlay address.

The whole slice follows from it, so the choice must be unambiguous and
explained: an address that cannot be the node's identity is never chosen
automatically, and several that could are an error, never a guess.

Skipped in both families: a host route (/32, /128: VIPs, kube-vip,
keepalived) unless the underlay itself is that long. IPv4 also skips
secondary addresses. IPv6 also skips link-local addresses, and addresses
that are tentative (duplicate address detection still running: the
address does not work yet, so the caller gets "missing" and tries again
later; nothing here waits), failed DAD, deprecated (being retired) or
temporary (privacy addresses, which rotate).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.net.errors import UnderlayAmbiguous, UnderlayMissing

IFA_F_SECONDARY = 0x01  # IPv4; the same bit is IFA_F_TEMPORARY for IPv6
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class UnderlayAddress:
    address: netaddr.IPAddress
    prefixlen: int
    interface: str
    index: int
    mtu: int


def find_underlay(ipr: IPRoute, underlay: netaddr.IPNetwork, interface: str | None = None) -> UnderlayAddress:
    """This node's one address in `underlay` (IPv4 or IPv6), optionally only on `interface`.

    Raises UnderlayMissing when there is none (the message lists what was
    skipped and why) and UnderlayAmbiguous when several qualify.
    """
    only_index = None
    if interface is not None:
        try:
            only_index = ipr.link("get", ifname=interface)[0]["index"]
        except NetlinkError:
            raise UnderlayMissing(f"underlayInterface {interface!r} does not exist on this node",
                                  subject=interface) from None
    family = socket.AF_INET if underlay.version == 4 else socket.AF_INET6
    candidates: list[tuple[netaddr.IPAddress, int, int]] = []
    skipped: list[str] = []
    for msg in ipr.get_addr(family=family):
        if only_index is not None and msg["index"] != only_index:
            continue
        addr = netaddr.IPAddress(msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"))
        if addr not in underlay:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if underlay.version == 4:
            label = msg.get_attr("IFA_LABEL") or f"ifindex {msg['index']}"
            reason = _why_not_ipv4(msg["prefixlen"], flags, underlay)
        else:
            label = _name(ipr, msg["index"])
            reason = _why_not_ipv6(addr, msg["prefixlen"], msg["scope"], flags, underlay)
        if reason:
            shown = f"{addr}/{msg['prefixlen']}" if reason.startswith("a /") else str(addr)
            skipped.append(f"{shown} on {label} ({reason})")
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


def _why_not_ipv4(prefixlen: int, flags: int, underlay: netaddr.IPNetwork) -> str:
    """Why an IPv4 address in the underlay is not the node's; "" when it may be.

    A reason starting "a /" is about the prefix, which the message then shows.
    """
    if prefixlen == 32 and underlay.prefixlen != 32:
        return "a /32 looks like a VIP"
    if flags & IFA_F_SECONDARY:
        return "secondary"
    return ""


def _why_not_ipv6(addr: netaddr.IPAddress, prefixlen: int, scope: int, flags: int,
                  underlay: netaddr.IPNetwork) -> str:
    """Why an IPv6 address in the underlay is not the node's; "" when it may be."""
    if scope == RT_SCOPE_LINK or addr.is_link_local():
        return "link-local"
    if prefixlen == 128 and underlay.prefixlen != 128:
        return "a /128 looks like a VIP"
    if flags & IFA_F_DADFAILED:
        return "duplicate address detection failed: another host has it"
    if flags & IFA_F_TENTATIVE:
        return "tentative: duplicate address detection has not finished"
    if flags & IFA_F_DEPRECATED:
        return "deprecated"
    if flags & IFA_F_TEMPORARY:
        return "temporary"
    return ""


def _name(ipr: IPRoute, index: int) -> str:
    return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
