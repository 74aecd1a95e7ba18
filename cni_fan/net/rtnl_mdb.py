"""The fan bridge's multicast database and querier on the raw codec: requests and decoded answers.

The port guard gives each dual-stack pod's port a permanent MDB entry for
the solicited-node group of the pod's IPv6 address, so the bridge delivers
a neighbour solicitation to the one port that owns the address instead of
flooding it (docs/portguard.md says why the bridge's own ND suppression
cannot do this for pods). Snooping only forwards by MDB while a querier
exists, so the bridge is made its own querier (after a wait of one query
response interval, which is why that interval is set short first); and the bridge turns
snooping off altogether when its MDB reaches `mcast_hash_max` entries, so
each pod port gets a cap on the groups it may hold and the bridge a table
large enough for every port's cap.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from cni_fan.net import rtnl
from cni_fan.net.rtnl import AF_BRIDGE, AF_UNSPEC, IFINFOMSG, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, Reply, Request

RTM_NEWMDB, RTM_GETMDB = 84, 86
MDBA_MDB, MDBA_MDB_ENTRY, MDBA_MDB_ENTRY_INFO = 1, 1, 1
MDBA_SET_ENTRY = MDBA_GET_ENTRY = 1
MDB_PERMANENT = 1
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_BR_MCAST_SNOOPING, IFLA_BR_MCAST_QUERIER, IFLA_BR_MCAST_HASH_MAX = 23, 25, 27
IFLA_BR_MCAST_QUERY_RESPONSE_INTVL = 34
QUERY_RESPONSE_CENTISECONDS = 100  # 1 s; the kernel's default is 10 s
IFLA_BRPORT_MCAST_MAX_GROUPS = 42
BR_PORT_MSG = struct.Struct("=Bxxxi")           # family, ifindex (of the bridge)
BR_MDB_ENTRY = struct.Struct("=IBBH16s2s2x")    # ifindex, state, flags, vid, group, proto (big endian)


def solicited_node(ip6: str) -> str:
    """ff02::1:ffXX:XXXX, the group a neighbour solicitation for `ip6` is sent to (RFC 4291 2.7.1)."""
    low = ipaddress.IPv6Address(ip6).packed[13:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))


def _entry(port_index: int, group: str, state: int) -> bytes:
    return BR_MDB_ENTRY.pack(port_index, state, 0, 0, socket.inet_pton(socket.AF_INET6, group),
                             (0x86DD).to_bytes(2, "big"))


def permanent_group(bridge_index: int, port_index: int, group: str) -> Request:
    """`bridge mdb replace dev <bridge> port <port> grp <group> permanent` (replaces a learned entry)."""
    body = BR_PORT_MSG.pack(AF_BRIDGE, bridge_index) + rtnl.attr(MDBA_SET_ENTRY,
                                                                 _entry(port_index, group, MDB_PERMANENT))
    return RTM_NEWMDB, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def get_group(bridge_index: int, group: str) -> Request:
    """`bridge mdb get dev <bridge> grp <group>`: one group, whatever the number of ports."""
    body = BR_PORT_MSG.pack(AF_BRIDGE, bridge_index) + rtnl.attr(MDBA_GET_ENTRY, _entry(0, group, 0))
    return RTM_GETMDB, 0, body


def group_ports(reply: Reply) -> dict[int, int]:
    """{port ifindex: MDB state} of a `get_group` answer ({} for ENOENT)."""
    if reply.errno:
        return {}
    out: dict[int, int] = {}
    mdb = rtnl.parse_attrs(reply.body, BR_PORT_MSG.size).get(MDBA_MDB, b"")
    entry = rtnl.parse_attrs(mdb).get(MDBA_MDB_ENTRY, b"")
    at = 0
    while at + rtnl.RTA.size <= len(entry):   # MDBA_MDB_ENTRY_INFO repeats, one per port
        length, kind = rtnl.RTA.unpack_from(entry, at)
        if length < rtnl.RTA.size:
            break
        if kind & rtnl.NLA_TYPE_MASK == MDBA_MDB_ENTRY_INFO and length - rtnl.RTA.size >= BR_MDB_ENTRY.size:
            port, state, *_rest = BR_MDB_ENTRY.unpack_from(entry, at + rtnl.RTA.size)
            out[port] = state
        at += (length + 3) & ~3
    return out


def bridge_response_interval(bridge_index: int, centiseconds: int = QUERY_RESPONSE_CENTISECONDS) -> Request:
    """The bridge's query response interval (`mcast_query_response_interval`, in centiseconds).

    The bridge forwards by its MDB only one response interval after its
    querier is turned on; this must reach the kernel in a request before
    the querier's (within one request the querier is set first), so that
    a node's first pods resolve each other after 1 s, not 10. Pods then
    answer general queries within 1 s.
    """
    data = struct.pack("=Q", centiseconds)
    linkinfo = rtnl.attr_str(IFLA_INFO_KIND, "bridge") + rtnl.attr(
        IFLA_INFO_DATA | rtnl.NLA_F_NESTED, rtnl.attr(IFLA_BR_MCAST_QUERY_RESPONSE_INTVL, data))
    body = IFINFOMSG.pack(AF_UNSPEC, 0, bridge_index, 0, 0) + rtnl.attr(rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED,
                                                                       linkinfo)
    return rtnl.RTM_NEWLINK, NLM_F_ACK, body


def bridge_querier(bridge_index: int, hash_max: int) -> Request:
    """Snooping and the bridge's own querier on, room for `hash_max` MDB entries (`ip link set <bridge>
    type bridge mcast_snooping 1 mcast_querier 1 mcast_hash_max N`); the kernel does nothing for a
    setting that already holds."""
    data = (rtnl.attr_u8(IFLA_BR_MCAST_SNOOPING, 1) + rtnl.attr_u8(IFLA_BR_MCAST_QUERIER, 1)
            + rtnl.attr_u32(IFLA_BR_MCAST_HASH_MAX, hash_max))
    linkinfo = rtnl.attr_str(IFLA_INFO_KIND, "bridge") + rtnl.attr(IFLA_INFO_DATA | rtnl.NLA_F_NESTED, data)
    body = IFINFOMSG.pack(AF_UNSPEC, 0, bridge_index, 0, 0) + rtnl.attr(rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED,
                                                                       linkinfo)
    return rtnl.RTM_NEWLINK, NLM_F_ACK, body


def port_group_limit(port_index: int, limit: int) -> Request:
    """At most `limit` MDB entries on a bridge port (IFLA_BRPORT_MCAST_MAX_GROUPS, kernel 6.3+)."""
    slave = rtnl.attr(rtnl.IFLA_INFO_SLAVE_DATA | rtnl.NLA_F_NESTED,
                      rtnl.attr_u32(IFLA_BRPORT_MCAST_MAX_GROUPS, limit))
    body = IFINFOMSG.pack(AF_UNSPEC, 0, port_index, 0, 0) + rtnl.attr(rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED, slave)
    return rtnl.RTM_NEWLINK, NLM_F_ACK, body


def _linkinfo(reply: Reply, kind: int) -> dict[int, bytes]:
    attrs = rtnl.parse_attrs(reply.body, IFINFOMSG.size)
    return rtnl.parse_attrs(rtnl.parse_attrs(attrs.get(rtnl.IFLA_LINKINFO, b"")).get(kind, b""))


def querier_on(bridge_reply: Reply) -> bool:
    """Whether a bridge's RTM_NEWLINK says snooping and its own querier are on."""
    data = _linkinfo(bridge_reply, IFLA_INFO_DATA)
    return all(data.get(kind, b"\0")[:1] == b"\x01" for kind in (IFLA_BR_MCAST_SNOOPING, IFLA_BR_MCAST_QUERIER))


def hash_max(bridge_reply: Reply) -> int | None:
    """A bridge's `mcast_hash_max`, from its RTM_NEWLINK."""
    return rtnl.u32(_linkinfo(bridge_reply, IFLA_INFO_DATA).get(IFLA_BR_MCAST_HASH_MAX))


def port_max_groups(port_reply: Reply) -> int | None:
    """A bridge port's `mcast_max_groups` (0: no cap), from its RTM_NEWLINK; None from a kernel without it."""
    return rtnl.u32(_linkinfo(port_reply, rtnl.IFLA_INFO_SLAVE_DATA).get(IFLA_BRPORT_MCAST_MAX_GROUPS))
