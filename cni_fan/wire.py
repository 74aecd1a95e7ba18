"""The plugin server's wire format, cheap to produce without `json`.

The thin client runs for every pod, and on these machines importing
`json` (it pulls in `re`) and `socket` costs more than the rest of the
call, so a message is a header and length-prefixed byte fields, built
with `struct` alone. Descriptors travel beside the first bytes
(SCM_RIGHTS): the caller's network namespace, its stderr, then, when the
call names one, the pod's namespace and, for the verbs that work inside
the pod (`needs_pod_netlink`), a NETLINK_ROUTE socket the client opened
in it: the server never enters a namespace (it holds no SYS_ADMIN).

request: MAGIC, then fields: version, plugin, netns path, stdin, and the
environment as `KEY=VALUE` fields. reply: MAGIC, exit code (-1 asks the
client to run the call itself), then the stdout bytes.
"""
from __future__ import annotations

import struct

MAGIC = b"CNIFAN1\n"
LENGTH = struct.Struct("!I")
CODE = struct.Struct("!i")
MAX_MESSAGE = 4 << 20
FALLBACK = -1
# The calls whose verbs open netlink sockets inside the pod's namespace.
POD_NETLINK_CALLS = frozenset({("fan", "ADD"), ("fan", "CHECK")})


def needs_pod_netlink(plugin: str, command: str) -> bool:
    """Whether the client opens a netlink socket in the pod for this call (one rule for both ends)."""
    return (plugin, command) in POD_NETLINK_CALLS


def _field(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


def encode_request(version: str, plugin: str, netns: str, stdin: bytes, env: dict[str, str]) -> bytes:
    fields = [version.encode(), plugin.encode(), netns.encode(), stdin]
    fields += [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()]
    body = b"".join(_field(f) for f in fields)
    return MAGIC + LENGTH.pack(len(body)) + body


def decode_request(body: bytes) -> tuple[str, str, str, bytes, dict[str, str]]:
    fields = []
    pos = 0
    while pos < len(body):
        if pos + LENGTH.size > len(body):
            raise ValueError("truncated field length")
        (n,) = LENGTH.unpack_from(body, pos)
        pos += LENGTH.size
        if pos + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[pos:pos + n])
        pos += n
    if len(fields) < 4:
        raise ValueError("request has too few fields")
    env = {}
    for raw in fields[4:]:
        key, _, value = raw.decode("utf-8", "surrogateescape").partition("=")
        env[key] = value
    return fields[0].decode(), fields[1].decode(), fields[2].decode(), fields[3], env


def encode_reply(code: int, stdout: bytes) -> bytes:
    body = CODE.pack(code) + stdout
    return MAGIC + LENGTH.pack(len(body)) + body


def decode_reply(body: bytes) -> tuple[int, bytes]:
    if len(body) < CODE.size:
        raise ValueError("reply too short to hold an exit code")
    (code,) = CODE.unpack_from(body, 0)
    return code, body[CODE.size:]


def read_message(recv) -> bytes:
    """Read one message with `recv(n) -> bytes`; returns its body."""
    head = _read_exact(recv, len(MAGIC) + LENGTH.size)
    if head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a cni-fan message")
    (length,) = LENGTH.unpack_from(head, len(MAGIC))
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes is too large")
    return _read_exact(recv, length)


def _read_exact(recv, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-message")
        buf += chunk
    return buf
