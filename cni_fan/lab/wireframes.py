"""What a node sent on its underlay: an overlay packet as it is (direct) or
inside VXLAN or IPIP (encapsulated). Pure: bytes in, a verdict out.

`lab check` reads the frames a node's underlay interface sent while the
pings ran (cni_fan.lab.pathwatch) and classifies each with `classify`:
the overlay pair it carries, and how.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

ETH_HEADER = 14
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_IPIP, IPPROTO_UDP, IPPROTO_IPV6 = 4, 17, 41
VXLAN_HEADER = 8
UDP_HEADER = 8
IPV6_HEADER = 40
DIRECT, ENCAPSULATED = "direct", "encapsulated"


class Carried(NamedTuple):
    """An overlay packet seen on the wire: its path, and its (inner) source and destination."""
    path: str
    src: str
    dst: str


def _ip(packet: bytes) -> tuple[int, str, str, bytes] | None:
    """(protocol or next header, source, destination, payload) of an IPv4 or IPv6 packet; None if it is neither."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) * 4
        if len(packet) < header:
            return None
        return (packet[9], str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20])),
                packet[header:])
    if len(packet) >= IPV6_HEADER and packet[0] >> 4 == 6:
        return (packet[6], str(ipaddress.IPv6Address(packet[8:24])), str(ipaddress.IPv6Address(packet[24:40])),
                packet[IPV6_HEADER:])
    return None


def classify(frame: bytes, vxlan_port: int = 4789) -> Carried | None:
    """The overlay pair an Ethernet frame carries and how: VXLAN to `vxlan_port`
    or IPIP/IPv6-in-IP are encapsulated (the inner packet's addresses), any
    other IP packet direct (its own addresses). None for non-IP frames (ARP...)."""
    if len(frame) < ETH_HEADER or struct.unpack("!H", frame[12:14])[0] not in (ETH_P_IP, ETH_P_IPV6):
        return None
    outer = _ip(frame[ETH_HEADER:])
    if outer is None:
        return None
    proto, src, dst, payload = outer
    if proto == IPPROTO_UDP and len(payload) >= UDP_HEADER and struct.unpack("!H", payload[2:4])[0] == vxlan_port:
        inner_frame = payload[UDP_HEADER + VXLAN_HEADER:]
        inner = _ip(inner_frame[ETH_HEADER:]) if len(inner_frame) > ETH_HEADER else None
        return Carried(ENCAPSULATED, inner[1], inner[2]) if inner else None
    if proto in (IPPROTO_IPIP, IPPROTO_IPV6):
        inner = _ip(payload)
        return Carried(ENCAPSULATED, inner[1], inner[2]) if inner else None
    return Carried(DIRECT, src, dst)


def in_order(paths: list[str]) -> list[str]:
    """The paths a pair's packets took, in order, repeats dropped: [encapsulated, direct] for a
    direct pair whose first packets went encapsulated while the peer's MAC was being learnt."""
    return [p for i, p in enumerate(paths) if i == 0 or paths[i - 1] != p]


def path_ok(expected: str, paths: list[str]) -> bool:
    """Whether a pair's packets (in order) took the expected path. Encapsulated: every packet.
    Direct: from the first direct packet on, every one; encapsulated ones before it are the
    program's fallback while the kernel does not yet know the peer's MAC (docs/datapath.md)."""
    order = in_order(paths)
    if expected == DIRECT:
        return order in ([DIRECT], [ENCAPSULATED, DIRECT])
    return order == [expected]
