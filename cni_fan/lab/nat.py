"""The masquerade probe: what source address does a host outside the cluster see?

A pod's traffic to `ext` (on the underlay, outside the overlay) must leave
its node masqueraded to the node's underlay address. The probe opens a UDP
echo server and a TCP listener inside ext and a client of each inside every
pod; ext itself records the peer address it sees, after any NAT on the way.
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
    with netns.entered(ext_ns):
        udp_srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp_srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients_udp: dict[str, socket.socket] = {}
    clients_tcp: dict[str, socket.socket] = {}
    accepted: list[socket.socket] = []
    report = {name: {"expected": want, "udp_seen": None, "udp_echo": False, "tcp_seen": None}
              for name, want in sources.items()}
    try:
        udp_srv.bind((ext_address, 0))
        tcp_srv.bind((ext_address, 0))
        tcp_srv.listen(64)
        udp_srv.setblocking(False)
        tcp_srv.setblocking(False)
        port_udp, port_tcp = udp_srv.getsockname()[1], tcp_srv.getsockname()[1]
        for name in sources:
            with netns.entered(name):
                clients_udp[name] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                clients_tcp[name] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients_udp[name].setblocking(False)
            clients_tcp[name].setblocking(False)
            clients_tcp[name].connect_ex((ext_address, port_tcp))
        tcp_pending = dict(clients_tcp)
        start = time.monotonic()
        next_send = start
        pending_tokens: dict[socket.socket, bytes] = {}
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                for name, sock in clients_udp.items():
                    if not report[name]["udp_echo"]:
                        try:
                            sock.sendto(f"lab {name}".encode(), (ext_address, port_udp))
                        except OSError:
                            pass
                next_send = now + NAT_RESEND_INTERVAL
            if all(r["udp_echo"] and r["tcp_seen"] for r in report.values()):
                break
            readers = [udp_srv, tcp_srv, *clients_udp.values(), *accepted]
            writers = list(tcp_pending.values())
            ready_r, ready_w, _ = select.select(readers, writers, [], max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for sock in ready_w:
                name = next(n for n, s in tcp_pending.items() if s is sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        sock.send(f"lab {name}".encode())
                    except OSError:
                        pass
                del tcp_pending[name]
            for sock in ready_r:
                if sock is udp_srv:
                    try:
                        data, peer = udp_srv.recvfrom(2048)
                    except BlockingIOError:
                        continue
                    name = data.decode(errors="replace").removeprefix("lab ")
                    if name in report:
                        report[name]["udp_seen"] = peer[0]
                        udp_srv.sendto(f"seen {peer[0]}:{peer[1]}".encode(), peer)
                elif sock is tcp_srv:
                    try:
                        conn, peer = tcp_srv.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    pending_tokens[conn] = peer[0].encode()
                    accepted.append(conn)
                elif sock in accepted:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        continue
                    name = data.decode(errors="replace").removeprefix("lab ")
                    if name in report:
                        report[name]["tcp_seen"] = pending_tokens[sock].decode()
                    accepted.remove(sock)
                    sock.close()
                else:
                    name = next(n for n, s in clients_udp.items() if s is sock)
                    try:
                        data = sock.recv(2048)
                    except OSError:
                        continue
                    if data.startswith(b"seen "):
                        report[name]["udp_echo"] = True
        for entry in report.values():
            entry["ok"] = (entry["udp_seen"] == entry["expected"] and entry["udp_echo"]
                           and entry["tcp_seen"] == entry["expected"])
        return report
    finally:
        for sock in [udp_srv, tcp_srv, *clients_udp.values(), *clients_tcp.values(), *accepted]:
            sock.close()
