"""Servers and clients in the labs' namespaces, for the Services and policy
tests: an echo server that says who answered and whom it saw, a one-shot
probe, and many short UDP flows (new source port each, like DNS clients).

Each runs `python3 -S -c` inside a namespace (anything with `argv()`/`run()`,
as harness/netlab.py's and harness/nodelab.py's `Netns`).
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from harness.system import BASE_ENV

# One process answering TCP and UDP on a port, on every address of its
# namespace: the reply is "<name> <client address>", so a test sees which
# backend answered and which source address reached it.
_ECHO_SERVER = r"""
import selectors, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen(128)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
sel = selectors.DefaultSelector(); sel.register(tcp, selectors.EVENT_READ); sel.register(udp, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is udp:
            data, peer = udp.recvfrom(2048)
            udp.sendto(f"{name} {peer[0]}".encode(), peer)
        else:
            conn, peer = tcp.accept()
            conn.sendall(f"{name} {peer[0]}".encode()); conn.close()
"""

# A client: prints the server's reply, or nothing when nothing answered in time.
_PROBE = r"""
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if proto == "tcp":
        with socket.create_connection((host, port), timeout=timeout) as s:
            print(s.recv(256).decode())
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout); s.sendto(b"q", (host, port)); print(s.recv(256).decode())
except OSError:
    pass
"""

# Many short UDP flows, each from a new socket (a new source port), like DNS
# clients: prints how many got an answer and the distinct responders.
_UDP_FLOWS = r"""
import socket, sys
host, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
answered, names = 0, set()
for _ in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"q", (host, port)); names.add(s.recv(256).decode().split()[0]); answered += 1
        except OSError:
            pass
print(answered, " ".join(sorted(names)))
"""


class EchoServer:
    """`_ECHO_SERVER` in a namespace (a pod's or a node's), in its own process group."""

    def __init__(self, ns: Any, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(ns.argv("python3", "-S", "-c", _ECHO_SERVER, name, port), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=BASE_ENV, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"echo server {name} did not start: {line}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def probe(ns: Any, proto: str, host: str, port: int, timeout: float = 2.0) -> tuple[str, str] | None:
    """(server name, client address the server saw), or None when nothing answered."""
    out = ns.run("python3", "-S", "-c", _PROBE, proto, host, port, timeout, timeout=timeout + 20).stdout.split()
    return (out[0], out[1]) if len(out) == 2 else None


def udp_flows(ns: Any, host: str, port: int, count: int, timeout: float = 2.0) -> tuple[int, set[str]]:
    """(answered, responders) of `count` UDP queries, each from a new socket."""
    out = ns.run("python3", "-S", "-c", _UDP_FLOWS, host, port, count, timeout, timeout=count * timeout + 30).stdout
    answered, *names = out.split()
    return int(answered), set(names)
