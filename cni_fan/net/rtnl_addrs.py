"""Addresses and routes on the raw codec: requests and decoded answers.

What a CNI call does with them (the bridge's gateways, the pod's address
and routes, the underlay lookup) is small and per call, where importing
pyroute2 would cost more than the call itself (docs/architecture.md, "The
per-call path"). Text addresses in, text addresses out (`socket.inet_pton`,
`inet_ntop`): the Fan arithmetic stays in cni_fan/fanmap.py.
"""
from __future__ import annotations

import socket
from typing import Iterator, NamedTuple

from cni_fan.net import rtnl
from cni_fan.net.rtnl import (AF_INET, AF_INET6, IFA_ADDRESS, IFA_FLAGS, IFA_LABEL, IFA_LOCAL, IFADDRMSG, NLM_F_ACK,
                              NLM_F_CREATE, NLM_F_EXCL, RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_PREFSRC, RTA_PRIORITY,
                              RTA_TABLE, RTMSG, Request, Rtnl)


class AddrInfo(NamedTuple):
    family: int
    address: str
    prefixlen: int
    flags: int      # IFA_FLAGS when the kernel sends it (it has every bit), else the header's 8 bits
    scope: int
    index: int
    label: str | None


class RouteInfo(NamedTuple):
    family: int
    dst: str        # "0.0.0.0" or "::" for a default route
    dst_len: int
    gateway: str | None
    prefsrc: str | None
    oif: int | None
    table: int
    type: int
    tos: int
    priority: int


def _text(family: int, raw: bytes | None) -> str | None:
    return socket.inet_ntop(family, raw) if raw is not None else None


# -- addresses ------------------------------------------------------------------------------------

def new_addr(index: int, address: str, prefixlen: int, flags: int = 0) -> Request:
    """RTM_NEWADDR (`ip addr add`), EEXIST if the link has it; `flags` e.g. IFA_F_NODAD."""
    family, raw = rtnl.ip_bytes(address)
    body = IFADDRMSG.pack(family, prefixlen, flags & 0xFF, 0, index) + rtnl.attr(IFA_ADDRESS, raw)
    if family == AF_INET:
        body += rtnl.attr(IFA_LOCAL, raw)
    return rtnl.RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def addresses(sock: Rtnl, family: int = 0, index: int | None = None) -> Iterator[AddrInfo]:
    """The addresses of one family (0: both), optionally of one link only (one dump, filtered here).
    Read it to its end before the next request on `sock`."""
    for kind, data, start, end in sock.dump(rtnl.RTM_GETADDR, IFADDRMSG.pack(family, 0, 0, 0, 0)):
        if kind != rtnl.RTM_NEWADDR:
            continue
        got, prefixlen, flags, scope, got_index = IFADDRMSG.unpack_from(data, start)
        if index is not None and got_index != index:
            continue
        attrs = rtnl.parse_attrs(data, start + IFADDRMSG.size, end)
        raw = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
        if raw is None:
            continue
        yield AddrInfo(family=got, address=socket.inet_ntop(got, raw), prefixlen=prefixlen,
                       flags=rtnl.u32(attrs.get(IFA_FLAGS)) or flags, scope=scope, index=got_index,
                       label=rtnl.cstr(attrs.get(IFA_LABEL)))


# -- routes ---------------------------------------------------------------------------------------

def new_route(dst: str, dst_len: int, oif: int, gateway: str | None = None) -> Request:
    """RTM_NEWROUTE in the main table (`ip route add DST/LEN [via GW] dev OIF`), EEXIST if taken."""
    family, raw_dst = rtnl.ip_bytes(dst)
    scope = rtnl.RT_SCOPE_UNIVERSE if gateway else rtnl.RT_SCOPE_LINK
    body = (RTMSG.pack(family, dst_len, 0, 0, rtnl.RT_TABLE_MAIN, rtnl.RTPROT_BOOT, scope, rtnl.RTN_UNICAST, 0)
            + rtnl.attr_u32(RTA_OIF, oif))
    if dst_len:
        body += rtnl.attr(RTA_DST, raw_dst)
    if gateway:
        body += rtnl.attr(RTA_GATEWAY, rtnl.ip_bytes(gateway)[1])
    return rtnl.RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def routes(sock: Rtnl, family: int) -> Iterator[RouteInfo]:
    """The routes of one family, every table (one dump; callers filter). Read it to its end before
    the next request on `sock`: the socket answers one thing at a time."""
    for kind, data, start, end in sock.dump(rtnl.RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        if kind == rtnl.RTM_NEWROUTE:
            yield route_info(data, start, end)


def route_info(data: bytes, start: int = 0, end: int | None = None) -> RouteInfo:
    """An RTM_NEWROUTE message body, decoded."""
    family, dst_len, _src_len, tos, table, _proto, _scope, rtype, _flags = RTMSG.unpack_from(data, start)
    attrs = rtnl.parse_attrs(data, start + RTMSG.size, end)
    any_address = "::" if family == AF_INET6 else "0.0.0.0"
    return RouteInfo(family=family, dst=_text(family, attrs.get(RTA_DST)) or any_address, dst_len=dst_len,
                     gateway=_text(family, attrs.get(RTA_GATEWAY)),
                     prefsrc=_text(family, attrs.get(RTA_PREFSRC)), oif=rtnl.u32(attrs.get(RTA_OIF)),
                     table=rtnl.u32(attrs.get(RTA_TABLE)) or table, type=rtype, tos=tos,
                     priority=rtnl.u32(attrs.get(RTA_PRIORITY)) or 0)
