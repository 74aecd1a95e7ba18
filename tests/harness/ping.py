"""Every way the tests ping, in one place.

- `ping_argv`: one ping(8) run (the labs' `ping`/`reaches` build on it);
- `Pinger`: ping(8) left running, its replies collected as they come
  (outages during a restart or a repair);
- `echo`: one echo request from a raw socket, with DF, a chosen TTL and
  payload, answered by the reply or the ICMP error it caused (the datapath
  tests read TTLs, "fragmentation needed" and "time exceeded").
"""
from __future__ import annotations

import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from harness.frames import checksum
from harness.system import BASE_ENV, inside


def ping_argv(dst: str, count: int = 1, wait: float | None = 2, size: int | None = None,
              dont_fragment: bool = False, interval: float | None = None, deadline: float | None = None) -> list[str]:
    """ping(8)'s argv: numeric, quiet, done after `count` replies; `wait`
    seconds for an answer, or with `deadline` a request every `interval`
    until the first `count` replies or the deadline."""
    argv: list[Any] = ["ping", "-n", "-q", "-c", count]
    if wait is not None:
        argv += ["-W", wait]
    if deadline is not None:
        argv += ["-w", deadline]
    if interval is not None:
        argv += ["-i", interval]
    if size is not None:
        argv += ["-s", size]
    if dont_fragment:
        argv += ["-M", "do"]
    return [str(a) for a in (*argv, dst)]


class Pinger:
    """`ping -D -O -i INTERVAL dst` run by `argv_prefix` (an nsenter into a
    namespace), its replies collected as they come."""

    REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+)")
    STATS = re.compile(r"(\d+) packets transmitted, (\d+) received")

    def __init__(self, argv_prefix: list[str], dst: str, interval: float = 0.05) -> None:
        self.replies: list[tuple[float, int]] = []
        self.lines: list[str] = []
        argv = [*argv_prefix, "stdbuf", "-oL", "ping", "-n", "-D", "-O", "-i", str(interval), "-W", "1", dst]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=BASE_ENV, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            m = self.REPLY.match(line)
            if m:
                self.replies.append((float(m.group(1)), int(m.group(2))))

    def first_reply_after(self, t: float, timeout: float) -> float | None:
        """Timestamp of the first reply received after wall-clock time t."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [ts for ts, _ in list(self.replies) if ts > t]
            if later:
                return later[0]
            time.sleep(0.02)
        return None

    def wait_replies(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replies) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.replies) >= n, "pinger gets no replies:\n" + "\n".join(self.lines[-20:])

    def missing(self) -> list[int]:
        """Sequence numbers below the highest answered one that got no reply
        (a packet still in flight when ping stopped is not counted)."""
        seqs = {seq for _, seq in self.replies}
        return sorted(set(range(min(seqs), max(seqs) + 1)) - seqs) if seqs else []

    def stop(self) -> tuple[int, int]:
        """SIGINT (ping prints its statistics); returns (transmitted, received)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        for line in self.lines:
            m = self.STATS.search(line)
            if m:
                return int(m.group(1)), int(m.group(2))
        raise AssertionError("no ping statistics:\n" + "\n".join(self.lines[-20:]))


# -- one echo from a raw socket ------------------------------------------------

@dataclass
class Icmp:
    """An ICMP message received in answer to (or as a copy of) our echo."""

    kind: str          # "reply", "request", "time-exceeded", "unreachable"
    src: str
    ttl: int
    code: int = 0
    mtu: int = 0
    size: int = 0


def icmp_socket(netns_path: str) -> socket.socket:
    """A raw ICMP socket in that namespace (sees every ICMP packet delivered to it)."""
    with inside(netns_path):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def _parse(data: bytes, ident: int, seq: int) -> Icmp | None:
    ihl = (data[0] & 15) * 4
    ttl, src = data[8], socket.inet_ntoa(data[12:16])
    typ, code = data[ihl], data[ihl + 1]
    if typ in (0, 8):
        i, s = struct.unpack_from("!HH", data, ihl + 4)
        if (i, s) == (ident, seq):
            return Icmp("reply" if typ == 0 else "request", src, ttl, size=len(data))
    elif typ in (3, 11):
        inner = data[ihl + 8:]
        if len(inner) >= 28:
            iihl = (inner[0] & 15) * 4
            i, s = struct.unpack_from("!HH", inner, iihl + 4)
            if (i, s) == (ident, seq):
                mtu = struct.unpack_from("!H", data, ihl + 6)[0]
                return Icmp("time-exceeded" if typ == 11 else "unreachable", src, ttl, code, mtu)
    return None


def echo(netns_path: str, dst: str, *, payload: int = 56, ttl: int = 64, timeout: float = 1.0, tries: int = 3,
         watch: socket.socket | None = None) -> tuple[Icmp | None, Icmp | None]:
    """Echo request with DF set from the namespace at `netns_path`.

    Returns (answer, copy seen by `watch`): the answer is the echo reply or
    an ICMP error about our request; `watch` is a raw socket in the
    destination namespace that sees the request arrive (its TTL).
    Raises OSError (EMSGSIZE) when the local MTU refuses the packet.
    """
    ident = secrets.randbits(16)
    with icmp_socket(netns_path) as s:
        s.setsockopt(socket.SOL_IP, 10, 2)        # IP_MTU_DISCOVER = DO
        s.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
        for seq in range(1, tries + 1):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(payload)
            body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
            s.sendto(body, (dst, 0))
            deadline = time.monotonic() + timeout
            answer = None
            while answer is None and time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = s.recv(65535)
                except socket.timeout:
                    break
                answer = _parse(data, ident, seq)
            if answer is None:
                continue
            seen = None
            if watch is not None:
                watch.settimeout(0.5)
                try:
                    while seen is None:
                        seen = _parse(watch.recv(65535), ident, seq)
                        if seen and seen.kind != "request":
                            seen = None
                except socket.timeout:
                    pass
            return answer, seen
    return None, None
