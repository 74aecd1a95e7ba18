"""The masquerade probe: what source address does a host outside the cluster see?

A pod's traffic to `ext` (on the underlay, outside the overlay) must leave
its node masqueraded to the node's underlay address. The probe opens a UDP
echo server and a TCP listener inside ext and a client of each inside every
pod; ext itself records the peer address it sees, after any NAT on the way.
The family follows ext's address: towards an IPv6 ext the same probe shows
NAT66 (ext must see the node's IPv6 underlay address).
"""
from __future__ import annotations

import select
import socket
import time

from cni_fan.lab import netns

NAT_RESEND_INTERVAL = 0.3

def nat_probe(sources: dict[str, str], ext_ns: str, ext_address: str, *, timeout: float = 3.0) -> dict[str, dict]:
    """From each namespace in `sources` (name -> expected source address),
    reach a UDP echo server and a TCP listener in `ext_ns`; report the peer
    address ext saw, and whether the UDP echo came back.

    The servers are sockets opened inside ext by this process: ext itself
    sees the peer address, after any NAT on the way.
    """
    probe = _MasqueradeProbe(sources, ext_address)
    try:
        probe.open(ext_ns)
        probe.run(timeout)
        return probe.result()
    finally:
        probe.close()


class _MasqueradeProbe:
    """The sockets of one probe and what ext saw; `run` drives them with select."""

    def __init__(self, sources: dict[str, str], ext_address: str) -> None:
        self.ext_address = ext_address
        self.report = {name: {"expected": want, "udp_seen": None, "udp_echo": False, "tcp_seen": None}
                       for name, want in sources.items()}
        self.udp_server: socket.socket | None = None
        self.tcp_server: socket.socket | None = None
        self.udp_clients: dict[str, socket.socket] = {}
        self.tcp_clients: dict[str, socket.socket] = {}
        self.connecting: dict[str, socket.socket] = {}   # TCP clients not yet connected
        self.accepted: dict[socket.socket, str] = {}     # ext's side of a connection -> the peer address it saw

    def open(self, ext_ns: str) -> None:
        """Both servers inside ext, then a UDP client and a connecting TCP client inside every source."""
        family = socket.AF_INET6 if ":" in self.ext_address else socket.AF_INET
        with netns.entered(ext_ns):
            self.udp_server = socket.socket(family, socket.SOCK_DGRAM)
            self.tcp_server = socket.socket(family, socket.SOCK_STREAM)
        self.udp_server.bind((self.ext_address, 0))
        self.tcp_server.bind((self.ext_address, 0))
        self.tcp_server.listen(64)
        self.udp_server.setblocking(False)
        self.tcp_server.setblocking(False)
        self.udp_port = self.udp_server.getsockname()[1]
        tcp_port = self.tcp_server.getsockname()[1]
        for name in self.report:
            with netns.entered(name):
                self.udp_clients[name] = socket.socket(family, socket.SOCK_DGRAM)
                self.tcp_clients[name] = socket.socket(family, socket.SOCK_STREAM)
            self.udp_clients[name].setblocking(False)
            self.tcp_clients[name].setblocking(False)
            self.tcp_clients[name].connect_ex((self.ext_address, tcp_port))
        self.connecting = dict(self.tcp_clients)

    def run(self, timeout: float) -> None:
        """UDP requests resent every NAT_RESEND_INTERVAL until each is echoed;
        done when every source was seen over both, or at `timeout`."""
        start = time.monotonic()
        next_send = start
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                self._send_udp()
                next_send = now + NAT_RESEND_INTERVAL
            if all(r["udp_echo"] and r["tcp_seen"] for r in self.report.values()):
                break
            readers = [self.udp_server, self.tcp_server, *self.udp_clients.values(), *self.accepted]
            ready_r, ready_w, _ = select.select(readers, list(self.connecting.values()), [],
                                                max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for sock in ready_w:
                self._connected(sock)
            for sock in ready_r:
                if sock is self.udp_server:
                    self._udp_request()
                elif sock is self.tcp_server:
                    self._accept()
                elif sock in self.accepted:
                    self._tcp_hello(sock)
                else:
                    self._udp_echo(sock)

    def _send_udp(self) -> None:
        for name, sock in self.udp_clients.items():
            if not self.report[name]["udp_echo"]:
                try:
                    sock.sendto(f"lab {name}".encode(), (self.ext_address, self.udp_port))
                except OSError:
                    pass

    def _connected(self, sock: socket.socket) -> None:
        """A TCP client's connect finished: say who it is (if it succeeded)."""
        name = next(n for n, s in self.connecting.items() if s is sock)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            try:
                sock.send(f"lab {name}".encode())
            except OSError:
                pass
        del self.connecting[name]

    def _udp_request(self) -> None:
        """ext's UDP server: note the source it sees, echo it back."""
        try:
            data, peer = self.udp_server.recvfrom(2048)
        except BlockingIOError:
            return
        name = data.decode(errors="replace").removeprefix("lab ")
        if name in self.report:
            self.report[name]["udp_seen"] = peer[0]
            self.udp_server.sendto(f"seen {peer[0]}:{peer[1]}".encode(), peer)

    def _accept(self) -> None:
        try:
            conn, peer = self.tcp_server.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.accepted[conn] = peer[0]

    def _tcp_hello(self, sock: socket.socket) -> None:
        """A connection accepted by ext says which source it is: note the source ext saw."""
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        name = data.decode(errors="replace").removeprefix("lab ")
        if name in self.report:
            self.report[name]["tcp_seen"] = self.accepted[sock]
        del self.accepted[sock]
        sock.close()

    def _udp_echo(self, sock: socket.socket) -> None:
        name = next(n for n, s in self.udp_clients.items() if s is sock)
        try:
            data = sock.recv(2048)
        except OSError:
            return
        if data.startswith(b"seen "):
            self.report[name]["udp_echo"] = True

    def result(self) -> dict[str, dict]:
        for entry in self.report.values():
            entry["ok"] = (_same(entry["udp_seen"], entry["expected"]) and entry["udp_echo"]
                           and _same(entry["tcp_seen"], entry["expected"]))
        return self.report

    def close(self) -> None:
        for sock in [self.udp_server, self.tcp_server, *self.udp_clients.values(), *self.tcp_clients.values(),
                     *self.accepted]:
            if sock is not None:
                sock.close()


def _same(seen: str | None, expected: str) -> bool:
    """Whether ext saw the expected address (IPv6 has many spellings of one address)."""
    if seen is None:
        return False
    if ":" not in seen or ":" not in expected:
        return seen == expected
    return socket.inet_pton(socket.AF_INET6, seen) == socket.inet_pton(socket.AF_INET6, expected)
