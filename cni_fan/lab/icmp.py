"""ICMP echo on the wire, IPv4 and IPv6: build a request, read what comes back. Pure.

What a raw ICMP socket receives is the whole IPv4 packet. `parse` names
what it carries: an echo reply or request (its identifier and sequence
number), or an error about one of our echoes (time exceeded, destination
unreachable with the next hop's MTU), named by the identifier and sequence
number of the echo it quotes, so an error is matched to its request the
same way a reply is.

A raw ICMPv6 socket receives the ICMPv6 message alone (no IPv6 header: the
sender and hop limit come with it from the socket), and the kernel fills
in an outgoing ICMPv6 checksum itself (it covers a pseudo-header only the
kernel knows in full). `parse6` names the same things: echo reply or
request, or an error (time exceeded, unreachable, packet too big with its
MTU) quoting an echo request whose IPv6 header is followed directly by
ICMPv6; a quote with extension headers in between is not ours (None).
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
FRAGMENTATION_NEEDED = 4   # the DEST_UNREACHABLE code that carries the next hop's MTU
IPPROTO_ICMP = 1
ICMP_HEADER_LEN = 8
KINDS = {ECHO_REPLY: "reply", ECHO_REQUEST: "request", DEST_UNREACHABLE: "unreachable",
         TIME_EXCEEDED: "time-exceeded"}
# ICMPv6 (RFC 4443)
ECHO6_REQUEST = 128
ECHO6_REPLY = 129
IPPROTO_ICMPV6 = 58
IPV6_HEADER_LEN = 40
KINDS6 = {ECHO6_REPLY: "reply", ECHO6_REQUEST: "request", 1: "unreachable", 2: "too-big", 3: "time-exceeded"}


@dataclass(frozen=True)
class IcmpMessage:
    """One ICMP message about an echo: what it is, who sent it, which echo."""
    kind: str       # "reply", "request", "unreachable", "time-exceeded", "too-big" (IPv6)
    src: str        # the sender, from the IPv4 header (IPv6: from the socket)
    ttl: int        # the TTL (IPv6: hop limit) it arrived with; 0 when the socket did not say
    ident: int      # the echo's identifier (for an error: the quoted echo's)
    seq: int        # the echo's sequence number (for an error: the quoted echo's)
    code: int = 0   # the ICMP code (an unreachable's reason)
    mtu: int = 0    # the next hop's MTU of a "fragmentation needed" or an IPv6 "packet too big"
    size: int = 0   # the whole IP packet's length


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"") -> bytes:
    """An ICMP echo request (no IP header: the kernel adds it), checksum filled in."""
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, checksum(header + payload), ident, seq) + payload


def parse(packet: bytes) -> IcmpMessage | None:
    """The echo an IPv4 packet from a raw ICMP socket is about; None for
    anything else (another ICMP type, an error quoting something else, a
    truncated packet)."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + ICMP_HEADER_LEN:
        return None
    kind = KINDS.get(packet[ihl])
    code = packet[ihl + 1]
    src, ttl = socket.inet_ntoa(packet[12:16]), packet[8]
    if kind in ("reply", "request"):
        ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
        return IcmpMessage(kind, src, ttl, ident, seq, code, size=len(packet))
    if kind is None:
        return None
    quoted = packet[ihl + ICMP_HEADER_LEN:]
    if len(quoted) < 20:
        return None
    quoted_ihl = (quoted[0] & 0x0F) * 4
    if quoted[9] != IPPROTO_ICMP or len(quoted) < quoted_ihl + ICMP_HEADER_LEN or quoted[quoted_ihl] != ECHO_REQUEST:
        return None
    ident, seq = struct.unpack_from("!HH", quoted, quoted_ihl + 4)
    mtu = struct.unpack_from("!H", packet, ihl + 6)[0] if (kind, code) == ("unreachable", FRAGMENTATION_NEEDED) else 0
    return IcmpMessage(kind, src, ttl, ident, seq, code, mtu, len(packet))


def echo_request6(ident: int, seq: int, payload: bytes = b"") -> bytes:
    """An ICMPv6 echo request (no IPv6 header); the checksum is left 0: the kernel fills it in."""
    return struct.pack("!BBHHH", ECHO6_REQUEST, 0, 0, ident, seq) + payload


def parse6(message: bytes, src: str, hop_limit: int = 0) -> IcmpMessage | None:
    """The echo an ICMPv6 message from a raw ICMPv6 socket is about (`src`
    and `hop_limit` as the socket gave them); None for anything else
    (neighbour discovery, an error quoting something else, a truncated message)."""
    if len(message) < ICMP_HEADER_LEN:
        return None
    kind = KINDS6.get(message[0])
    code = message[1]
    size = len(message) + IPV6_HEADER_LEN
    if kind in ("reply", "request"):
        ident, seq = struct.unpack_from("!HH", message, 4)
        return IcmpMessage(kind, src, hop_limit, ident, seq, code, size=size)
    if kind is None:
        return None
    quoted = message[ICMP_HEADER_LEN:]
    if (len(quoted) < IPV6_HEADER_LEN + ICMP_HEADER_LEN or quoted[6] != IPPROTO_ICMPV6
            or quoted[IPV6_HEADER_LEN] != ECHO6_REQUEST):
        return None
    ident, seq = struct.unpack_from("!HH", quoted, IPV6_HEADER_LEN + 4)
    mtu = struct.unpack_from("!I", message, 4)[0] if kind == "too-big" else 0
    return IcmpMessage(kind, src, hop_limit, ident, seq, code, mtu, size)
