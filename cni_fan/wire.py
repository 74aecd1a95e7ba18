"""The plugin server's wire format: length-prefixed JSON over a UNIX socket.

Import-light on purpose: the thin `fan` client imports it on every call.
Stdin and stdout are carried as latin-1 strings so any bytes survive.
"""
from __future__ import annotations

import json
import socket
import struct

HEADER = struct.Struct("!I")
MAX_MESSAGE = 4 << 20


def send_message(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(obj).encode()
    data = HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, first: bytes = b"") -> bytes:
    buf = bytearray(first)
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-message")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if max_fds:
        first, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, max_fds)
        if not first:
            raise ConnectionError("peer closed the connection")
    else:
        first = sock.recv(1 << 16)
        if not first:
            raise ConnectionError("peer closed the connection")
    head = _recv_exact(sock, HEADER.size, first)
    (length,) = HEADER.unpack(head[:HEADER.size])
    if length > MAX_MESSAGE:
        raise ConnectionError(f"message of {length} bytes is too large")
    body = _recv_exact(sock, HEADER.size + length, head)[HEADER.size:]
    return json.loads(body), fds
