"""ICMP echo on the wire, IPv4: build a request, read what comes back. Pure.

What a raw ICMP socket receives is the whole IPv4 packet. `parse` names
what it carries: an echo reply or request (its identifier and sequence
number), or an error about one of our echoes (time exceeded, destination
unreachable with the next hop's MTU), named by the identifier and sequence
number of the echo it quotes, so an error is matched to its request the
same way a reply is.
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


@dataclass(frozen=True)
class IcmpMessage:
    """One ICMP message about an echo: what it is, who sent it, which echo."""
    kind: str       # "reply", "request", "unreachable", "time-exceeded"
    src: str        # the sender, from the IPv4 header
    ttl: int        # the TTL it arrived with
    ident: int      # the echo's identifier (for an error: the quoted echo's)
    seq: int        # the echo's sequence number (for an error: the quoted echo's)
    code: int = 0   # the ICMP code (an unreachable's reason)
    mtu: int = 0    # the next hop's MTU of a "fragmentation needed"
    size: int = 0   # the whole IPv4 packet's length


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
