"""Helpers for the kernel integration tests: namespaces, fake nodes, runners.

Everything here works on network namespaces whose names start with a
per-run prefix (`tfan-<random>-`), so a test never touches the host's own
interfaces, routes or firewall. Every object that creates something in the
kernel or starts a process knows how to remove it again; the fixtures in
conftest.py call those clean-ups even when a test fails.

Two ways to call the plugin, as a runtime would:

- `cnitool(...)`: the real cnitool (Debian's libcni 1.1.x) with a conflist,
  run inside the node namespace;
- `run_plugin(...)`: the plugin executable itself with the CNI environment
  and the config on stdin (needed for cniVersion 1.1.0, GC, STATUS, and for
  asserting exact error codes, which cnitool does not show).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from cni_fan.net.tombstone import TOMBSTONE_PREFIX
from harness.ping import ping_argv
from harness.system import BASE_ENV, CNI_BIN, CNI_FAN, CNITOOL, LIBCNI_CACHE, REFERENCE_BIN, run

NETNS_DIR = Path("/var/run/netns")
PREFIX = f"tfan-{secrets.token_hex(3)}-"
ALL_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


_serial = itertools.count(1)


def unique_name(kind: str) -> str:
    # A serial, not random bits: 16 random bits collided among the few
    # hundred namespaces one run creates ("File exists").
    name = f"{PREFIX}{kind}-{next(_serial)}"
    assert len(name) <= 64
    return name


# -- namespaces ---------------------------------------------------------------

class Netns:
    """A named network namespace (`ip netns add`), removed by `delete()`.

    harness/nodelab.py's namespaces are a subclass: named by their lab, under
    /run/netns.
    """

    netns_dir = NETNS_DIR

    def __init__(self, kind: str) -> None:
        self._create(unique_name(kind))

    @classmethod
    def named(cls, name: str) -> "Netns":
        """A namespace with exactly this name, for a lab that names its own."""
        ns = cls.__new__(cls)
        ns._create(name)
        return ns

    def _create(self, name: str) -> None:
        """`ip netns add` with the loopback up; the namespace is removed again if that fails."""
        self.name = name
        self._exec(["ip", "netns", "add", self.name])
        self.path = str(self.netns_dir / self.name)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def _exec(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Every command of this namespace runs through here."""
        return run(argv, check=check, **kwargs)

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    def argv(self, *argv: str) -> list[str]:
        """`argv` run inside this namespace (nsenter execs it: same pid)."""
        return ["nsenter", f"--net={self.path}", *map(str, argv)]

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return self._exec(self.argv(*argv), check=check, **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._exec(["ip", "-n", self.name, *map(str, args)], check=check)

    def ip_json(self, *args: str) -> list[dict]:
        out = self._exec(["ip", "-j", "-n", self.name, *map(str, args)]).stdout
        return json.loads(out) if out.strip() else []

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def delete(self) -> None:
        if self.exists():
            self._exec(["ip", "netns", "del", self.name], check=False)

    # -- observations -----------------------------------------------------

    def links(self) -> dict[str, dict]:
        return {link["ifname"]: link for link in self.ip_json("-d", "link", "show")}

    def link(self, name: str) -> dict | None:
        return self.links().get(name)

    def ports_of(self, bridge: str) -> set[str]:
        return {name for name, link in self.links().items() if link.get("master") == bridge}

    def ipv4_addrs(self, ifname: str | None = None) -> set[str]:
        args = ["-4", "addr", "show"] + (["dev", ifname] if ifname else [])
        out = set()
        for link in self.ip_json(*args):
            for a in link.get("addr_info", []):
                out.add(f"{a['local']}/{a['prefixlen']}" if ifname else f"{link['ifname']} {a['local']}/{a['prefixlen']}")
        return out

    def ipv4_routes(self) -> set[str]:
        """Every IPv4 route of every table. "linkdown" is left out: it follows the
        carrier of the device (a bridge gets one a moment after its first port
        comes up), not anything a plugin configured."""
        out = set()
        for route in self.ip_json("-4", "route", "show", "table", "all"):
            route["flags"] = [f for f in route.get("flags", []) if f != "linkdown"]
            out.add(json.dumps(route, sort_keys=True))
        return out

    def default_gateway(self, ifname: str = "eth0") -> str | None:
        for r in self.ip_json("-4", "route", "show", "default"):
            if r.get("dev") == ifname:
                return r.get("gateway")
        return None

    def ping(self, address: str, count: int = 1) -> bool:
        """Whether one ping(8) run from here gets its answers.
        -W 2: generous; a pod that cannot reach the address fails the same way."""
        return self.run(*ping_argv(address, count, wait=2), check=False).returncode == 0

    def tombstones(self) -> set[str]:
        """Host veths a DEL cut off and renamed, not deleted yet (cni_fan/net/tombstone.py)."""
        return {name for name in self.links() if name.startswith(TOMBSTONE_PREFIX)}

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until the veths DELs deleted after answering are gone (their teardown takes the
        kernel a few hundredths of a second); a tombstone still here after `timeout` is a leak."""
        deadline = time.monotonic() + timeout
        while self.tombstones() and time.monotonic() < deadline:
            time.sleep(0.05)

    def snapshot(self) -> dict[str, Any]:
        """What an error must not change: links (name, kind, master), IPv4 addresses, IPv4 routes.

        Taken once the tombstones of earlier DELs are gone (`settle`); any left show as links."""
        self.settle()
        links = {}
        for name, link in self.links().items():
            kind = (link.get("linkinfo") or {}).get("info_kind", "")
            links[name] = (kind, link.get("master", ""), link.get("mtu"), "UP" in link.get("flags", []))
        return {"links": links, "addrs": self.ipv4_addrs(), "routes": self.ipv4_routes()}


def leftover_namespaces() -> list[str]:
    """Namespaces of this run that still exist."""
    return [name for name in (os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []) if name.startswith(PREFIX)]


def make_node(kind: str = "node", underlay: Iterable[tuple[str, str]] = (("u0", "198.18.1.10/16"),)) -> Netns:
    """A fake node: a namespace whose veths `u0`, `u1`... carry underlay addresses.

    The kernel here has no dummy module, so each "NIC" is a veth whose peer
    stays in the node (both ends up, so the address is usable).
    """
    node = Netns(kind)
    try:
        add_underlay(node, underlay)
    except BaseException:
        node.delete()
        raise
    return node


def add_underlay(node: Netns, underlay: Iterable[tuple[str, str]]) -> None:
    """Each (ifname, cidr): a veth `ifname` with the address, its peer
    `<ifname>p` left in the node, both up."""
    for ifname, cidr in underlay:
        node.ip("link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p")
        node.ip("addr", "add", cidr, "dev", ifname)
        node.ip("link", "set", ifname, "up")
        node.ip("link", "set", f"{ifname}p", "up")


# -- configs ------------------------------------------------------------------

def fan_plugin_conf(data_dir: Path, socket: str, overlay: str = "241.0.0.0/8",
                    underlay: str = "198.18.0.0/16", **extra) -> dict[str, Any]:
    return {"type": "fan", "overlay": overlay, "underlay": underlay, "dataDir": str(data_dir),
            "agentSocket": socket, **extra}


def netconf(name: str, version: str, plugin: dict[str, Any]) -> dict[str, Any]:
    """The config a runtime hands a single plugin (what stdin carries)."""
    return {"cniVersion": version, "name": name, **plugin}


def conflist(name: str, version: str, *plugins: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version, "name": name, "plugins": list(plugins)}
    if version == "1.0.0":
        out["cniVersions"] = ["1.0.0", "1.1.0"]
    return out


def write_conflist(directory: Path, conf: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{conf['name']}.conflist"
    path.write_text(json.dumps(conf, indent=1))
    return path


# -- running the plugin -------------------------------------------------------

@dataclass
class Outcome:
    """One CNI call: exit code, stdout, stderr, stdout as JSON (None if empty)."""

    code: int
    stdout: str
    stderr: str
    pid: int = 0

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def log_pids(self) -> set[int]:
        """The pids in the plugin's log lines (`... [pid] ...`)."""
        return {int(m) for m in re.findall(r" cni_fan[.\w]* \[(\d+)\] ", self.stderr)}

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def cni_env(command: str, container_id: str = "", netns: str = "", ifname: str = "eth0",
            args: str = "", path: str = f"{CNI_BIN}:{REFERENCE_BIN}", **extra: str) -> dict[str, str]:
    env = dict(BASE_ENV)
    env.update({"CNI_COMMAND": command, "CNI_PATH": path})
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    if args:
        env["CNI_ARGS"] = args
    env.update(extra)
    return env


def plugin_argv(node: Netns, plugin: str = "fan") -> list[str]:
    return node.argv(str(CNI_BIN / plugin))


def run_plugin(node: Netns, env: dict[str, str], stdin: dict | bytes | str, plugin: str = "fan",
               timeout: float = 60) -> Outcome:
    """Run the plugin as a runtime does: env, stdin, inside the node namespace."""
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else (
        stdin.encode() if isinstance(stdin, str) else stdin)
    proc = subprocess.Popen(plugin_argv(node, plugin), env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(data, timeout=timeout)
    return Outcome(proc.returncode, out.decode(), err.decode(), pid=proc.pid)


def start_plugin(node: Netns, env: dict[str, str], stdin: dict, plugin: str = "fan") -> subprocess.Popen:
    """Start the plugin without waiting (for concurrency and kill tests)."""
    proc = subprocess.Popen(plugin_argv(node, plugin), env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(json.dumps(stdin).encode())
    except BrokenPipeError:
        pass
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    proc.stdin = None  # so that communicate() does not touch it again
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> Outcome:
    """Wait until the call started by `start_plugin` is over, and collect what it printed.

    Over means stdout and stderr are closed by everyone, not just that the
    process exited: in server mode the server's child holds the client's
    stderr until the call it took over ends, even when the client was killed.
    """
    stdout, stderr = proc.communicate(timeout=timeout)
    return Outcome(proc.returncode, stdout.decode(), stderr.decode(), pid=proc.pid)


def cnitool_container_id(netns_path: str) -> str:
    """The container ID cnitool derives from the netns path."""
    return "cnitool-" + hashlib.sha512(os.path.abspath(netns_path).encode()).hexdigest()[:20]


def cnitool_argv(node: Netns, verb: str, network: str, pod_path: str) -> list[str]:
    return node.argv(str(CNITOOL), verb, network, pod_path)


def cnitool_env(conf_dir: Path, ifname: str = "eth0", args: str = "",
                path: str = f"{CNI_BIN}:{REFERENCE_BIN}") -> dict[str, str]:
    env = dict(BASE_ENV, NETCONFPATH=str(conf_dir), CNI_PATH=path, CNI_IFNAME=ifname)
    if args:
        env["CNI_ARGS"] = args
    return env


def cnitool(node: Netns, verb: str, network: str, pod_path: str, conf_dir: Path, ifname: str = "eth0",
            path: str = f"{CNI_BIN}:{REFERENCE_BIN}", timeout: float = 60) -> Outcome:
    proc = subprocess.run(cnitool_argv(node, verb, network, pod_path), capture_output=True, text=True,
                          env=cnitool_env(conf_dir, ifname, path=path), timeout=timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, pid=0)


def forget_libcni_cache(container_id: str) -> None:
    """cnitool (libcni) caches results under /var/lib/cni; DEL removes them, a failed test may not."""
    if LIBCNI_CACHE.is_dir():
        for path in LIBCNI_CACHE.glob(f"*-{container_id}-*"):
            path.unlink(missing_ok=True)


def libcni_cache_entries(container_id: str) -> list[Path]:
    return list(LIBCNI_CACHE.glob(f"*-{container_id}-*")) if LIBCNI_CACHE.is_dir() else []


# -- the plugin server --------------------------------------------------------

class PluginServer:
    """`cni-fan serve` started inside a node namespace (`args` added to its
    command line, its output appended to `log`); `stop()` ends it and every
    child it forked. `prefix`: run it through that (e.g. system.capped_argv,
    the agent container's capabilities only)."""

    def __init__(self, node: Netns, socket: Path, log: Path, *args: str, start_timeout: float = 30,
                 prefix: Sequence[str] = ()) -> None:
        self.socket = socket
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(node.argv(*prefix, str(CNI_FAN), "serve", "--socket", str(socket), *args),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(BASE_ENV), start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cni-fan serve did not come up: {log.read_text()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Its pre-forked children are in the process group it leads; none may outlive the test.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


@dataclass
class Mode:
    """Local (in-process) or server mode: what `agentSocket` the configs carry."""

    name: str
    socket: str
    server: PluginServer | None = None


@contextlib.contextmanager
def serving(mode: str, node: Netns, tmp: Path) -> Iterator[Mode]:
    """The plugin-mode fixtures' body: "local" (the configs' `agentSocket` names no socket) or
    "server" (a `cni-fan serve` in `node`, its socket under `tmp`, checked alive after the tests)."""
    if mode == "local":
        yield Mode("local", str(tmp / "no-agent.sock"))
        return
    server = PluginServer(node, tmp / "plugin.sock", tmp / "serve.log")
    try:
        yield Mode("server", str(server.socket), server)
        assert server.alive(), f"cni-fan serve died during the tests: {server.log_path.read_text()}"
    finally:
        server.stop()


# -- telling the modes apart ---------------------------------------------------

class Shim:
    """Plugins on CNI_PATH that record each call (pid, command, raw stdout)
    and then exec the installed launcher: same process, same behaviour.

    The pid tells where a call ran: the plugin's log lines carry the pid of
    the process that did the work, which in server mode is a child of the
    server, never the process the runtime started.
    """

    def __init__(self, directory: Path, plugins: Iterable[str] = ("fan", "fan-ipam")) -> None:
        self.dir = directory
        (directory / "calls").mkdir(parents=True)
        for plugin in plugins:
            script = directory / plugin
            script.write_text(
                "#!/bin/bash\n"
                "set -o pipefail\n"
                f"base=$(mktemp {directory}/calls/XXXXXXXX)\n"
                f"( echo \"$BASHPID $CNI_COMMAND\" > \"$base.call\"; exec {CNI_BIN}/{plugin} \"$@\" )"
                " | tee \"$base.out\"\n")
            script.chmod(script.stat().st_mode | stat.S_IXUSR)
        self.path = f"{directory}:{CNI_BIN}:{REFERENCE_BIN}"

    def calls(self) -> list[tuple[int, str, str]]:
        """(pid, command, raw stdout) of every call so far."""
        out = []
        for call in sorted(self.dir.glob("calls/*.call")):
            pid, command = call.read_text().split()
            out.append((int(pid), command, Path(str(call)[:-5] + ".out").read_text()))
        return out

    def pids(self) -> set[int]:
        return {pid for pid, _, _ in self.calls()}


def assert_ran_in(mode: Mode, out: Outcome, launched: set[int]) -> None:
    """Local: the logging process is one the runtime started; server: it is not."""
    logged = out.log_pids()
    assert logged, f"no log line of the plugin to tell where the call ran:\n{out}"
    if mode.name == "local":
        assert logged <= launched, f"a local call was answered by another process: {logged} vs {launched}"
    else:
        assert not logged & launched, f"the call did not go through the plugin server: {logged}"
