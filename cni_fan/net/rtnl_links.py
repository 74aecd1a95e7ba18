"""Links, bridge ports and neighbour entries on the raw codec: requests and decoded answers.

The verbs' links (cni_fan/net/links.py: the bridge, the veths) and the port
guard (cni_fan/net/portguard.py) are made of these; a request is a
(type, flags, body) tuple for `Rtnl.batch`.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import NamedTuple

from cni_fan.net import rtnl
from cni_fan.net.rtnl import (AF_BRIDGE, AF_INET, AF_INET6, AF_UNSPEC, IFINFOMSG, NDA_DST, NDA_LLADDR, NDA_PROTOCOL,
                              NDMSG, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NTF_MASTER, NUD_NOARP,
                              NUD_PERMANENT, Reply, Request, Rtnl)


class LinkInfo(NamedTuple):
    index: int
    name: str | None
    master: int | None
    address: str | None
    alias: str | None
    flags: int = 0
    mtu: int | None = None
    kind: str | None = None   # IFLA_INFO_KIND: "bridge", "veth", "vxlan", ...
    info_data: dict[int, bytes] | None = None   # IFLA_INFO_DATA's attributes (the kind's own: IFLA_VXLAN_*)

    @property
    def up(self) -> bool:
        return bool(self.flags & rtnl.IFF_UP)


class NeighEntry(NamedTuple):
    ip: str
    mac: str | None
    state: int
    protocol: int | None


# -- links --------------------------------------------------------------------------------------

def getlink(name: str | None = None, index: int = 0) -> Request:
    """RTM_GETLINK of one link, by name or index (a dump would grow with the number of pods)."""
    body = IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
    if name is not None:
        body += rtnl.attr_str(rtnl.IFLA_IFNAME, name)
    return rtnl.RTM_GETLINK, 0, body


def link_info(body: bytes, start: int = 0, end: int | None = None) -> LinkInfo:
    """An RTM_NEWLINK message body, decoded."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(body, start)
    attrs = rtnl.parse_attrs(body, start + IFINFOMSG.size, end)
    info = rtnl.parse_attrs(attrs[rtnl.IFLA_LINKINFO]) if rtnl.IFLA_LINKINFO in attrs else {}
    data = info.get(rtnl.IFLA_INFO_DATA)
    return LinkInfo(index=index, name=rtnl.cstr(attrs.get(rtnl.IFLA_IFNAME)),
                    master=rtnl.u32(attrs.get(rtnl.IFLA_MASTER)), address=rtnl.mac_text(attrs.get(rtnl.IFLA_ADDRESS)),
                    alias=rtnl.cstr(attrs.get(rtnl.IFLA_IFALIAS)), flags=flags, mtu=rtnl.u32(attrs.get(rtnl.IFLA_MTU)),
                    kind=rtnl.cstr(info.get(rtnl.IFLA_INFO_KIND)),
                    info_data=rtnl.parse_attrs(data) if data is not None else None)


def get_link(sock: Rtnl, name: str | None = None, index: int = 0) -> LinkInfo | None:
    """The link called `name` (or with `index`), None if there is none; OSError for any other failure."""
    reply = sock.batch([getlink(name, index)])[0]
    if reply.errno in (errno.ENODEV, errno.ENOENT):
        return None
    if reply.errno:
        raise OSError(reply.errno, os.strerror(reply.errno), name or f"ifindex {index}")
    return link_info(reply.body)


def new_bridge(name: str, mtu: int, mac: str) -> Request:
    """RTM_NEWLINK of a bridge (`ip link add NAME type bridge`), EEXIST if the name is taken."""
    body = (IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, name)
            + rtnl.attr_u32(rtnl.IFLA_MTU, mtu) + rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac_bytes(mac))
            + rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "bridge")))
    return rtnl.RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def new_veth(name: str, peer: str, peer_netns_fd: int, mtu: int, master: int) -> Request:
    """RTM_NEWLINK of a veth pair: `name` on the bridge `master` here, `peer` made directly in the
    namespace `peer_netns_fd` (no setns: NET_ADMIN over that namespace suffices)."""
    peer_msg = (IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, peer)
                + rtnl.attr_u32(rtnl.IFLA_NET_NS_FD, peer_netns_fd) + rtnl.attr_u32(rtnl.IFLA_MTU, mtu))
    body = (IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, name)
            + rtnl.attr_u32(rtnl.IFLA_MTU, mtu) + rtnl.attr_u32(rtnl.IFLA_MASTER, master)
            + rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "veth"),
                          rtnl.nested(rtnl.IFLA_INFO_DATA, rtnl.attr(rtnl.VETH_INFO_PEER, peer_msg))))
    return rtnl.RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def set_link(index: int = 0, name: str | None = None, *, up: bool | None = None, mtu: int | None = None,
             mac: str | None = None, master: int | None = None,
             port_flags: tuple[tuple[int, int], ...] = ()) -> Request:
    """Change a link (by index, or by name with index 0; with both, `name` renames it): up or down,
    MTU, MAC, master (0: off its bridge), and on a bridge port IFLA_BRPORT_* u8 values
    ((kind, value), ...), in one request."""
    flags = change = 0
    if up is not None:
        flags, change = (rtnl.IFF_UP if up else 0), rtnl.IFF_UP
    body = IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change)
    if name is not None:
        body += rtnl.attr_str(rtnl.IFLA_IFNAME, name)
    if mtu is not None:
        body += rtnl.attr_u32(rtnl.IFLA_MTU, mtu)
    if mac is not None:
        body += rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac_bytes(mac))
    if master is not None:
        body += rtnl.attr_u32(rtnl.IFLA_MASTER, master)
    if port_flags:
        body += rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.nested(rtnl.IFLA_INFO_SLAVE_DATA,
                                                            *(rtnl.attr_u8(k, v) for k, v in port_flags)))
    return rtnl.RTM_NEWLINK, NLM_F_ACK, body


def del_link(name: str) -> Request:
    """RTM_DELLINK by name (a veth's peer goes with it)."""
    return rtnl.RTM_DELLINK, NLM_F_ACK, IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, name)


def port_links(sock: Rtnl, bridge_index: int) -> list[LinkInfo]:
    """Every link whose master is the bridge (one dump; for GC, repair and tests, not per call)."""
    body = IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + rtnl.attr_u32(rtnl.IFLA_EXT_MASK, rtnl.RTEXT_FILTER_SKIP_STATS)
    out = []
    for kind, data, start, end in sock.dump(rtnl.RTM_GETLINK, body):
        if kind == rtnl.RTM_NEWLINK:
            link = link_info(data, start, end)
            if link.master == bridge_index:
                out.append(link)
    return out


def port_setup(index: int, alias: str, port_flags: tuple[tuple[int, int], ...] = ()) -> Request:
    """Set a link's alias and, on a bridge port, IFLA_BRPORT_* u8 values ((kind, value), ...)."""
    body = IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFALIAS, alias)
    if port_flags:
        body += rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.nested(rtnl.IFLA_INFO_SLAVE_DATA,
                                                            *(rtnl.attr_u8(k, v) for k, v in port_flags)))
    return rtnl.RTM_NEWLINK, NLM_F_ACK, body


def port_flags(reply: Reply, kinds: tuple[int, ...]) -> dict[int, int]:
    """IFLA_BRPORT_* u8 values of `kinds` from a bridge port's RTM_NEWLINK (IFLA_LINKINFO / IFLA_INFO_SLAVE_DATA)."""
    attrs = rtnl.parse_attrs(reply.body, IFINFOMSG.size)
    info = rtnl.parse_attrs(attrs.get(rtnl.IFLA_LINKINFO, b""))
    data = rtnl.parse_attrs(info.get(rtnl.IFLA_INFO_SLAVE_DATA, b""))
    return {kind: data[kind][0] for kind in kinds if data.get(kind)}


def set_mac(index: int, mac: str) -> Request:
    return rtnl.RTM_NEWLINK, NLM_F_ACK, IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0) + rtnl.attr(rtnl.IFLA_ADDRESS,
                                                                                             rtnl.mac_bytes(mac))


# -- neighbours and the bridge's FDB -----------------------------------------------------------------

def static_fdb(port_index: int, mac: str) -> Request:
    """A static FDB entry for `mac` on a bridge port (`bridge fdb replace ... master static`)."""
    body = NDMSG.pack(AF_BRIDGE, port_index, NUD_NOARP, NTF_MASTER, 0) + rtnl.attr(NDA_LLADDR, rtnl.mac_bytes(mac))
    return rtnl.RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def get_fdb(port_index: int, mac: str) -> Request:
    """RTM_GETNEIGH (AF_BRIDGE) of one MAC in the FDB of the port's bridge (`bridge fdb get`)."""
    body = NDMSG.pack(AF_BRIDGE, port_index, 0, NTF_MASTER, 0) + rtnl.attr(NDA_LLADDR, rtnl.mac_bytes(mac))
    return rtnl.RTM_GETNEIGH, 0, body


def permanent_neigh(index: int, ip: str, mac: str, protocol: int | None = None) -> Request:
    family, dst = rtnl.ip_bytes(ip)
    body = (NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + rtnl.attr(NDA_DST, dst)
            + rtnl.attr(NDA_LLADDR, rtnl.mac_bytes(mac)))
    if protocol is not None:
        body += rtnl.attr_u8(NDA_PROTOCOL, protocol)
    return rtnl.RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def get_neigh(index: int, ip: str) -> Request:
    family, dst = rtnl.ip_bytes(ip)
    return rtnl.RTM_GETNEIGH, 0, NDMSG.pack(family, index, 0, 0, 0) + rtnl.attr(NDA_DST, dst)


def del_neigh(index: int, ip: str) -> Request:
    family, dst = rtnl.ip_bytes(ip)
    return rtnl.RTM_DELNEIGH, NLM_F_ACK, NDMSG.pack(family, index, 0, 0, 0) + rtnl.attr(NDA_DST, dst)


def neigh_entry(body: bytes, start: int = 0, end: int | None = None) -> NeighEntry:
    family, _index, state, _flags, _type = NDMSG.unpack_from(body, start)
    attrs = rtnl.parse_attrs(body, start + NDMSG.size, end)
    size = 16 if family == AF_INET6 else 4
    dst = attrs.get(NDA_DST, b"\0" * size)[:size]
    return NeighEntry(ip=socket.inet_ntop(AF_INET6 if size == 16 else AF_INET, dst),
                      mac=rtnl.mac_text(attrs.get(NDA_LLADDR)), state=state,
                      protocol=attrs[NDA_PROTOCOL][0] if NDA_PROTOCOL in attrs else None)


def bridge_neighbours(sock: Rtnl, bridge_index: int, family: int = AF_INET) -> list[NeighEntry]:
    """IPv4 (or `family`'s) neighbour entries on the bridge device (one dump, filtered in the kernel by device)."""
    out = []
    request = NDMSG.pack(family, 0, 0, 0, 0) + rtnl.attr_u32(rtnl.NDA_IFINDEX, bridge_index)
    for _kind, data, start, end in sock.dump(rtnl.RTM_GETNEIGH, request):
        got, index, _state, _flags, _type = NDMSG.unpack_from(data, start)
        if got != family or index != bridge_index:
            continue
        if rtnl.find_attr(data, NDA_DST, start + NDMSG.size, end) is None:
            continue
        out.append(neigh_entry(data, start, end))
    return out
