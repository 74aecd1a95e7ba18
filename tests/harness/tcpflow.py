"""One bulk TCP transfer between two namespaces, either family, checked byte for byte count.

The datapath tests push GSO super-packets through the Fan program with it
(IPv4 and IPv6 inner headers alike): a one-off Python server in the
receiving namespace counts what it got and sends the count back.
"""
from __future__ import annotations

import os
import socket
import subprocess

from harness.system import inside

_SERVER = (
    "import socket,sys\n"
    "fam=socket.AF_INET6 if sys.argv[1]=='6' else socket.AF_INET\n"
    "s=socket.socket(fam); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('::' if fam==socket.AF_INET6 else '0.0.0.0',int(sys.argv[2]))); s.listen(1); print('up',flush=True)\n"
    "c,_=s.accept(); n=0\n"
    "while True:\n"
    "    b=c.recv(1<<20)\n"
    "    if not b: break\n"
    "    n+=len(b)\n"
    "c.sendall(str(n).encode()); c.close()\n"
)


def tcp_transfer(src_path: str, dst_ns: str, address: str, megabytes: int, port: int) -> None:
    """Send `megabytes` MiB from the namespace at `src_path` to `address` (in `dst_ns`); assert all arrived."""
    family = "6" if ":" in address else "4"
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, "python3", "-c", _SERVER, family, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        with inside(src_path):
            c = socket.create_connection((address, port), timeout=20)
        with c:
            blob = os.urandom(1 << 20)
            for _ in range(megabytes):
                c.sendall(blob)
            c.shutdown(socket.SHUT_WR)
            got = c.recv(100)
        assert int(got) == megabytes << 20
    finally:
        server.kill()
        server.wait()
