"""Crafted IPv6 frames for the port guard's tests: ND, RA, redirects, DHCPv6, extension headers.

The ICMPv6 and UDP checksums are real (RFC 8200 8.1 pseudo-header), so a
frame that gets past the guard is one the receiving stack would accept.
"""
from __future__ import annotations

import ipaddress
import struct

from harness.frames import ETH_P_IPV6, checksum, eth, mac_bytes

ICMPV6, UDP, HOP_BY_HOP, NO_NEXT = 58, 17, 0, 59


def packed(address: str) -> bytes:
    return ipaddress.IPv6Address(address).packed


def solicited_node(address: str) -> str:
    """ff02::1:ffXX:XXXX of an address (RFC 4291 2.7.1)."""
    low = packed(address)[13:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))


def multicast_mac(address: str) -> str:
    """33:33 + the low 32 bits of an IPv6 multicast address (RFC 2464 7)."""
    return "33:33:" + ":".join(f"{b:02x}" for b in packed(address)[12:])


def _pseudo_sum(src: str, dst: str, proto: int, upper: bytes) -> int:
    pseudo = packed(src) + packed(dst) + struct.pack("!IxxxB", len(upper), proto)
    return checksum(pseudo + upper)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 255) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + packed(src) + packed(dst) + payload


def icmp6(src: str, dst: str, kind: int, code: int, body: bytes) -> bytes:
    """An ICMPv6 message with its checksum (without the IPv6 header)."""
    message = bytearray(struct.pack("!BBH", kind, code, 0) + body)
    message[2:4] = _pseudo_sum(src, dst, ICMPV6, bytes(message)).to_bytes(2, "big")
    return bytes(message)


def icmp6_frame(dst_mac: str, src_mac: str, src: str, dst: str, kind: int, body: bytes, code: int = 0) -> bytes:
    return eth(dst_mac, src_mac, ETH_P_IPV6) + ipv6(src, dst, ICMPV6, icmp6(src, dst, kind, code, body))


def lladdr_option(kind: int, mac: str) -> bytes:
    return bytes([kind, 1]) + mac_bytes(mac)


def ns_body(target: str, source_mac: str | None) -> bytes:
    return bytes(4) + packed(target) + (lladdr_option(1, source_mac) if source_mac else b"")


def na_body(target: str, target_mac: str | None, solicited: bool = True) -> bytes:
    flags = (0x40 if solicited else 0) | 0x20   # S, O
    return bytes([flags, 0, 0, 0]) + packed(target) + (lladdr_option(2, target_mac) if target_mac else b"")


def ns_frame(src_mac: str, src: str, target: str, with_option: bool = True) -> bytes:
    group = solicited_node(target)
    return icmp6_frame(multicast_mac(group), src_mac, src, group, 135,
                       ns_body(target, src_mac if with_option and src != "::" else None))


def ra_body(src_mac: str) -> bytes:
    """Hop limit 64, M and O off, router lifetime 1800 s, a source link-layer address option."""
    return struct.pack("!BBHII", 64, 0, 1800, 0, 0) + lladdr_option(1, src_mac)


def redirect_body(target: str, destination: str) -> bytes:
    return bytes(4) + packed(target) + packed(destination)


def echo_body(ident: int, marker: bytes) -> bytes:
    return struct.pack("!HH", ident, 1) + marker


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    datagram = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    datagram[6:8] = (_pseudo_sum(src, dst, UDP, bytes(datagram)) or 0xFFFF).to_bytes(2, "big")
    return ipv6(src, dst, UDP, bytes(datagram), hop_limit=64)


def hop_by_hop(next_header: int, inner: bytes) -> bytes:
    """An 8-byte hop-by-hop options header (Router Alert: MLD, then a PadN) in front of `inner`."""
    return struct.pack("!BBBBHBB", next_header, 0, 5, 2, 0, 1, 0) + inner


def ipv6_with_hop_by_hop(src: str, dst: str, next_header: int, upper: bytes) -> bytes:
    return ipv6(src, dst, HOP_BY_HOP, hop_by_hop(next_header, upper))
