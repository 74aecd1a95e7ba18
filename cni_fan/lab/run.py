"""Bring a lab up, check it, tear it down.

`up` builds the namespaces (cni_fan.lab.netns), installs the plugin
launchers, starts the real node agent in every node namespace and adds
every pod with the real `fan` plugin, called as a runtime calls it.
`check` pings everything from everything, checks the masquerade towards
`ext` and looks for per-peer state on every node (see `peer_state`).
`down` stops the agents, removes the namespaces and the lab's files.

Processes: the only ones this module ends are the agents it started (by
the pid in their pid file, after checking the command line names the lab's
conflist) and processes still running inside the lab's own namespaces.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import netaddr

from cni_fan.lab import netns
from cni_fan.lab.topology import (EXT_ADDRESS, EXT_IF, EXT_PORT, LAB_ROOT, METRICS_PORT, NODE_UNDERLAY_IF,
                                  PHANTOM_HOST, POD_IF, UNDERLAY_BRIDGE, UNDERLAY_MTU, LabSpec, Node, Pod,
                                  check_prefix, cni_env, lab_namespace_re, runtime_config)

AGENT_TIMEOUT = 60.0
ROUTES_AGENT_TIMEOUT = 300.0  # `fanmap: routes` puts ~196,000 entries in the kernel first
PLUGIN_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Say = Callable[[str], None]


class LabError(RuntimeError):
    """The lab could not be built, found or removed; the message says why."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- commands run inside namespaces --------------------------------------------

def cni_fan_argv() -> list[str]:
    """How to run `cni-fan` with this very installation."""
    script = Path(sys.executable).with_name("cni-fan")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cni_fan.cli import main; sys.argv[0] = 'cni-fan'; main()"]


def _ip() -> str:
    return shutil.which("ip", path=BASE_PATH) or "ip"


def in_netns(ns: str, argv: list[str]) -> list[str]:
    """argv run in namespace `ns` the way an operator would (`ip netns exec`
    execs it: same pid; /sys shows the namespace's own devices)."""
    return [_ip(), "netns", "exec", ns, *argv]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A small, predictable environment for what the lab starts."""
    env = {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def _tail(path: str, lines: int = 12, width: int = 300) -> str:
    """The end of a log, readable in an error message: long lines cut,
    runs of the same message (timestamps aside) shown once with a count."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    out: list[list] = []  # [line, count]
    for line in text.splitlines()[-200:]:
        key = line.split(" ", 1)[1] if line.startswith("ts=") and " " in line else line
        if out and out[-1][2] == key:
            out[-1][1] += 1
        else:
            out.append([line, 1, key])
    shown = []
    for line, count, _ in out[-lines:]:
        line = line if len(line) <= width else f"{line[:width // 2]} ... {line[-width // 2:]}"
        shown.append(line + (f"  (x{count})" if count > 1 else ""))
    return "\n".join(shown) or "(empty log)"


# -- state on disk -------------------------------------------------------------

def lab_root(prefix: str) -> Path:
    return Path(LAB_ROOT) / check_prefix(prefix)


def load_state(prefix: str) -> dict:
    path = lab_root(prefix) / "lab.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab with prefix {prefix!r} ({path} is missing); start one with "
                       f"`cni-fan lab up --prefix {prefix}`") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {path}: {exc}") from None


def _save_state(spec: LabSpec, phase: str, pods: dict[str, dict] | None = None) -> None:
    state = {"spec": spec.to_dict(), "phase": phase, "pods": pods or {},
             "nodes": {n.short: {"netns": n.netns, "address": str(n.address), "slice": str(n.slice),
                                 "gateway": str(n.gateway), "conflist": n.conflist_path, "log": n.log_path}
                       for n in spec.all_nodes}}
    path = Path(spec.state_file)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def existing_parts(prefix: str) -> list[str]:
    """What of a lab with `prefix` is present: namespaces and its directory."""
    pattern = lab_namespace_re(prefix)
    found = [n for n in netns.list_namespaces() if pattern.match(n)]
    if lab_root(prefix).exists():
        found.append(str(lab_root(prefix)))
    return found


# -- up ------------------------------------------------------------------------

@dataclass
class Agent:
    node: Node
    proc: subprocess.Popen | None = None


def _start_agent(node: Node) -> Agent:
    log = open(node.log_path, "ab")
    try:
        proc = subprocess.Popen(in_netns(node.netns, [*cni_fan_argv(), "node", "run", "--conflist", node.conflist_path]),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True, close_fds=True)
    finally:
        log.close()
    Path(node.pid_path).write_text(f"{proc.pid}\n")
    return Agent(node, proc)


def healthz(node: Node, timeout: float = 3.0) -> tuple[bool, str]:
    """GET /healthz on the node's metrics port, from inside the node."""
    try:
        with netns.entered(node.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", METRICS_PORT))
            sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except (OSError, netns.LabNetError) as exc:
        return False, f"healthz: {exc}"
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return status.split(" ")[1:2] == ["200"], status


def node_show(node: Node, timeout: float = 20.0) -> dict:
    """`cni-fan node show --json` inside the node; {"error": ...} if it fails."""
    try:
        proc = subprocess.run(in_netns(node.netns, [*cni_fan_argv(), "node", "show", "--conflist", node.conflist_path,
                                                    "--json"]),
                              capture_output=True, text=True, timeout=timeout, env=_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"`cni-fan node show` did not answer within {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")[-500:]}
    try:
        shown = json.loads(proc.stdout)
    except ValueError:
        return {"error": f"not JSON: {proc.stdout[:200]!r}"}
    return shown if isinstance(shown, dict) else {"error": f"not a JSON object: {proc.stdout[:200]!r}"}


def _wait_for_agents(agents: list[Agent], timeout: float, say: Say) -> None:
    deadline = time.monotonic() + timeout
    pending = {a.node.short: a for a in agents}
    last: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(agents))) as pool:
        while pending:
            for name, agent in list(pending.items()):
                code = agent.proc.poll() if agent.proc else None
                if code is not None:
                    raise LabError(f"the node agent of {agent.node.netns} exited with code {code} before it was up; "
                                   f"its log ({agent.node.log_path}) ends with:\n{_tail(agent.node.log_path)}")
            results = dict(zip(pending, pool.map(healthz, [a.node for a in pending.values()])))
            for name, (ok, status) in results.items():
                last[name] = status
                if ok:
                    say(f"  agent up on {pending[name].node.netns}")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                lines = []
                for name, agent in pending.items():
                    shown = node_show(agent.node)
                    summary = (f"up={shown.get('up')}; problems: {'; '.join(map(str, shown['problems']))}"
                               if isinstance(shown.get("problems"), list) else json.dumps(shown)[:300])
                    lines.append(f"{agent.node.netns}: {last.get(name)}; node show: {summary[:600]}\n"
                                 f"  log ({agent.node.log_path}):\n" +
                                 "\n".join("    " + l for l in _tail(agent.node.log_path, 15).splitlines()))
                raise LabError(f"node agent not up within {timeout:.0f} s (no 200 from "
                               f"http://127.0.0.1:{METRICS_PORT}/healthz inside the node):\n" + "\n".join(lines))
            if pending:
                time.sleep(0.2)


def agent_timeout(spec: LabSpec) -> float:
    return ROUTES_AGENT_TIMEOUT if spec.fanmap == "routes" else AGENT_TIMEOUT


def run_plugin(spec: LabSpec, node: Node, pod: Pod, command: str = "ADD",
               timeout: float = PLUGIN_TIMEOUT) -> tuple[int, dict | None, str]:
    """Call the installed `fan` as a runtime does: in the node's namespace,
    with the CNI environment and the runtime config on stdin.
    Returns (exit code, decoded stdout or None, stderr)."""
    conflist = json.loads(Path(node.conflist_path).read_text())
    stdin = json.dumps(runtime_config(conflist)).encode()
    plugin = f"{spec.bin_dir}/{conflist['plugins'][0]['type']}"
    try:
        proc = subprocess.run(in_netns(node.netns, [plugin]), input=stdin, capture_output=True, timeout=timeout,
                              env=_env(cni_env(command, pod, spec.bin_dir)))
    except subprocess.TimeoutExpired:
        return 124, None, f"{command} took longer than {timeout:.0f} s"
    out = proc.stdout.decode(errors="replace")
    try:
        decoded = json.loads(out) if out.strip() else None
    except ValueError:
        decoded = {"raw": out}
    return proc.returncode, decoded, proc.stderr.decode(errors="replace")


def _add_pod(spec: LabSpec, node: Node, pod: Pod) -> dict:
    netns.create(pod.netns)
    code, result, err = run_plugin(spec, node, pod, "ADD")
    if code != 0 or not isinstance(result, dict) or not result.get("ips"):
        raise LabError(f"`fan` ADD for {pod.netns} on {node.netns} failed (exit {code}): "
                       f"{json.dumps(result) if result is not None else ''} {err.strip()[-800:]}".rstrip())
    address = result["ips"][0]["address"]
    return {"node": node.short, "netns": pod.netns, "container_id": pod.container_id, "ifname": POD_IF,
            "address": address.split("/")[0], "cidr": address, "gateway": result["ips"][0].get("gateway")}


@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def up(spec: LabSpec, *, force: bool = False, timeout: float = AGENT_TIMEOUT, keep_on_error: bool = False,
       say: Say = _stderr) -> dict:
    """Build the lab; returns its state (what lab.json holds)."""
    from cni_fan.install import install_plugins

    present = existing_parts(spec.prefix)
    if present:
        if not force:
            raise LabError(f"a lab with prefix {spec.prefix!r} already exists ({', '.join(present[:6])}"
                           f"{' ...' if len(present) > 6 else ''}); run `cni-fan lab down --prefix {spec.prefix}` "
                           f"first, or `cni-fan lab up --force` to replace it")
        say(f"lab {spec.prefix}: replacing the existing lab (--force)")
        down(spec.prefix, say=say)
    started = time.monotonic()
    try:
        root = Path(spec.root)
        root.mkdir(parents=True, mode=0o755)
        _save_state(spec, "building")
        install_plugins(spec.bin_dir)
        netns.create(spec.underlay_netns)
        netns.make_bridge(spec.underlay_netns, UNDERLAY_BRIDGE, UNDERLAY_MTU)
        netns.create(spec.ext_netns)
        netns.plug(spec.underlay_netns, UNDERLAY_BRIDGE, EXT_PORT, spec.ext_netns, EXT_IF, spec.ext_cidr,
                   UNDERLAY_MTU)
        for node in spec.all_nodes:
            netns.create(node.netns)
            netns.plug(spec.underlay_netns, UNDERLAY_BRIDGE, node.port, node.netns, NODE_UNDERLAY_IF, node.cidr,
                       UNDERLAY_MTU)
            Path(node.dir).mkdir(parents=True, exist_ok=True)
            Path(node.conflist_path).write_text(json.dumps(spec.conflist(node), indent=2) + "\n")
        say(f"lab {spec.prefix}: underlay, ext and {spec.nodes} node namespaces ready; starting the node agents")
        agents = [_start_agent(node) for node in spec.all_nodes]
        _wait_for_agents(agents, timeout, say)
        pods: dict[str, dict] = {}
        if spec.pods_per_node:
            say(f"lab {spec.prefix}: adding {spec.nodes * spec.pods_per_node} pods with the fan plugin")
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, spec.nodes)) as pool:
                # One node's pods in order (addresses predictable), nodes side by side.
                def add_node_pods(node: Node) -> list[dict]:
                    return [_add_pod(spec, node, pod) for pod in node.pods]
                for added in pool.map(add_node_pods, spec.all_nodes):
                    for entry in added:
                        pods[entry["netns"]] = entry
        _save_state(spec, "up", pods)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            say("interrupted")
        if keep_on_error:
            say(f"lab {spec.prefix}: left as it is for inspection (--keep-on-error); "
                f"`cni-fan lab down --prefix {spec.prefix}` removes it")
        else:
            say(f"lab {spec.prefix}: up failed; tearing down what was built")
            with _sigterm_ignored():  # a second SIGTERM must not cut the tear-down short
                try:
                    down(spec.prefix, say=lambda m: None)
                except Exception as cleanup:  # the first error is the one to show
                    say(f"lab {spec.prefix}: tear-down after the failure also failed: {cleanup}")
        hint = "" if keep_on_error else "\n(`lab up --keep-on-error` keeps a failed lab and its logs for inspection)"
        if isinstance(exc, (netns.LabNetError, OSError)):
            raise LabError(f"{exc}{hint}") from exc
        if isinstance(exc, LabError):
            raise LabError(f"{exc}{hint}") from exc
        raise
    state = load_state(spec.prefix)
    state["seconds"] = round(time.monotonic() - started, 2)
    return state


def describe(state: dict) -> str:
    spec = LabSpec.from_dict(state["spec"])
    lines = [f"lab {spec.prefix}: {spec.nodes} nodes x {spec.pods_per_node} pods, overlay {spec.overlay} over "
             f"{spec.underlay}, encap {spec.encap}, fanmap {spec.fanmap}",
             f"  {'namespace':<22} {'underlay':<15} {'slice / address':<18} gateway"]
    for node in spec.all_nodes:
        lines.append(f"  {node.netns:<22} {str(node.address):<15} {str(node.slice):<18} {node.gateway}")
        for pod in node.pods:
            entry = state.get("pods", {}).get(pod.netns, {})
            lines.append(f"    {pod.netns:<20} {'':<15} {entry.get('address', '?'):<18} {entry.get('gateway') or ''}")
    lines.append(f"  {spec.ext_netns:<22} {EXT_ADDRESS:<15} (outside the cluster)")
    lines.append(f"  files: {spec.root}  (agent logs: {spec.root}/n<i>/agent.log)")
    return "\n".join(lines)


# -- down ----------------------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _stop(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, wait, then SIGKILL; True when the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.05)
    return not _alive(pid)


def _pids_in(namespaces: Iterable[str]) -> dict[int, str]:
    """Processes whose network namespace is one of `namespaces` (as `ip netns pids`)."""
    inodes = {}
    for name in namespaces:
        try:
            inodes[os.stat(netns.netns_path(name)).st_ino] = name
        except OSError:
            pass
    found = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ino = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if ino in inodes:
            found[int(entry)] = inodes[ino]
    return found


def down(prefix: str, *, say: Say = _stderr) -> bool:
    """Remove the lab; True when nothing of it is left. Fine when it is gone."""
    check_prefix(prefix)
    root = lab_root(prefix)
    pattern = lab_namespace_re(prefix)
    names = [n for n in netns.list_namespaces() if pattern.match(n)]
    problems: list[str] = []
    # 1. The agents we started, by the pid we wrote (only if it is still that agent).
    agents = []
    for pid_file in sorted(root.glob("n*/agent.pid")) if root.exists() else []:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if str(pid_file.with_name("10-fan.conflist")) in _cmdline(pid):
            agents.append((pid, pid_file.parent.name))
    # 2. The agent's own clean-up of what lives outside the namespace (pins, say).
    downs = [(f"{prefix}{c.parent.name}", str(c)) for c in sorted(root.glob("n*/10-fan.conflist"))
             if f"{prefix}{c.parent.name}" in names] if root.exists() else []

    def node_down(node_ns: str, conflist: str) -> None:
        try:
            proc = subprocess.run(in_netns(node_ns, [*cni_fan_argv(), "node", "down", "--conflist", conflist]),
                                  capture_output=True, text=True, timeout=30, env=_env(), stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                say(f"  note: `cni-fan node down` in {node_ns} exited {proc.returncode}: "
                    f"{(proc.stderr.strip() or proc.stdout.strip())[-300:]}")
        except subprocess.TimeoutExpired:
            say(f"  note: `cni-fan node down` in {node_ns} took over 30 s; going on")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for (pid, node), stopped in zip(agents, pool.map(_stop, [pid for pid, _ in agents])):
            if not stopped:
                problems.append(f"agent pid {pid} ({node}) did not stop")
        list(pool.map(lambda job: node_down(*job), downs))
    # 3. Anything still running inside the lab's namespaces was started by the lab.
    for pid, name in sorted(_pids_in(names).items()):
        say(f"  stopping pid {pid} left in {name}: {_cmdline(pid)[:120]}")
        if not _stop(pid, timeout=3.0):
            problems.append(f"pid {pid} in {name} did not stop")
    # 4. Namespaces (pods first, the switch last): their devices go with them.
    order = sorted(names, key=lambda n: (n == f"{prefix}under", n == f"{prefix}ext", -len(n), n))
    for name in order:
        try:
            netns.remove(name)
        except netns.LabNetError as exc:
            problems.append(str(exc))
    # 5. Files.
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    try:
        Path(LAB_ROOT).rmdir()  # only when no other lab is left
    except OSError:
        pass
    left = existing_parts(prefix)
    if left:
        problems.append(f"still present: {', '.join(left)}")
    for problem in problems:
        say(f"lab {prefix}: {problem}")
    if names or not problems:
        say(f"lab {prefix}: {'removed' if names else 'nothing to remove'}"
            f"{'' if not problems else ' (with problems)'}")
    return not left and not problems


# -- check: pings --------------------------------------------------------------

ICMP_ECHO, ICMP_ECHOREPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo(ident: int, seq: int) -> bytes:
    payload = b"cni-fan lab check"
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, _checksum(header + payload), ident, seq) + payload


def ping_all(pairs: list[tuple[str, str]], *, timeout: float = 3.0, interval: float = 0.25) -> dict[tuple[str, str], float | None]:
    """Ping every (namespace, address) pair at once; round-trip seconds or None.

    One raw ICMP socket per source namespace, opened inside it; every pair
    has its own ICMP identifier, and a reply counts only if it comes from
    the pinged address. Requests are resent every `interval` (the first
    packet may wait for ARP) until `timeout`.
    """
    socks: dict[str, socket.socket] = {}
    try:
        for ns in sorted({src for src, _ in pairs}):
            with netns.entered(ns):
                socks[ns] = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            socks[ns].setblocking(False)
        base = random.randrange(1 << 16)
        ident = {pair: (base + k) & 0xFFFF for k, pair in enumerate(pairs)}
        by_ident = {(pair[0], ident[pair]): pair for pair in pairs}
        sent: dict[tuple[str, str], float] = {}
        answered: dict[tuple[str, str], float | None] = {pair: None for pair in pairs}
        start = time.monotonic()
        next_send, seq = start, 0
        by_fd = {s.fileno(): ns for ns, s in socks.items()}
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                seq += 1
                for pair in pairs:
                    if answered[pair] is None:
                        try:
                            socks[pair[0]].sendto(_echo(ident[pair], seq), (pair[1], 0))
                            sent.setdefault(pair, now)
                        except OSError:
                            pass  # no route yet, say: try again next round
                next_send = now + interval
            if all(v is not None for v in answered.values()):
                break
            ready, _, _ = select.select(list(by_fd), [], [], max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for fd in ready:
                ns = by_fd[fd]
                while True:
                    try:
                        data, (addr, _) = socks[ns].recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    ihl = (data[0] & 0x0F) * 4
                    if len(data) < ihl + 8 or data[ihl] != ICMP_ECHOREPLY:
                        continue
                    pair = by_ident.get((ns, struct.unpack("!H", data[ihl + 4:ihl + 6])[0]))
                    if pair is not None and pair[1] == addr and answered[pair] is None:
                        answered[pair] = time.monotonic() - sent.get(pair, start)
        return answered
    finally:
        for s in socks.values():
            s.close()


# -- check: the masquerade -----------------------------------------------------

def nat_probe(sources: dict[str, str], ext_ns: str, ext_address: str, *, timeout: float = 3.0) -> dict[str, dict]:
    """From each namespace in `sources` (name -> expected source address),
    reach a UDP echo server and a TCP listener in `ext_ns`; report the peer
    address ext saw, and whether the UDP echo came back.

    The servers are sockets opened inside ext by this process: ext itself
    sees the peer address, after any NAT on the way.
    """
    with netns.entered(ext_ns):
        udp_srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp_srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients_udp: dict[str, socket.socket] = {}
    clients_tcp: dict[str, socket.socket] = {}
    accepted: list[socket.socket] = []
    report = {name: {"expected": want, "udp_seen": None, "udp_echo": False, "tcp_seen": None}
              for name, want in sources.items()}
    try:
        udp_srv.bind((ext_address, 0))
        tcp_srv.bind((ext_address, 0))
        tcp_srv.listen(64)
        udp_srv.setblocking(False)
        tcp_srv.setblocking(False)
        port_udp, port_tcp = udp_srv.getsockname()[1], tcp_srv.getsockname()[1]
        for name in sources:
            with netns.entered(name):
                clients_udp[name] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                clients_tcp[name] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients_udp[name].setblocking(False)
            clients_tcp[name].setblocking(False)
            clients_tcp[name].connect_ex((ext_address, port_tcp))
        tcp_pending = dict(clients_tcp)
        start = time.monotonic()
        next_send = start
        pending_tokens: dict[socket.socket, bytes] = {}
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            if now >= next_send:
                for name, sock in clients_udp.items():
                    if not report[name]["udp_echo"]:
                        try:
                            sock.sendto(f"lab {name}".encode(), (ext_address, port_udp))
                        except OSError:
                            pass
                next_send = now + 0.3
            if all(r["udp_echo"] and r["tcp_seen"] for r in report.values()):
                break
            readers = [udp_srv, tcp_srv, *clients_udp.values(), *accepted]
            writers = list(tcp_pending.values())
            ready_r, ready_w, _ = select.select(readers, writers, [], max(0.0, min(next_send, start + timeout) - time.monotonic()))
            for sock in ready_w:
                name = next(n for n, s in tcp_pending.items() if s is sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        sock.send(f"lab {name}".encode())
                    except OSError:
                        pass
                del tcp_pending[name]
            for sock in ready_r:
                if sock is udp_srv:
                    try:
                        data, peer = udp_srv.recvfrom(2048)
                    except BlockingIOError:
                        continue
                    name = data.decode(errors="replace").removeprefix("lab ")
                    if name in report:
                        report[name]["udp_seen"] = peer[0]
                        udp_srv.sendto(f"seen {peer[0]}:{peer[1]}".encode(), peer)
                elif sock is tcp_srv:
                    try:
                        conn, peer = tcp_srv.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    pending_tokens[conn] = peer[0].encode()
                    accepted.append(conn)
                elif sock in accepted:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        continue
                    name = data.decode(errors="replace").removeprefix("lab ")
                    if name in report:
                        report[name]["tcp_seen"] = pending_tokens[sock].decode()
                    accepted.remove(sock)
                    sock.close()
                else:
                    name = next(n for n, s in clients_udp.items() if s is sock)
                    try:
                        data = sock.recv(2048)
                    except OSError:
                        continue
                    if data.startswith(b"seen "):
                        report[name]["udp_echo"] = True
        for entry in report.values():
            entry["ok"] = (entry["udp_seen"] == entry["expected"] and entry["udp_echo"]
                           and entry["tcp_seen"] == entry["expected"])
        return report
    finally:
        for sock in [udp_srv, tcp_srv, *clients_udp.values(), *clients_tcp.values(), *accepted]:
            sock.close()


# -- check: per-peer state -----------------------------------------------------

# iproute2 prints `"encap":"ip", ..., "dst":"<underlay>"` after a route's own
# "dst": the second key is renamed so a plain (fast) json.loads keeps both.
_ENCAP_DST = re.compile(r'("encap":"[^"]*"[^{}\[\]]*?)"dst":')


def parse_ip_json(text: str) -> list[dict]:
    """The output of `ip -j` / `bridge -j` as a list of objects; an encap
    destination becomes `encap_dst`."""
    text = text.strip()
    if not text:
        return []
    return json.loads(_ENCAP_DST.sub(r'\1"encap_dst":', text))


def _ip_json(ns: str, *args: str, tool: str = "ip") -> list[dict]:
    """`ip -j -n ns ...` (or `bridge`), parsed."""
    binary = shutil.which(tool, path=BASE_PATH) or tool
    proc = subprocess.run([binary, "-j", "-n", ns, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        if "nexthop" in args:  # an old kernel or iproute2 without nexthop objects
            return []
        raise LabError(f"{tool} -n {ns} {' '.join(args)}: {proc.stderr.strip()}")
    return parse_ip_json(proc.stdout)


def _v4(text: Any) -> tuple[int, int] | None:
    """(address as int, prefix length) of "a.b.c.d" or "a.b.c.d/n"; None otherwise."""
    if not isinstance(text, str) or not text or text == "default" or ":" in text:
        return None
    address, _, length = text.partition("/")
    try:
        value = struct.unpack("!I", socket.inet_aton(address))[0]
        bits = int(length) if length else 32
    except (OSError, ValueError):
        return None
    return (value, bits) if 0 <= bits <= 32 and address.count(".") == 3 else None


class PeerIndex:
    """Which remote node (or the phantom host) an address or prefix names:
    its underlay address, or anything inside its slice. One dict look-up
    per entry, so the 65,533-entry tables of `fanmap: routes` stay cheap."""

    def __init__(self, spec: LabSpec, node: Node) -> None:
        fan = spec.fan
        self.slice_len = fan.slice_prefixlen
        self.by_address: dict[int, str] = {}
        self.by_slice: dict[int, str] = {}
        self.address_of: dict[str, str] = {}
        hosts = [(n.short, n.address) for n in spec.all_nodes if n.index != node.index]
        hosts.append((PHANTOM, netaddr.IPAddress(PHANTOM_HOST)))
        for name, address in hosts:
            self.by_address[int(address)] = name
            self.by_slice[int(fan.slice_for(address).network) >> (32 - self.slice_len)] = name
            self.address_of[name] = str(address)

    def peer(self, text: Any) -> str | None:
        parsed = _v4(text)
        if parsed is None:
            return None
        value, bits = parsed
        if bits == 32 and value in self.by_address:
            return self.by_address[value]
        if bits >= self.slice_len:
            return self.by_slice.get(value >> (32 - self.slice_len))
        return None

    def underlay_peer(self, text: Any) -> str | None:
        parsed = _v4(text)
        return self.by_address.get(parsed[0]) if parsed and parsed[1] == 32 else None


PHANTOM = "phantom"


@dataclass
class NodeState:
    node: str
    counted: dict[str, list[str]] = field(default_factory=dict)   # per-peer state, by kind
    static: dict[str, int] = field(default_factory=dict)          # kind -> entries for remote nodes, also held for the phantom
    underlay_neigh: list[str] = field(default_factory=list)       # ordinary L2 state: reported, not counted
    entries: dict[str, int] = field(default_factory=dict)         # sizes of what was read

    @property
    def ok(self) -> bool:
        return not any(self.counted.values())


def peer_state(spec: LabSpec, node: Node) -> NodeState:
    """Look for per-peer overlay state on `node`.

    Per-peer state is kernel state about one remote node R (underlay address
    U_R, slice S_R) that the node holds because R exists. Counted, in the
    node's namespace:

    - routes (every table, IPv4) whose destination lies inside S_R (a
      prefix at least as long as the slice's), or whose gateway, next hop
      or encap destination is U_R or inside S_R; nexthop objects likewise;
    - neighbour entries (every state, `nud all`) for U_R or any address in
      S_R on any device but the node's underlay interface (so: the tunnel
      device, the fan bridge, anything else);
    - FDB entries whose VXLAN destination (`dst`) is U_R, on any device;
    - tunnel devices whose fixed `remote` is U_R.

    Not counted: the overlay-wide route and its next hop (they name no
    node), the node's own slice, and neighbour entries for U_R on the
    underlay interface (ordinary ARP of the underlay; reported under
    `underlay_neigh`).

    A table built for every possible host is not per-peer: if the node holds
    the same kind of state for an underlay address where no node is
    (PHANTOM_HOST), that kind is reported under `static` (with how many
    entries name remote nodes), not counted. Example: `fanmap: routes`,
    which installs a route, a neighbour and an FDB entry per possible host.
    """
    index = PeerIndex(spec, node)
    found: dict[str, dict[str, list[str]]] = {}  # kind -> peer -> entries
    result = NodeState(node.short)

    def note(kind: str, peer: str, text: str) -> None:
        found.setdefault(kind, {}).setdefault(peer, []).append(text)

    dumps = {"routes": ("-4", "route", "show", "table", "all"), "nexthops": ("nexthop", "show"),
             "neighbours": ("neigh", "show", "nud", "all"), "fdb": ("fdb", "show"), "links": ("-d", "link", "show")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(dumps)) as pool:
        futures = {kind: pool.submit(_ip_json, node.netns, *args, tool="bridge" if kind == "fdb" else "ip")
                   for kind, args in dumps.items()}
        tables = {kind: f.result() for kind, f in futures.items()}
    result.entries = {kind: len(rows) for kind, rows in tables.items()}
    for route in tables["routes"]:
        dst, gateway, encap_dst = route.get("dst"), route.get("gateway"), route.get("encap_dst")
        hops = [hop.get("gateway") for hop in route.get("nexthops") or [] if isinstance(hop, dict)]
        peer = next(filter(None, map(index.peer, (dst, gateway, encap_dst, *hops))), None)
        if peer:
            note("routes", peer, f"{dst} dev {route.get('dev')} table {route.get('table') or 'main'}"
                 + (f" via {gateway}" if gateway else "") + (f" encap dst {encap_dst}" if encap_dst else ""))
    for hop in tables["nexthops"]:
        peer = next(filter(None, map(index.peer, (hop.get("gateway"), hop.get("encap_dst")))), None)
        if peer:
            note("nexthops", peer, f"nexthop id {hop.get('id')} via {hop.get('gateway')}")
    for entry in tables["neighbours"]:
        dst, dev = entry.get("dst"), entry.get("dev")
        peer = index.peer(dst)
        if not peer:
            continue
        text = f"{dst} dev {dev} {' '.join(entry.get('state') or [])}".rstrip()
        if dev == NODE_UNDERLAY_IF and index.underlay_peer(dst):
            if peer != PHANTOM:
                result.underlay_neigh.append(text)
            continue
        note("neighbours", peer, text)
    for entry in tables["fdb"]:
        peer = index.underlay_peer(entry.get("dst"))
        if peer:
            note("fdb", peer, f"{entry.get('mac')} dev {entry.get('ifname')} dst {entry.get('dst')}")
    for link in tables["links"]:
        info = link.get("linkinfo") or {}
        data = info.get("info_data") if isinstance(info, dict) else None
        peer = index.underlay_peer(data.get("remote")) if isinstance(data, dict) else None
        if peer:
            note("tunnels", peer, f"{link.get('ifname')} ({info.get('info_kind')}) remote {index.address_of[peer]}")
    for kind, by_peer in found.items():
        entries = [f"{name}: {text}" for name, texts in sorted(by_peer.items()) if name != PHANTOM for text in texts]
        if not entries:
            continue
        if PHANTOM in by_peer:
            result.static[kind] = len(entries)
        else:
            result.counted[kind] = entries
    return result


# -- check: all of it ----------------------------------------------------------

@dataclass
class Endpoint:
    name: str      # row/column label: n1p2, n1, ext
    netns: str
    kind: str      # pod, node, ext
    address: str   # what others ping (pods: overlay address; nodes: gateway)
    node: str      # the node it is on ("" for ext)


def _endpoints(spec: LabSpec, state: dict) -> tuple[list[Endpoint], list[Endpoint], Endpoint]:
    pods, nodes = [], []
    for node in spec.all_nodes:
        nodes.append(Endpoint(node.short, node.netns, "node", str(node.gateway), node.short))
        for pod in node.pods:
            addresses = [c.split("/")[0] for c in netns.ipv4_of(pod.netns, POD_IF)] if netns.exists(pod.netns) else []
            recorded = state.get("pods", {}).get(pod.netns, {}).get("address")
            address = recorded if recorded in addresses or not addresses else addresses[0]
            pods.append(Endpoint(f"{node.short}p{pod.index}", pod.netns, "pod", address or "", node.short))
    ext = Endpoint("ext", spec.ext_netns, "ext", EXT_ADDRESS, "")
    return pods, nodes, ext


def check(prefix: str, *, timeout: float = 3.0) -> dict:
    """Everything `lab check` looks at, as a JSON-able report; report["ok"]."""
    state = load_state(prefix)
    spec = LabSpec.from_dict(state["spec"])
    missing = [n for n in spec.namespaces() if not netns.exists(n)]
    if missing:
        raise LabError(f"lab {prefix!r} is incomplete: missing namespaces {', '.join(missing[:8])}"
                       f"{' ...' if len(missing) > 8 else ''} (phase {state.get('phase')!r})")
    pods, nodes, ext = _endpoints(spec, state)
    node_by_short = {n.short: n for n in spec.all_nodes}
    started = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        health_f = [pool.submit(healthz, n, timeout=10.0) for n in spec.all_nodes]  # a busy agent answers late
        shown_f = {n.short: pool.submit(node_show, n) for n in spec.all_nodes}
        state_f = {n.short: pool.submit(peer_state, spec, n) for n in spec.all_nodes}

        # Who pings whom: every pod and node, to every pod, every node's gateway, and ext.
        targets = [*pods, *nodes, ext]
        matrix: dict[str, dict[str, str]] = {}
        pairs: list[tuple[str, str]] = []
        cell_pair: dict[tuple[str, str], tuple[str, str]] = {}
        for src in [*pods, *nodes]:
            row = matrix.setdefault(src.name, {})
            for dst in targets:
                if dst.name == src.name or not dst.address:
                    row[dst.name] = "self" if dst.name == src.name else "no address"
                    continue
                pair = (src.netns, dst.address)
                cell_pair[(src.name, dst.name)] = pair
                if pair not in pairs:
                    pairs.append(pair)
        # The masquerade probe runs beside the pings (its own thread, its own sockets).
        nat_f = pool.submit(nat_probe, {p.netns: str(node_by_short[p.node].address) for p in pods}, ext.netns,
                            ext.address, timeout=timeout) if pods else None
        rtts = ping_all(pairs, timeout=timeout)
        for (src, dst), pair in cell_pair.items():
            matrix[src][dst] = "ok" if rtts.get(pair) is not None else "FAIL"
        nat = nat_f.result() if nat_f is not None else {}
        states = {name: f.result() for name, f in state_f.items()}
        health = {n.short: f.result() for n, f in zip(spec.all_nodes, health_f)}
        shown = {name: f.result() for name, f in shown_f.items()}

    agents = {name: {"healthz": ok, "status": status, "show": shown[name]} for name, (ok, status) in health.items()}
    cells_ok = all(v in ("ok", "self") for row in matrix.values() for v in row.values())
    report = {
        "prefix": prefix,
        "spec": spec.to_dict(),
        "endpoints": {e.name: {"netns": e.netns, "kind": e.kind, "address": e.address, "node": e.node,
                               **({"underlay": str(node_by_short[e.name].address)} if e.kind == "node" else {})}
                      for e in [*pods, *nodes, ext]},
        "agents": agents,
        "matrix": matrix,
        "nat": {p.name: nat[p.netns] for p in pods},
        "peer_state": {name: {"ok": s.ok, "counted": s.counted, "static": s.static,
                              "underlay_neighbours": s.underlay_neigh, "entries_read": s.entries}
                       for name, s in states.items()},
        "seconds": None,
    }
    report["checks"] = {
        "agents": all(a["healthz"] for a in agents.values()),
        "pings": cells_ok,
        "nat": all(n["ok"] for n in report["nat"].values()),
        "no_per_peer_state": all(s.ok for s in states.values()),
    }
    report["ok"] = all(report["checks"].values())
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def format_report(report: dict, *, ascii_only: bool = False) -> str:
    good, bad, same = ("ok", "FAIL", "-") if ascii_only else ("✓", "✗", "·")
    mark = {"ok": good, "FAIL": bad, "self": same, "no address": "?"}
    ep = report["endpoints"]
    lines = [f"lab {report['prefix']}: {report['spec']['nodes']} nodes x {report['spec']['pods_per_node']} pods, "
             f"encap {report['spec']['encap']}, fanmap {report['spec']['fanmap']}"]
    lines.append("")
    lines.append("agents:")
    for name, agent in report["agents"].items():
        show = agent["show"]
        detail = (f"bridge {show.get('bridge')}, tunnel {show.get('tunnel')}, slice {show.get('slice')}"
                  if "error" not in show else f"node show: {show['error'][:120]}")
        lines.append(f"  {good if agent['healthz'] else bad} {name} {ep[name]['underlay']:<15} healthz "
                     f"{agent['status'] or '-'}; {detail}")
    cols = list(next(iter(report["matrix"].values()), {}).keys())
    width = max([4, *(len(c) for c in cols)]) + 1
    lines.append("")
    lines.append("ping (rows ping columns; a node column is its gateway, ext is outside the cluster):")
    legend = ", ".join(f"{n} {e['address']}" for n, e in ep.items())
    lines.append(f"  {legend}")
    lines.append("  " + " " * 7 + "".join(f"{c:>{width}}" for c in cols))
    for row, cells in report["matrix"].items():
        lines.append(f"  {row:<7}" + "".join(f"{mark.get(cells[c], '?'):>{width}}" for c in cols))
    lines.append("")
    lines.append("masquerade (pod -> ext: the source ext sees, expected the node's underlay address):")
    for pod, n in report["nat"].items():
        lines.append(f"  {good if n['ok'] else bad} {pod:<7} udp seen {n['udp_seen'] or '-':<15} "
                     f"echo {'back' if n['udp_echo'] else 'lost'}; tcp seen {n['tcp_seen'] or '-':<15} "
                     f"expected {n['expected']}")
    lines.append("")
    lines.append("per-peer state (routes, nexthops, neighbours off the underlay interface, FDB, tunnels "
                 "naming a remote node):")
    for name, s in report["peer_state"].items():
        counted = sum(len(v) for v in s["counted"].values())
        lines.append(f"  {good if s['ok'] else bad} {name}: {counted} per-peer entries"
                     + (f" ({', '.join(f'{k} {len(v)}' for k, v in s['counted'].items())})" if counted else ""))
        for kind, entries in s["counted"].items():
            for e in entries[:10]:
                lines.append(f"      {kind}: {e}")
        for kind, count in s["static"].items():
            lines.append(f"      {kind}: {count} entries name remote nodes, but the same kind exists for a host "
                         f"that is no node ({PHANTOM_HOST}): a table for every possible host, not counted")
        if s["underlay_neighbours"]:
            lines.append(f"      underlay ARP (not counted): {'; '.join(s['underlay_neighbours'][:6])}")
    lines.append("")
    checks = report["checks"]
    lines.append(("PASS" if report["ok"] else "FAIL") + f" in {report['seconds']} s: "
                 + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in checks.items()))
    return "\n".join(lines)
