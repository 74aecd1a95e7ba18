"""Entry points of `fan` and `fan-ipam`: a thin client, then a local fallback.

Where `cni-fan install` found a compiled native client
(native/fan-client.c), the runtime starts that instead and reaches this
module only to run a call locally (it sets CNI_FAN_AGENT_SOCKET=none, so
the client part here is skipped). This Python client serves the layouts
without one (onefile bundle, no compiler) and speaks the same protocol.

A runtime starts this executable for every pod, so what it imports is the
per-pod cost. The fast path imports only `os`, `sys`, `struct` and the C
`_socket` module (not `json`, `re`, `socket` or `logging`: together they
cost more than the call; `cni_fan.net.nsenter` (with `_ctypes`) only for the calls that work inside
the pod, on Pythons without `os.setns`): it hands the call (environment,
stdin, descriptors of the caller's and the pod's namespaces, and for ADD
and CHECK a netlink socket it opened inside the pod) to the node agent's
plugin server, whose forked children already have the verbs
loaded. When no server answers, the call runs in this process
(`cni_fan.runner`): slower to start, same work, same answers.
See docs/architecture.md, "The per-call path".
"""
from __future__ import annotations

import gc
import os
import sys

from cni_fan import __version__

DEFAULT_SOCKET = "/run/cni-fan/plugin.sock"
CONNECT_TIMEOUT = 2.0
TRY_AGAIN_LATER = 11
AF_UNIX, SOCK_STREAM, SOL_SOCKET, SCM_RIGHTS = 1, 1, 1, 1
AF_NETLINK, SOCK_DGRAM, SOCK_CLOEXEC, NETLINK_ROUTE = 16, 2, 0o2000000, 0


def _json_string_after(data: bytes, key: bytes) -> str | None:
    """The string value of `"key": "value"` in `data`, without a JSON parser.

    Returns None when the key is absent or the value is not a plain string
    (the full parser in the local path then decides).
    """
    at = data.find(b'"' + key + b'"')
    if at < 0:
        return None
    rest = data[at + len(key) + 2:].lstrip(b" \t\r\n")
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip(b" \t\r\n")
    if not rest.startswith(b'"'):
        return None
    end = rest.find(b'"', 1)
    value = rest[1:end] if end > 0 else b""
    if not value or b"\\" in value:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def _socket_path(environ, stdin: bytes) -> str | None:
    override = environ.get("CNI_FAN_AGENT_SOCKET")
    if override is not None:
        return override if override not in ("", "none") else None
    if b'"agentSocket"' in stdin:
        path = _json_string_after(stdin, b"agentSocket")
        return path if path and path.startswith("/") else None
    return DEFAULT_SOCKET


def _open_quietly(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _netlink_socket_in(pod_fd: int, own_ns: int):
    """A NETLINK_ROUTE socket created inside the pod's namespace, or None if `pod_fd` is not one.

    The client runs as root on the host, so it can enter the pod; the
    agent's server, which then uses the socket, need not (no SYS_ADMIN).
    A socket stays in the namespace it was made in. SOCK_DGRAM, which
    netlink treats as SOCK_RAW, because asyncio (pyroute2) accepts only it.
    Raises OSError when this process cannot get back into its own namespace.
    """
    import _socket

    from cni_fan.net.nsenter import setns
    try:
        setns(pod_fd)
    except OSError:
        return None  # not a network namespace: the server's verbs say so in the answer
    try:
        return _socket.socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_ROUTE)
    except OSError:
        return None
    finally:
        setns(own_ns)


def _try_again(why: str) -> tuple[bytes, int]:
    msg = ('{"cniVersion": "1.0.0", "code": %d, "msg": "the cni-fan plugin server stopped before answering", '
           '"details": "%s"}\n' % (TRY_AGAIN_LATER, why.replace('"', "'").replace("\\", "/")))
    return msg.encode(), 1


def call_server(path: str, plugin: str, environ, stdin: bytes) -> tuple[bytes, int] | None:
    """(stdout, exit code) from the plugin server, or None to run locally."""
    if not os.path.exists(path):
        return None
    import _socket
    import struct

    from cni_fan.wire import FALLBACK, decode_reply, encode_request, needs_pod_netlink, read_message

    env = {k: v for k, v in environ.items() if k.startswith("CNI_")}
    netns_path = env.get("CNI_NETNS", "")
    own_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    pod_fd = _open_quietly(netns_path) if netns_path else None
    fds = [own_ns, 2] + ([pod_fd] if pod_fd is not None else [])
    pod_netlink = None
    sock = _socket.socket(AF_UNIX, SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None  # no server (stale socket, agent restarting): run locally
        sock.settimeout(None)
        if pod_fd is not None and needs_pod_netlink(plugin, env.get("CNI_COMMAND", "")):
            try:
                pod_netlink = _netlink_socket_in(pod_fd, own_ns)
            except OSError as exc:  # stuck in the pod's namespace: running locally there would be wrong
                return _try_again(f"cannot return to the caller's network namespace: {exc}")
            if pod_netlink is not None:
                fds.append(pod_netlink.fileno())
        data = encode_request(__version__, plugin, netns_path if pod_fd is not None else "", stdin, env)
        try:
            sent = sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
            if sent < len(data):
                sock.sendall(data[sent:])
        except OSError:
            return None  # nothing reached the server: run locally
        try:
            code, out = decode_reply(read_message(sock.recv))
        except (ConnectionError, ValueError, OSError) as exc:
            return _try_again(str(exc))
        if code == FALLBACK:
            return None  # e.g. the agent runs another version during an upgrade
        return out, code
    finally:
        sock.close()
        if pod_netlink is not None:
            pod_netlink.close()
        os.close(own_ns)
        if pod_fd is not None:
            os.close(pod_fd)


def _main(plugin: str) -> int:
    stdin = sys.stdin.buffer.read()
    answer = None
    path = _socket_path(os.environ, stdin)
    if path is not None:
        answer = call_server(path, plugin, os.environ, stdin)
    context = None
    if answer is None:
        # One short process: the cyclic collector's passes over what the call imports would only
        # delay it, and what they could free, the exit frees.
        gc.disable()
        from cni_fan.cni.call import CallContext
        from cni_fan.runner import run_local

        context = CallContext.standalone()
        answer = run_local(plugin, os.environ, stdin, context)
    out, code = answer
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    # This process only exits now: moved out of the collector's sight, the objects of the call
    # need not be walked by the collections of the interpreter's shutdown.
    gc.freeze()
    if context is not None and context.deferred:
        _detach_and_run(context)
    return code


def _detach_and_run(context) -> None:
    """Run the call's deferred work in a child that outlives this process.

    The runtime waits for this process to exit and for its stdout and
    stderr to close, not for the work the answer did not need (DEL's veth
    teardown); so the child lets go of all three before it starts. Its
    failures go to the log file if the config names one; a tombstone it
    leaves is collected by GC or the next ADD of the attachment.
    """
    if os.fork():
        return
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        from cni_fan.cni.call import run_deferred

        run_deferred(context)
    finally:
        os._exit(0)


def fan_main() -> None:
    sys.exit(_main("fan"))


def fan_ipam_main() -> None:
    sys.exit(_main("fan-ipam"))
