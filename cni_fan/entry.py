"""Entry points of `fan` and `fan-ipam`: a thin client, then a local fallback.

A runtime starts this executable for every pod, so what it imports is the
per-pod cost. The fast path imports only the standard library: it hands
the call (environment, stdin and the namespace descriptors) to the node
agent's plugin server, whose forked children already have pyroute2 and
the verbs loaded. When no server answers, the call runs in this process
(`cni_fan.runner`), which is slower to start but does the same work.
See docs/architecture.md, "The per-call path".
"""
from __future__ import annotations

import json
import os
import socket
import sys

from cni_fan import __version__

DEFAULT_SOCKET = "/run/cni-fan/plugin.sock"
CONNECT_TIMEOUT = 2.0
TRY_AGAIN_LATER = 11


def _socket_path(environ, stdin: bytes) -> str | None:
    override = environ.get("CNI_FAN_AGENT_SOCKET")
    if override is not None:
        return override if override not in ("", "none") else None
    try:
        config = json.loads(stdin)
    except ValueError:
        return None  # the local path answers with the right decode error
    if not isinstance(config, dict):
        return None
    path = config.get("agentSocket")
    ipam = config.get("ipam")
    if path is None and isinstance(ipam, dict):
        path = ipam.get("agentSocket")
    return path if isinstance(path, str) and path.startswith("/") else DEFAULT_SOCKET


def _open_quietly(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def call_server(path: str, plugin: str, environ, stdin: bytes) -> tuple[bytes, int] | None:
    """(stdout, exit code) from the plugin server, or None to run locally."""
    if not os.path.exists(path):
        return None
    from cni_fan.wire import recv_message, send_message

    env = {k: v for k, v in environ.items() if k.startswith(("CNI_", "CNI_FAN_"))}
    netns_path = env.get("CNI_NETNS", "")
    fds = [os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC), 2]
    pod_fd = _open_quietly(netns_path) if netns_path else None
    if pod_fd is not None:
        fds.append(pod_fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None  # no server (stale socket, agent restarting): run locally
        sock.settimeout(None)
        send_message(sock, {"version": __version__, "plugin": plugin, "env": env,
                            "stdin": stdin.decode("latin-1"), "netns": netns_path if pod_fd is not None else ""},
                     fds)
        try:
            reply, _ = recv_message(sock)
        except (ConnectionError, ValueError) as exc:
            msg = {"cniVersion": "1.0.0", "code": TRY_AGAIN_LATER,
                   "msg": "the cni-fan plugin server stopped before answering", "details": str(exc)}
            return (json.dumps(msg) + "\n").encode(), 1
        if reply.get("fallback"):
            return None  # e.g. the agent runs another version during an upgrade
        return reply["stdout"].encode("latin-1"), int(reply["code"])
    finally:
        sock.close()
        os.close(fds[0])
        if pod_fd is not None:
            os.close(pod_fd)


def _main(plugin: str) -> int:
    stdin = sys.stdin.buffer.read()
    answer = None
    path = _socket_path(os.environ, stdin)
    if path is not None:
        answer = call_server(path, plugin, os.environ, stdin)
    if answer is None:
        from cni_fan.runner import run_local

        answer = run_local(plugin, os.environ, stdin)
    out, code = answer
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return code


def fan_main() -> None:
    sys.exit(_main("fan"))


def fan_ipam_main() -> None:
    sys.exit(_main("fan-ipam"))
