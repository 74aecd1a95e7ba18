"""ICMP echo probes from inside network namespaces, on raw sockets, IPv4 and IPv6.

The one pinger of the lab, made for reuse (the test harness, the
benchmarks): no `ping` binary and no output to parse; it imports only the
standard library, cni_fan.net.nsenter and the pure cni_fan.lab.icmp, so
the benchmark harness can use it without pyroute2 or netaddr. A
namespace is named as under /run/netns (`fanlab-n1p1`) or given as a path.
A socket is opened inside its namespace and stays bound to it. The family
follows the destination: an IPv6 address (it has a colon) gets a raw
ICMPv6 socket and ICMPv6 echoes, with the same identifiers, retries and
timeouts as IPv4.

    ping(ns, dst, ...)            one echo, with retries: the answer (a reply
                                  or an ICMP error about it) or None
    ping_all(pairs, ...)          many (namespace, address) pairs at once:
                                  round-trip seconds or None each
    Pinger(ns, dst, interval)     a steady stream on a thread: replies as they
                                  come, lost sequence numbers, (sent, received)
    icmp_socket(ns, ...)          a raw ICMP (or ICMPv6) socket inside `ns` (a
                                  watcher in the destination, say), read with `receive`
"""
from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import threading
import time
from typing import Callable, Iterator

from cni_fan.lab import icmp
from cni_fan.lab.icmp import IcmpMessage
from cni_fan.net.nsenter import switched

Pair = tuple[str, str]  # (source namespace, address pinged)
NETNS_DIR = "/run/netns"  # iproute2's named namespaces (topology.NETNS_DIR, not imported: see above)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
HOP_LIMIT_SPACE = socket.CMSG_SPACE(4)
PING_ALL_PAYLOAD = b"cni-fan lab check"
MAX_PACKET = 65535


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """This thread in namespace `ns` (a name under /run/netns, or a path)
    for the block; FileNotFoundError if there is no such namespace."""
    target = os.open(ns if ns.startswith("/") else f"{NETNS_DIR}/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with switched(target):
            yield
    finally:
        os.close(target)


def family_of(address: str) -> int:
    """socket.AF_INET6 for an IPv6 address (it has a colon), socket.AF_INET otherwise."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def icmp_socket(ns: str, *, ttl: int | None = None, dont_fragment: bool = False,
                family: int = socket.AF_INET) -> socket.socket:
    """A raw ICMP socket (AF_INET6: ICMPv6) inside `ns`: it sends echoes and
    sees every ICMP packet the namespace receives (replies, errors, others'
    requests; ICMPv6 also neighbour discovery, which `parse6` leaves out).
    `ttl` is the IPv6 hop limit on an ICMPv6 socket."""
    with entered(ns):
        if family == socket.AF_INET6:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            if ttl is not None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            if dont_fragment:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            if ttl is not None:
                sock.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
            if dont_fragment:
                sock.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except OSError:
        sock.close()
        raise
    return sock


def read_message(sock: socket.socket) -> IcmpMessage | None:
    """One packet from a raw ICMP or ICMPv6 socket, parsed (None: not about an
    echo). Raises BlockingIOError when nothing is waiting on a non-blocking read."""
    if sock.family != socket.AF_INET6:
        return icmp.parse(sock.recv(MAX_PACKET, socket.MSG_DONTWAIT))
    data, ancillary, _, peer = sock.recvmsg(MAX_PACKET, HOP_LIMIT_SPACE, socket.MSG_DONTWAIT)
    hop_limit = next((int.from_bytes(value[:4], "little") for level, kind, value in ancillary
                      if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT), 0)
    return icmp.parse6(data, peer[0].split("%")[0], hop_limit)


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An echo request of `family` (ICMPv6 for AF_INET6)."""
    if family == socket.AF_INET6:
        return icmp.echo_request6(ident, seq, payload)
    return icmp.echo_request(ident, seq, payload)


def receive(sock: socket.socket, match: Callable[[IcmpMessage], bool], timeout: float) -> IcmpMessage | None:
    """The first ICMP message on `sock` that `match` accepts within `timeout`
    seconds; None if none came. Other packets are read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        try:
            message = read_message(sock)
        except (BlockingIOError, InterruptedError):
            continue
        if message is not None and match(message):
            return message


def ping(ns: str, dst: str, *, payload: int = 56, ttl: int = 64, dont_fragment: bool = True,
         timeout: float = 1.0, tries: int = 3, ident: int | None = None) -> IcmpMessage | None:
    """Echo requests from `ns` to `dst`, one at a time, until an answer comes:
    the echo reply, or an ICMP error about the request (time exceeded,
    unreachable with the next hop's MTU). None if `tries` requests, `timeout`
    seconds each, got neither. With `dont_fragment` (the default), a packet
    larger than the local MTU raises OSError (EMSGSIZE) from the send.
    `ident` (random by default) lets a watcher at the destination pick out
    these requests."""
    if ident is None:
        ident = random.randrange(1 << 16)
    family = family_of(dst)
    with icmp_socket(ns, ttl=ttl, dont_fragment=dont_fragment, family=family) as sock:
        for seq in range(1, tries + 1):
            sock.sendto(echo_request(family, ident, seq, bytes(payload)), (dst, 0))
            answer = receive(sock, lambda m: m.kind != "request" and (m.ident, m.seq) == (ident, seq), timeout)
            if answer is not None:
                return answer
    return None


def ping_all(pairs: list[Pair], *, timeout: float = 3.0, interval: float = 0.25) -> dict[Pair, float | None]:
    """Ping every (namespace, address) pair at once; round-trip seconds or None.

    One raw socket per source namespace and family (ICMP, or ICMPv6 for
    IPv6 addresses), opened inside it; every pair has its own identifier,
    and a reply counts only if it comes from the pinged address. Requests
    are resent every `interval` (the first packet may wait for ARP or
    neighbour discovery) until `timeout`.
    """
    socks: dict[tuple[str, int], socket.socket] = {}

    def sock_of(pair: Pair) -> socket.socket:
        return socks[(pair[0], family_of(pair[1]))]

    try:
        for key in sorted({(src, family_of(dst)) for src, dst in pairs}):
            socks[key] = icmp_socket(key[0], family=key[1])
            socks[key].setblocking(False)
        base = random.randrange(1 << 16)
        ident = {pair: (base + k) & 0xFFFF for k, pair in enumerate(pairs)}
        by_ident = {(pair[0], family_of(pair[1]), ident[pair]): pair for pair in pairs}
        sent: dict[Pair, float] = {}
        answered: dict[Pair, float | None] = {pair: None for pair in pairs}
        start = time.monotonic()
        next_send, seq = start, 0
        by_fd = {s.fileno(): key for key, s in socks.items()}
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                seq += 1
                for pair in pairs:
                    if answered[pair] is None:
                        try:
                            sock = sock_of(pair)
                            sock.sendto(echo_request(sock.family, ident[pair], seq, PING_ALL_PAYLOAD), (pair[1], 0))
                            sent.setdefault(pair, now)
                        except OSError:
                            pass  # no route yet, say: try again next round
                next_send = now + interval
            if all(v is not None for v in answered.values()):
                break
            ready, _, _ = select.select(list(by_fd), [], [], max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for fd in ready:
                key = by_fd[fd]
                while True:
                    try:
                        message = read_message(socks[key])
                    except (BlockingIOError, InterruptedError):
                        break
                    if message is None or message.kind != "reply":
                        continue
                    pair = by_ident.get((*key, message.ident))
                    if pair is not None and _same_address(pair[1], message.src) and answered[pair] is None:
                        answered[pair] = time.monotonic() - sent.get(pair, start)
        return answered
    finally:
        for s in socks.values():
            s.close()


def _same_address(a: str, b: str) -> bool:
    """Whether two address texts name the same address (IPv6 has many spellings)."""
    if a == b:
        return True
    if ":" not in a or ":" not in b:
        return False
    try:
        return socket.inet_pton(socket.AF_INET6, a) == socket.inet_pton(socket.AF_INET6, b)
    except OSError:
        return False


class Pinger:
    """Echo requests from `ns` to `dst` every `interval` seconds on a thread,
    until `stop`; each reply is recorded as (wall-clock time received, seq).
    For "does traffic keep flowing while X happens": compare reply times
    with when X happened, or look for lost sequence numbers."""

    def __init__(self, ns: str, dst: str, interval: float = 0.05, *, payload: int = 56,
                 linger: float = 1.0) -> None:
        self.dst = dst
        self.interval = interval
        self.linger = linger          # how long `stop` waits for replies still in flight
        self.replies: list[tuple[float, int]] = []
        self.sent = 0
        self._payload = bytes(payload)
        self._ident = random.randrange(1 << 16)
        self._family = family_of(dst)
        self._sock = icmp_socket(ns, family=self._family)
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"pinger {ns}->{dst}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Pinger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            next_send = time.monotonic()
            linger_until = None
            while linger_until is None or (time.monotonic() < linger_until and len(self.replies) < self.sent):
                now = time.monotonic()
                if linger_until is None and self._stopping.is_set():
                    linger_until = now + self.linger
                if linger_until is None and now >= next_send:
                    self.sent += 1
                    try:
                        self._sock.sendto(echo_request(self._family, self._ident, self.sent & 0xFFFF,
                                                       self._payload), (self.dst, 0))
                    except OSError:
                        pass  # counted as sent and lost, as `ping` counts it
                    next_send = now + self.interval
                wait = (min(next_send, now + 0.1) if linger_until is None else linger_until) - time.monotonic()
                answer = receive(self._sock, self._is_ours, max(0.0, wait))
                if answer is not None:
                    self.replies.append((time.time(), answer.seq))
        except BaseException as exc:  # shown by `stop`, not lost in a thread
            self._error = exc

    def _is_ours(self, message: IcmpMessage) -> bool:
        return message.kind == "reply" and message.ident == self._ident and _same_address(message.src, self.dst)

    def wait_replies(self, count: int, timeout: float = 10.0) -> bool:
        """Whether `count` replies have come within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.replies) < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        return len(self.replies) >= count

    def first_reply_after(self, when: float, timeout: float) -> float | None:
        """The wall-clock time of the first reply received after `when`
        (time.time()), waiting up to `timeout` seconds; None if none came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [ts for ts, _ in list(self.replies) if ts > when]
            if later:
                return later[0]
            time.sleep(0.02)
        return None

    def missing(self) -> list[int]:
        """Sequence numbers below the highest answered one that got no reply
        (a request still in flight when the pinger stopped is not counted)."""
        seqs = {seq for _, seq in self.replies}
        return sorted(set(range(min(seqs), max(seqs) + 1)) - seqs) if seqs else []

    def stop(self) -> tuple[int, int]:
        """Stop sending, wait for replies in flight (up to `linger`), close;
        returns (sent, received). Raises what the pinger's thread raised."""
        self._stopping.set()
        self._thread.join(self.linger + 5.0)
        self._sock.close()
        if self._error is not None:
            raise self._error
        return self.sent, len(self.replies)
