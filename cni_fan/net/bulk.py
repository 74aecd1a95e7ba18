"""Bulk rtnetlink: many route/neighbour/FDB messages, fast.

The `routes` fan mapping needs three kernel entries per possible peer
(65,533 peers on a /16 underlay), too many for pyroute2's per-message
encoding (docs/benchmarks.md). These fixed-layout messages are packed
with the raw codec (cni_fan.net.rtnl) and streamed with `Rtnl.send_all`,
without per-message acknowledgements; route dumps are read in place.
Route and neighbour messages take the family from the address length
(4 bytes IPv4, 16 bytes IPv6); dumps take it as an argument.
"""
from __future__ import annotations

import errno
import socket
import struct
from typing import Iterator

from cni_fan.net import rtnl
from cni_fan.net.rtnl import (AF_BRIDGE, AF_INET, NDA_DST, NDA_LLADDR, NDMSG, NLM_F_CREATE, NLM_F_REPLACE,
                              NLM_F_REQUEST, NTF_SELF, NUD_PERMANENT, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN,
                              RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_PREFSRC, RTA_PRIORITY, RTM_GETROUTE, RTM_NEWNEIGH,
                              RTM_NEWROUTE, RTMSG, RTN_UNICAST, RTNH_F_ONLINK, Rtnl, attr, message)

# Routes installed by us carry this protocol number, so they can be told
# from everyone else's (iproute2's rt_protos: unassigned).
RTPROT_CNI_FAN = 0xFA
BUFFER_BYTES = 1 << 22
_NEW = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
AF_INET6 = socket.AF_INET6


def _family(address: bytes) -> int:
    if len(address) not in (4, 16):
        raise ValueError(f"an address is 4 or 16 bytes, not {len(address)}")
    return AF_INET if len(address) == 4 else AF_INET6


def open_socket() -> Rtnl:
    """A socket with buffers for streaming, in the calling thread's namespace."""
    return Rtnl(buffer_bytes=BUFFER_BYTES)


def route_add(seq: int, dst: bytes, dst_len: int, gateway: bytes, oif: int, prefsrc: bytes, metric: int) -> bytes:
    """An on-link route. Give every route its own `metric`: the kernel hashes
    route metadata without the gateway, so routes alike but for it share
    one hash chain and installing n of them costs O(n^2) (IPv4; IPv6
    routes sit in a tree by prefix, and take one each all the same)."""
    body = RTMSG.pack(_family(dst), dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_CNI_FAN, RT_SCOPE_UNIVERSE,
                      RTN_UNICAST, RTNH_F_ONLINK)
    body += attr(RTA_DST, dst) + attr(RTA_GATEWAY, gateway) + attr(RTA_OIF, struct.pack("=I", oif))
    body += attr(RTA_PREFSRC, prefsrc) + attr(RTA_PRIORITY, struct.pack("=I", metric))
    return message(RTM_NEWROUTE, _NEW, seq, body)


def neigh_add(seq: int, ifindex: int, dst: bytes, lladdr: bytes) -> bytes:
    body = NDMSG.pack(_family(dst), ifindex, NUD_PERMANENT, 0, 0)
    body += attr(NDA_DST, dst) + attr(NDA_LLADDR, lladdr)
    return message(RTM_NEWNEIGH, _NEW, seq, body)


def fdb_add(seq: int, ifindex: int, lladdr: bytes, remote: bytes) -> bytes:
    """A VXLAN FDB entry: frames for `lladdr` go to underlay address `remote`."""
    body = NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
    body += attr(NDA_LLADDR, lladdr) + attr(NDA_DST, remote)
    return message(RTM_NEWNEIGH, _NEW, seq, body)


class BulkError(OSError):
    pass


def routes(sock: Rtnl, family: int = AF_INET) -> Iterator[tuple[bytes, int, int, int, bytes | None]]:
    """(dst, dst_len, type, protocol, oif) of every route of `family`, read in place from a raw dump
    (pyroute2 decodes each route into objects, too slow for the fallback's tables)."""
    default = bytes(4 if family == AF_INET else 16)
    try:
        for kind, data, start, end in sock.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            if kind != RTM_NEWROUTE:
                continue
            _family, dst_len, _src_len, _tos, _table, protocol, _scope, rtype, _flags = RTMSG.unpack_from(data, start)
            head = start + RTMSG.size
            yield (rtnl.find_attr(data, RTA_DST, head, end) or default, dst_len, rtype, protocol,
                   rtnl.find_attr(data, RTA_OIF, head, end))
    except OSError as exc:
        raise BulkError(exc.errno, exc.strerror) from None


def count_routes(sock: Rtnl, oif: int, protocol: int = RTPROT_CNI_FAN, family: int = AF_INET) -> int:
    """How many routes of `family` and `protocol` leave through `oif`."""
    want = struct.pack("=I", oif)
    return sum(1 for _d, _l, _t, proto, route_oif in routes(sock, family)
               if proto == protocol and route_oif == want)


def describe(errnos: list[int]) -> str:
    counts: dict[int, int] = {}
    for e in errnos:
        counts[e] = counts.get(e, 0) + 1
    return ", ".join(f"{n}× {errno.errorcode.get(e, e)}" for e, n in sorted(counts.items()))

