"""Servers and clients in the labs' namespaces, for the Services and policy
tests: a TCP and UDP server that says who answered and whom it saw, and a
client that asks it, once or many times (a new socket, so a new source port,
each time, like DNS clients).

The server runs in a namespace (anything with `argv()`, as harness/netlab.py's
and harness/nodelab.py's `Netns`); the client runs in a thread of this
process that entered the namespace (no interpreter start per query).
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from typing import Any

from harness.system import BASE_ENV, in_netns

WHO_SERVER = r"""
import selectors, socket, sys
name, hosts, port = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
sel = selectors.DefaultSelector()
listeners = set()
for host in hosts:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    for sock in (tcp, udp):
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(128)
    udp.bind((host, port))
    listeners.add(tcp)
    sel.register(tcp, selectors.EVENT_READ)
    sel.register(udp, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj in listeners:
            conn, peer = key.fileobj.accept()
            try:
                conn.sendall(f"{name} {peer[0]}".encode())
            except OSError:
                pass
            conn.close()
        else:
            data, peer = key.fileobj.recvfrom(512)
            key.fileobj.sendto(f"{name} {peer[0]}".encode(), peer)
"""


class WhoServer:
    """A TCP and UDP server in a namespace answering `<name> <client address>`
    (bound to `host`: a host-network server binds the node's address, so its
    UDP replies leave from the address the client's conntrack entry expects).
    `host` may name several addresses, comma-separated, of either family
    ("0.0.0.0,::" serves IPv4 and IPv6, each socket in its own family)."""

    def __init__(self, ns: Any, name: str, port: int, host: str = "0.0.0.0") -> None:
        self.name, self.ns, self.port = name, ns, port
        self.proc = subprocess.Popen(ns.argv(sys.executable, "-c", WHO_SERVER, name, host, port),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=BASE_ENV, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"server {name} in {ns.name} did not start: {self.proc.stderr.read()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def _ask_once(proto: str, host: str, port: int, timeout: float) -> str:
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=timeout) as sock:
                chunks = []
                while chunk := sock.recv(512):
                    chunks.append(chunk)
                return b"".join(chunks).decode() or "empty answer"
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))   # a reply from any other address is not taken
            sock.send(b"who")
            return sock.recv(512).decode()
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as exc:
        return f"error: {exc}"


def ask_many(ns: Any, proto: str, host: str, port: int, count: int, timeout: float = 2.0,
             give_up_after: int | None = None) -> list[str]:
    """`count` queries from inside `ns`, each on a new socket: the answers, or
    "timeout" / "refused" / "error: ...". With `give_up_after`, stops after
    that many timeouts (a broken path should not cost count x timeout)."""
    def queries() -> list[str]:
        answers: list[str] = []
        for _ in range(count):
            answers.append(_ask_once(proto, host, port, timeout))
            if give_up_after is not None and answers.count("timeout") >= give_up_after:
                break
        return answers
    return in_netns(ns.path, queries)


def ask(ns: Any, proto: str, host: str, port: int, timeout: float = 2.0) -> str:
    return ask_many(ns, proto, host, port, 1, timeout)[0]
