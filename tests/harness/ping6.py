"""ICMPv6 echo from a raw socket, for the IPv6 datapath tests.

The IPv6 counterpart of harness/ping.py's `echo` (the product lab's probes
are IPv4 only): one echo request with a chosen hop limit and payload, not
fragmented by the sender (IPV6_DONTFRAG, so a too-large request fails with
EMSGSIZE), answered by the reply or the ICMPv6 error it caused; and a
watcher socket in the destination namespace that sees the request arrive
with its hop limit.
"""
from __future__ import annotations

import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass

from harness.system import inside

IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT, IPV6_DONTFRAG = 51, 52, 62
KINDS = {1: "unreachable", 2: "too-big", 3: "time-exceeded", 128: "request", 129: "reply"}


@dataclass(frozen=True)
class Icmp6:
    kind: str
    src: str
    hop_limit: int | None
    ident: int | None
    mtu: int | None = None     # "too-big" only
    size: int = 0              # the ICMPv6 message's length


def icmp6_socket(netns_path: str) -> socket.socket:
    """A raw ICMPv6 socket in that namespace that reports hop limits."""
    with inside(netns_path):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
    return sock


def _parse(data: bytes, src: str, anc: list) -> Icmp6 | None:
    if len(data) < 8 or data[0] not in KINDS:
        return None
    hops = next((struct.unpack("=i", d[:4])[0] for lvl, typ, d in anc
                 if lvl == socket.IPPROTO_IPV6 and typ == IPV6_HOPLIMIT), None)
    kind = KINDS[data[0]]
    if kind in ("request", "reply"):
        ident = struct.unpack_from("!H", data, 4)[0]
        return Icmp6(kind, src, hops, ident, size=len(data))
    # An error quotes our packet: IPv6 header (40) then the echo request.
    if len(data) < 8 + 40 + 8 or data[8 + 40] != 128:
        return None
    ident = struct.unpack_from("!H", data, 8 + 40 + 4)[0]
    mtu = struct.unpack_from("!I", data, 4)[0] if kind == "too-big" else None
    return Icmp6(kind, src, hops, ident, mtu, len(data))


def receive(sock: socket.socket, match, timeout: float) -> Icmp6 | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, anc, _, addr = sock.recvmsg(65535, 256)
        message = _parse(data, addr[0], anc)
        if message is not None and match(message):
            return message
    return None


def echo6(netns_path: str, dst: str, *, payload: int = 56, hops: int = 64, timeout: float = 1.0,
          tries: int = 3, watch: socket.socket | None = None, fragment: bool = False
          ) -> tuple[Icmp6 | None, Icmp6 | None]:
    """(answer, the request as `watch` saw it); raises OSError(EMSGSIZE)
    when the sender's route MTU refuses the request, unless `fragment`
    lets the sender split it (fragment headers)."""
    ident = secrets.randbits(16)
    with icmp6_socket(netns_path) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 0 if fragment else 1)
        answer = None
        for seq in range(1, tries + 1):
            request = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + bytes(payload)
            sock.sendto(request, (dst, 0))
            answer = receive(sock, lambda m: m.ident == ident and m.kind != "request", timeout)
            if answer is not None:
                break
    seen = None
    if answer is not None and watch is not None:
        seen = receive(watch, lambda m: m.kind == "request" and m.ident == ident, 0.5)
    return answer, seen
