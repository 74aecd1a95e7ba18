"""The plugin server: a warm process that forks one child per CNI call.

Python with the verbs' imports takes a tenth of a second or more to
start; a fork of a process that has already imported everything takes
about a millisecond, and the server keeps a few children forked and
warmed ahead of the calls. Each call still gets a process of its own (crash isolation, the same
code as the standalone path), so the server itself never touches the
network and stays single-threaded. Neither it nor its children enter a
namespace: the client passes a netlink socket it opened in the pod, and a
caller in another namespace runs its call itself (`not_served_here`), so
the agent needs no SYS_ADMIN. Forking a multi-threaded process is unsafe,
which is why the agent runs this as a separate process (`cni-fan serve`).
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import select
import signal
import socket
import struct
import time
from pathlib import Path

from cni_fan import __version__
from cni_fan.cni.call import CallContext

log = logging.getLogger("cni_fan.server")
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
CHILD_TIMEOUT = 120.0
# Idle children waiting for calls; runtimes start pods a few at a time.
POOL_SIZE = 8


def preload() -> None:
    """Import and warm what the verbs use, so children start at full speed."""
    import netaddr  # noqa: F401

    import cni_fan.ipam.plugin  # noqa: F401
    import cni_fan.net.netns  # noqa: F401
    import cni_fan.plugin  # noqa: F401
    import cni_fan.runner  # noqa: F401
    import cni_fan.wire  # noqa: F401

    # Children would otherwise let the collector walk (and so copy) every
    # object inherited from this process; freezing keeps fork cheap.
    gc.collect()
    gc.freeze()


WARM_CONFIG = b'{"cniVersion": "1.0.0", "name": "warm-up", "type": "fan", "overlay": "241.0.0.0/8", ' \
              b'"underlay": "198.18.0.0/16"}'


def warm_up() -> None:
    """In an idle child, before it waits for a call: touch what a call uses.

    A forked child shares the server's memory until it writes to it, and
    CPython writes to every object it uses (reference counts): the first
    call in a fresh child copies each page it touches, one page fault at a
    time. Doing that here, while the child is idle, takes it off the call's
    path. Only reads: a VERSION call, a config parsed into a plan, and one
    link read through the raw codec the verbs use.
    """
    import json

    import netaddr

    from cni_fan.config import FanConfig
    from cni_fan.net.rtnl import Rtnl
    from cni_fan.net.rtnl_links import get_link
    from cni_fan.plan import make_plan
    from cni_fan.runner import run_local

    with open(os.devnull, "w") as sink:
        run_local("fan", {"CNI_COMMAND": "VERSION"}, WARM_CONFIG, CallContext(log_stream=sink))
    _logs_to_server()
    config = FanConfig.from_dict(json.loads(WARM_CONFIG))
    make_plan(config, netaddr.IPAddress("198.18.1.10"), "lo", 1, 1500)
    with Rtnl() as host:
        get_link(host, "lo")


def call_waiting(listening: socket.socket) -> bool:
    """Whether a connection waits in the listening socket's queue (more calls at once than idle children).

    Then the warm-up would only delay it: the page copies it saves the
    call are the ones the call makes anyway.
    """
    return bool(select.select([listening], [], [], 0)[0])


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _client_alive(conn: socket.socket) -> bool:
    """False once the client hung up (its runtime killed it): it sends nothing after its request."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    if not poller.poll(0):
        return True
    try:
        return conn.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def handle_call(conn: socket.socket) -> CallContext | None:
    """In the child: run one call as the client would have run it; returns its context (None: not run here).

    Where this differs from the client's own process goes into the call's
    context: the pod's namespace as the descriptor the client passed, with
    a netlink socket the client opened inside it, the client's liveness
    (its socket), and the client's stderr for the logs. The child never
    enters a namespace: setns(2) needs SYS_ADMIN, which the agent lacks.
    """
    from cni_fan.runner import run_local
    from cni_fan.wire import FALLBACK, decode_request, encode_reply, read_message

    first, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 4)
    pending = [first]

    def recv(n: int) -> bytes:
        if pending and pending[0]:
            chunk, pending[0] = pending[0][:n], pending[0][n:]
            return chunk
        return conn.recv(n)

    version, plugin, netns, stdin, env = decode_request(read_message(recv))
    if version != __version__:
        log.info("client %s differs from server %s: the client runs the call itself", version, __version__)
        conn.sendall(encode_reply(FALLBACK, b""))
        return None
    if len(fds) < 2:
        raise ValueError("call without the caller's namespace and stderr descriptors")
    client_netns, client_stderr, *rest = fds
    pod_fd = rest[0] if rest and netns else None
    pod_netlink = rest[1] if len(rest) > 1 and pod_fd is not None else None
    why = not_served_here(client_netns, plugin, env.get("CNI_COMMAND", ""), pod_fd, pod_netlink)
    if why:
        log.info("%s %s: %s: the client runs the call itself", plugin, env.get("CNI_COMMAND", "?"), why)
        conn.sendall(encode_reply(FALLBACK, b""))
        return None
    context = CallContext(netns_fds={netns: pod_fd} if pod_fd is not None else {},
                          netlink_fds={netns: pod_netlink} if pod_netlink is not None else {},
                          client_alive=functools.partial(_client_alive, conn),
                          log_stream=os.fdopen(client_stderr, "w", buffering=1))
    out, code = run_local(plugin, env, stdin, context)
    conn.sendall(encode_reply(code, out))
    return context


def finish_call(context: CallContext) -> None:
    """After the reply: the call's deferred work, its logs to the server's own stderr (the client may be gone)."""
    from cni_fan.cni.call import run_deferred

    if not context.deferred:
        return
    _logs_to_server()
    try:
        context.log_sink.close()
    except OSError:
        pass
    run_deferred(context)


def _logs_to_server() -> None:
    """Undo what a call's `run_local` set up: the `cni_fan` logs go to the server's stderr again."""
    own = logging.getLogger("cni_fan")
    own.handlers.clear()
    own.propagate = True


def same_netns(fd: int) -> bool:
    """Whether the namespace `fd` is this process's own (same device and inode)."""
    theirs, ours = os.fstat(fd), os.stat("/proc/self/ns/net")
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def not_served_here(client_netns: int, plugin: str, command: str, pod_fd: int | None,
                    pod_netlink: int | None) -> str | None:
    """Why this child cannot run the call without entering a namespace, or None when it can.

    A caller in another network namespace than the server's gets FALLBACK
    (it runs the call itself) rather than a host-side socket of its own:
    every host-side step of the verbs (bridge, veth, port guard, tc, the
    underlay lookup, sysctls) opens sockets or files in the process's own
    namespace, so serving it would mean threading the caller's sockets
    through all of them, for a case a deployment does not have (the agent
    is hostNetwork, like the runtime that runs the client). The standalone
    path does the same work with the same answers, only slower. A call that
    works inside the pod and came without a netlink socket there (a client
    from before this rule with the same version string, or a CNI_NETNS that
    is no network namespace) falls back too: the standalone path then gives
    the right answer, and this child could only fail with EPERM.
    """
    from cni_fan.wire import needs_pod_netlink

    if not same_netns(client_netns):
        return "the caller's network namespace is not the plugin server's"
    if pod_fd is not None and pod_netlink is None and needs_pod_netlink(plugin, command):
        return "no netlink socket in the pod's namespace came with the call"
    return None


class PluginServer:
    """A pool of pre-forked children waiting in accept().

    Forking the whole server process and importing the rest costs time that
    would otherwise land on every pod start, so children are forked ahead:
    one accepts a call, tells the parent (a byte in a pipe), serves that one
    call and exits; the parent forks a replacement. Each call still gets a
    fresh process of its own.
    """

    def __init__(self, path: str, exit_with_parent: bool = False, pool_size: int = POOL_SIZE) -> None:
        self.path = path
        # An agent killed with SIGKILL cannot stop us; notice it instead.
        self.parent = os.getppid() if exit_with_parent else None
        self.pool_size = pool_size
        self.idle: set[int] = set()
        self.busy: dict[int, float] = {}
        self.stopping = False

    def bind(self) -> socket.socket:
        directory = Path(self.path).parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(self.path + ".new")
        finally:
            os.umask(old)
        os.rename(self.path + ".new", self.path)  # clients never see a half-ready socket
        sock.listen(256)
        return sock

    def reap(self) -> None:
        now = time.monotonic()
        for pid in list(self.idle) + list(self.busy):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.idle.discard(pid)
                self.busy.pop(pid, None)
            elif pid in self.busy and now - self.busy[pid] > CHILD_TIMEOUT:
                log.error("call in child %d ran for over %ds; killing it", pid, CHILD_TIMEOUT)
                os.kill(pid, signal.SIGKILL)

    def serve_forever(self) -> None:
        preload()
        sock = self.bind()
        accepted_r, accepted_w = os.pipe()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("plugin server listening on %s", self.path)
        try:
            while not self.stopping:
                while len(self.idle) < self.pool_size and not self.stopping:
                    self._spawn(sock, accepted_r, accepted_w)
                try:
                    ready, _, _ = select.select([accepted_r], [], [], 1.0)
                except InterruptedError:
                    continue
                if ready:
                    for i in range(0, len(data := os.read(accepted_r, 4096)) - 3, 4):
                        (pid,) = struct.unpack_from("=i", data, i)
                        self.idle.discard(pid)
                        self.busy[pid] = time.monotonic()
                self.reap()
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("the agent that started this server is gone; stopping")
                    break
        finally:
            sock.close()
            for pid in self.idle:
                os.kill(pid, signal.SIGTERM)  # waiting in accept(): nothing to finish
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            log.info("plugin server stopped")

    def _spawn(self, sock: socket.socket, accepted_r: int, accepted_w: int) -> None:
        pid = os.fork()
        if pid:
            self.idle.add(pid)
            return
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            os.close(accepted_r)
            if not call_waiting(sock):  # in a burst, a call that waits already goes first
                try:
                    warm_up()
                except Exception:  # a colder call, not a failed one
                    log.debug("warm-up of an idle child failed", exc_info=True)
            conn, _ = sock.accept()
            os.write(accepted_w, struct.pack("=i", os.getpid()))
            sock.close()
            with conn:
                if _peer_uid(conn) not in (0, os.getuid()):
                    log.warning("refusing a call from uid %d", _peer_uid(conn))
                    return
                conn.settimeout(60.0)
                context = handle_call(conn)
            if context is not None:  # the client has its answer and the connection is closed
                finish_call(context)
        except BaseException:
            log.exception("plugin server child failed")
            code = 1
        finally:
            os._exit(code)

    def _stop(self, _signum, _frame) -> None:
        self.stopping = True


def _die_with_parent() -> None:
    """An idle child must not outlive the server and keep accepting calls."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
