"""`cni-fan node run`: bring the node up, then keep it right.

Every `interval` seconds it compares the kernel with the plan and repairs
what differs (a deleted device, route, neighbour entry, qdisc or program
comes back within one interval plus the repair), puts back the node side
of the pods' port guards every `guard_interval` seconds, reloads the
conflist when it changes, keeps the plugin server running, serves /healthz and
/metrics, and installs the conflist for the kubelet only once the node is
up. SIGTERM ends the loop and leaves the datapath in place, so pods keep
their traffic while the agent restarts or is upgraded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cni_fan.net.errors import UnderlayError
from cni_fan.node.conf import NodeConfig, NodeConfigError, load_conflist
from cni_fan.node.datapath import NodeDatapath
from cni_fan.node.metrics import AgentMetrics

log = logging.getLogger("cni_fan.agent")

# How often the pods' port guards are swept. Each sweep reads a few netlink
# messages per pod while ADDs and DELs wait for the lock, so not every
# second (its measured cost is in docs/operations.md, under troubleshooting).
GUARD_SWEEP_SECONDS = 10.0


def install_conflist(conf: NodeConfig, conf_dir: str) -> Path:
    """Write, then rename: the kubelet never reads half a file."""
    target = Path(conf_dir) / Path(conf.path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    data = Path(conf.path).read_bytes()
    if target.exists() and target.read_bytes() == data:
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    log.info("installed %s", target)
    return target


class Agent:
    def __init__(self, conflist: str, cni_conf_dir: str | None = None, interval: float = 1.0,
                 plugin_server: bool = True, guard_interval: float = GUARD_SWEEP_SECONDS) -> None:
        self.conflist = conflist
        self.cni_conf_dir = cni_conf_dir
        self.interval = interval
        self.want_plugin_server = plugin_server
        self.stopping = threading.Event()
        self.datapath: NodeDatapath | None = None
        self.conf: NodeConfig | None = None
        self.conf_digest = ""
        self.server: subprocess.Popen | None = None
        self.metrics = AgentMetrics(self)
        self.healthy = False
        self.http: ThreadingHTTPServer | None = None
        self.guard_sweep_seconds = guard_interval
        self._next_guard_sweep = 0.0

    # -- configuration ----------------------------------------------------------
    def _digest(self) -> str:
        try:
            return hashlib.sha256(Path(self.conflist).read_bytes()).hexdigest()
        except OSError:
            return ""

    def _load(self) -> None:
        """(Re)read the conflist; a changed plan replaces the datapath."""
        digest = self._digest()
        if digest == self.conf_digest and self.datapath is not None:
            return
        conf = load_conflist(self.conflist)
        # Health and metrics answer (503) while the node cannot be set up yet.
        self._start_http(conf)
        new = NodeDatapath(conf.fan)
        if self.datapath is not None:
            old = self.datapath.plan
            if new.plan != old:
                # Pods hang on the bridge: keep it when it stays the same one.
                keep = (new.plan.bridge, new.plan.primary.slice, new.plan.primary.gateway) == \
                    (old.bridge, old.primary.slice, old.primary.gateway)
                log.info("conflist changed the plan: replacing the datapath%s",
                         " (keeping bridge %s and its pods)" % old.bridge if keep else "")
                self.datapath.down(keep=("bridge",) if keep else ())
            self.datapath.close()
        self.datapath, self.conf, self.conf_digest = new, conf, digest
        log.info("%s", self.direct_routing_line().strip())

    def direct_routing_line(self) -> str:
        """Whether packets to the node's segment leave unencapsulated, for the log and /healthz."""
        plan = None if self.datapath is None else self.datapath.plan
        if plan is None:
            return ""
        if plan.direct:
            return f"direct routing: on in segment {plan.segment} ({plan.underlay_ifname})\n"
        return f"direct routing: off (segment {plan.segment or 'unknown'})\n"

    # -- loop -----------------------------------------------------------------
    def reconcile(self) -> None:
        try:
            self._load()
        except NodeConfigError as exc:
            log.error("cannot use the conflist: %s", exc)
            self.healthy = False
            return
        except UnderlayError as exc:  # e.g. no underlay address yet: expected, no traceback
            log.error("node not ready: %s", exc)
            self.healthy = False
            return
        assert self.datapath is not None and self.conf is not None
        fixed = self.datapath.up()
        real = [p for p in fixed if not p.startswith("sysctl ")]
        if real:
            self.metrics.repairs.inc(len(real))
            for problem in real:
                log.warning("repaired: %s", problem)
        self.healthy = self.datapath.is_up()
        if self.healthy and time.monotonic() >= self._next_guard_sweep:
            self._next_guard_sweep = time.monotonic() + self.guard_sweep_seconds
            guards = self.datapath.repair_guards()
            if guards:
                self.metrics.repairs.inc(len(guards))
                for problem in guards:
                    log.warning("repaired port guard: %s", problem)
        if self.healthy and self.cni_conf_dir:
            install_conflist(self.conf, self.cni_conf_dir)
        if self.want_plugin_server:
            self._keep_plugin_server()

    def _keep_plugin_server(self) -> None:
        assert self.conf is not None
        if self.server is not None and self.server.poll() is None:
            return
        if self.server is not None:
            log.warning("plugin server exited with %s; restarting it", self.server.returncode)
        argv = [sys.executable, "-m", "cni_fan", "serve", "--socket", self.conf.fan.params.agent_socket]
        if getattr(sys, "frozen", False):
            # The bundle's one executable is `cni-fan`, `fan` or `fan-ipam`
            # by the name it is started as (build.spec), and sys.executable
            # may be a symlink of another name: start it as `cni-fan`.
            argv = ["cni-fan", "serve", "--socket", self.conf.fan.params.agent_socket]
        self.server = subprocess.Popen(argv, executable=sys.executable, stdin=subprocess.DEVNULL)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        log.info("agent starting with %s", self.conflist)
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    self.reconcile()
                except Exception:
                    self.healthy = False
                    log.exception("reconcile failed; retrying")
                self.stopping.wait(max(0.05, self.interval - (time.monotonic() - started)))
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        log.info("agent stopping; the datapath stays in place")
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
        if self.http is not None:
            self.http.shutdown()
        if self.datapath is not None:
            self.datapath.close()

    # -- http -----------------------------------------------------------------
    def _start_http(self, conf: NodeConfig) -> None:
        if self.http is not None:
            return
        agent = self
        fan = conf.fan

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/healthz":
                    body, code = (b"ok\n", 200) if agent.healthy else (b"datapath not up\n", 503)
                    body += agent.direct_routing_line().encode()
                    ctype = "text/plain"
                elif self.path == "/metrics":
                    body, ctype = agent.metrics.render()
                    code = 200
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the prober gave up; nothing to tell it

            def log_message(self, *args) -> None:
                pass

        try:
            self.http = ThreadingHTTPServer((fan.metrics_address, fan.metrics_port), Handler)
        except OSError as exc:
            log.error("cannot serve health and metrics on %s:%d: %s", fan.metrics_address, fan.metrics_port,
                      exc.strerror)
            return
        threading.Thread(target=self.http.serve_forever, name="http", daemon=True).start()
        log.info("health and metrics on http://%s:%d/", fan.metrics_address, fan.metrics_port)
