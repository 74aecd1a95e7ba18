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

from typing import NamedTuple

import netaddr

from cni_fan.net import rtnl_addrs, rtnl_links
from cni_fan.net.errors import UnderlayAmbiguous, UnderlayError, UnderlayMissing
from cni_fan.net.rtnl import AF_INET, AF_INET6, Rtnl

IFA_F_SECONDARY = 0x01  # IPv4; the same bit is IFA_F_TEMPORARY for IPv6
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_LINK = 253


class UnderlayAddress(NamedTuple):
    address: netaddr.IPAddress
    prefixlen: int
    interface: str
    index: int
    mtu: int


def find_underlay(sock: Rtnl, underlay: netaddr.IPNetwork, interface: str | None = None) -> UnderlayAddress:
    """This node's one address in `underlay` (IPv4 or IPv6), optionally only on `interface`.

    Raises UnderlayMissing when there is none (the message lists what was
    skipped and why) and UnderlayAmbiguous when several qualify.
    """
    only_index = None
    if interface is not None:
        link = _link(sock, name=interface)
        if link is None:
            raise UnderlayMissing(f"underlayInterface {interface!r} does not exist on this node", subject=interface)
        only_index = link.index
    family = AF_INET if underlay.version == 4 else AF_INET6
    candidates: list[tuple[netaddr.IPAddress, int, int]] = []
    skipped: list[str] = []
    try:
        found = list(rtnl_addrs.addresses(sock, family, only_index))
    except OSError as exc:
        raise UnderlayError("cannot list this node's addresses", str(exc), subject=str(underlay)) from None
    for msg in found:
        addr = netaddr.IPAddress(msg.address)
        if addr not in underlay:
            continue
        if underlay.version == 4:
            label = msg.label or f"ifindex {msg.index}"
            reason = _why_not_ipv4(msg.prefixlen, msg.flags, underlay)
        else:
            label = _name(sock, msg.index)
            reason = _why_not_ipv6(addr, msg.prefixlen, msg.scope, msg.flags, underlay)
        if reason:
            shown = f"{addr}/{msg.prefixlen}" if reason.startswith("a /") else str(addr)
            skipped.append(f"{shown} on {label} ({reason})")
            continue
        candidates.append((addr, msg.prefixlen, msg.index))
    where = f"on {interface}" if interface else "on this node"
    if not candidates:
        hint = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise UnderlayMissing(f"no address in the underlay network {underlay} {where}",
                              f"set \"underlayInterface\" or fix \"underlay\"{hint}", subject=str(underlay))
    if len(candidates) > 1:
        names = ", ".join(f"{a} on {_name(sock, i)}" for a, _, i in candidates)
        raise UnderlayAmbiguous(f"several addresses in the underlay network {underlay} {where}: {names}",
                                "set \"underlayInterface\" to choose one", subject=str(underlay))
    addr, prefixlen, index = candidates[0]
    link = _link(sock, index=index)
    if link is None:
        raise UnderlayMissing(f"the link of {addr} vanished while it was being read", subject=str(underlay))
    return UnderlayAddress(addr, prefixlen, link.name or f"ifindex {index}", index, link.mtu or 0)


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


def _link(sock: Rtnl, name: str | None = None, index: int = 0) -> rtnl_links.LinkInfo | None:
    try:
        return rtnl_links.get_link(sock, name, index)
    except OSError as exc:
        raise UnderlayError(f"cannot read link {name or index}", str(exc), subject=name or str(index)) from None


def _name(sock: Rtnl, index: int) -> str:
    link = _link(sock, index=index)
    return (link.name if link is not None else None) or f"ifindex {index}"
