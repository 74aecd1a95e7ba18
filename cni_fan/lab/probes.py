"""ICMP echo probes from inside network namespaces, on raw sockets.

The one pinger of the lab, made for reuse (the test harness, the
benchmarks): no `ping` binary and no output to parse; it imports only the
standard library, cni_fan.net.nsenter and the pure cni_fan.lab.icmp, so
the benchmark harness can use it without pyroute2 or netaddr. A
namespace is named as under /run/netns (`fanlab-n1p1`) or given as a path.
A socket is opened inside its namespace and stays bound to it.

    ping(ns, dst, ...)            one echo, with retries: the answer (a reply
                                  or an ICMP error about it) or None
    ping_all(pairs, ...)          many (namespace, address) pairs at once:
                                  round-trip seconds or None each
    Pinger(ns, dst, interval)     a steady stream on a thread: replies as they
                                  come, lost sequence numbers, (sent, received)
    icmp_socket(ns, ...)          a raw ICMP socket inside `ns` (a watcher in
                                  the destination, say), read with `receive`
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


def icmp_socket(ns: str, *, ttl: int | None = None, dont_fragment: bool = False) -> socket.socket:
    """A raw ICMP socket inside `ns`: it sends echoes and sees every ICMP
    packet the namespace receives (replies, errors, others' requests)."""
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        if ttl is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
        if dont_fragment:
            sock.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except OSError:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket, match: Callable[[IcmpMessage], bool], timeout: float) -> IcmpMessage | None:
    """The first ICMP message on `sock` that `match` accepts within `timeout`
    seconds; None if none came. Other packets are read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        try:
            message = icmp.parse(sock.recv(MAX_PACKET, socket.MSG_DONTWAIT))
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
    with icmp_socket(ns, ttl=ttl, dont_fragment=dont_fragment) as sock:
        for seq in range(1, tries + 1):
            sock.sendto(icmp.echo_request(ident, seq, bytes(payload)), (dst, 0))
            answer = receive(sock, lambda m: m.kind != "request" and (m.ident, m.seq) == (ident, seq), timeout)
            if answer is not None:
                return answer
    return None


def ping_all(pairs: list[Pair], *, timeout: float = 3.0, interval: float = 0.25) -> dict[Pair, float | None]:
    """Ping every (namespace, address) pair at once; round-trip seconds or None.

    One raw ICMP socket per source namespace, opened inside it; every pair
    has its own ICMP identifier, and a reply counts only if it comes from
    the pinged address. Requests are resent every `interval` (the first
    packet may wait for ARP) until `timeout`.
    """
    socks: dict[str, socket.socket] = {}
    try:
        for ns in sorted({src for src, _ in pairs}):
            socks[ns] = icmp_socket(ns)
            socks[ns].setblocking(False)
        base = random.randrange(1 << 16)
        ident = {pair: (base + k) & 0xFFFF for k, pair in enumerate(pairs)}
        by_ident = {(pair[0], ident[pair]): pair for pair in pairs}
        sent: dict[Pair, float] = {}
        answered: dict[Pair, float | None] = {pair: None for pair in pairs}
        start = time.monotonic()
        next_send, seq = start, 0
        by_fd = {s.fileno(): ns for ns, s in socks.items()}
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                seq += 1
                for pair in pairs:
                    if answered[pair] is None:
                        try:
                            socks[pair[0]].sendto(icmp.echo_request(ident[pair], seq, PING_ALL_PAYLOAD), (pair[1], 0))
                            sent.setdefault(pair, now)
                        except OSError:
                            pass  # no route yet, say: try again next round
                next_send = now + interval
            if all(v is not None for v in answered.values()):
                break
            ready, _, _ = select.select(list(by_fd), [], [], max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for fd in ready:
                ns = by_fd[fd]
                while True:
                    try:
                        data, (addr, _) = socks[ns].recvfrom(MAX_PACKET)
                    except (BlockingIOError, InterruptedError):
                        break
                    message = icmp.parse(data)
                    if message is None or message.kind != "reply":
                        continue
                    pair = by_ident.get((ns, message.ident))
                    if pair is not None and pair[1] == addr and answered[pair] is None:
                        answered[pair] = time.monotonic() - sent.get(pair, start)
        return answered
    finally:
        for s in socks.values():
            s.close()


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
        self._sock = icmp_socket(ns)
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
                        self._sock.sendto(icmp.echo_request(self._ident, self.sent & 0xFFFF, self._payload),
                                          (self.dst, 0))
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
        return message.kind == "reply" and message.ident == self._ident and message.src == self.dst

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
