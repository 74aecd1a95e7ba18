"""Bring a lab up, check it, tear it down: the lab's three verbs.

`up` builds the namespaces (cni_fan.lab.netns), installs the plugin
launchers, starts the real node agent in every node namespace
(cni_fan.lab.agents) and adds every pod with the real `fan` plugin, called
as a runtime calls it (cni_fan.lab.pods). `check` pings everything from
everything (cni_fan.lab.probes) while it watches every node's underlay
for the path each pod pair's packets take, direct or encapsulated
(cni_fan.lab.pathwatch), checks the masquerade towards `ext`
(cni_fan.lab.nat) and looks for per-peer state on every node
(cni_fan.lab.audit); in a dual-stack lab the pings and the masquerade
(NAT66) again in IPv6, and the audit reads IPv6 routes and neighbours too. `down` stops the agents, removes the namespaces and
the lab's files. lab.json (cni_fan.lab.state) links them.

Processes: the only ones `down` ends are the agents `up` started (by the
pid in their pid file, after checking the command line names the lab's
conflist) and processes still running inside the lab's own namespaces
(cni_fan.lab.processes).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cni_fan.lab import netns
from cni_fan.lab.agents import AGENT_TIMEOUT, Say, healthz, node_down, node_show, start_agent, wait_for_agents
from cni_fan.lab.audit import peer_state
from cni_fan.lab.errors import LabError
from cni_fan.lab.nat import nat_probe
from cni_fan.lab.pathwatch import PathWatch, path_verdicts, unsettled
from cni_fan.lab.pods import add_pod
from cni_fan.lab.probes import Pair, ping_all
from cni_fan.lab.processes import cmdline, pids_in, stop
from cni_fan.lab.state import existing_parts, lab_root, load_state, save_state
from cni_fan.lab.topology import (EXT_ADDRESS, EXT_ADDRESS6, LAB_ROOT, POD_IF, LabSpec, Node, check_prefix,
                                  lab_namespace_re)
from cni_fan.lab.underlay import build_switches, plug_node

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- up ------------------------------------------------------------------------

@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    """SIGTERM ignored for the block (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build(spec: LabSpec, timeout: float, say: Say) -> None:
    """The underlay switch, ext, the nodes with their agents, then the pods; lab.json at each end."""
    from cni_fan.install import install_plugins

    root = Path(spec.root)
    root.mkdir(parents=True, mode=0o755)
    save_state(spec, "building")
    install_plugins(spec.bin_dir)
    build_switches(spec)
    for node in spec.all_nodes:
        netns.create(node.netns)
        plug_node(spec, node)
        Path(node.dir).mkdir(parents=True, exist_ok=True)
        Path(node.conflist_path).write_text(json.dumps(spec.conflist(node), indent=2) + "\n")
    say(f"lab {spec.prefix}: underlay, ext and {spec.nodes} node namespaces ready; starting the node agents")
    agents = [start_agent(node) for node in spec.all_nodes]
    wait_for_agents(agents, timeout, say)
    pods: dict[str, dict] = {}
    if spec.pods_per_node:
        say(f"lab {spec.prefix}: adding {spec.nodes * spec.pods_per_node} pods with the fan plugin")
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, spec.nodes)) as pool:
            # One node's pods in order (addresses predictable), nodes side by side.
            def add_node_pods(node: Node) -> list[dict]:
                return [add_pod(spec, node, pod) for pod in node.pods]
            for added in pool.map(add_node_pods, spec.all_nodes):
                for entry in added:
                    pods[entry["netns"]] = entry
    save_state(spec, "up", pods)


def up(spec: LabSpec, *, force: bool = False, timeout: float = AGENT_TIMEOUT, keep_on_error: bool = False,
       say: Say = _stderr) -> dict:
    """Build the lab; returns its state (what lab.json holds). On any failure
    what was built is torn down (unless `keep_on_error`) and a LabError says why."""
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
        _build(spec, timeout, say)
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


# -- down ----------------------------------------------------------------------

def down(prefix: str, *, say: Say = _stderr) -> bool:
    """Remove the lab; True when nothing of it is left. Fine when it is gone."""
    check_prefix(prefix)
    root = lab_root(prefix)
    pattern = lab_namespace_re(prefix)
    names = [n for n in netns.list_namespaces() if pattern.match(n)]
    problems = _stop_agents(prefix, root, names, say)
    problems += _stop_leftovers(names, say)
    problems += _remove_namespaces(prefix, names)
    _remove_files(root)
    left = existing_parts(prefix)
    if left:
        problems.append(f"still present: {', '.join(left)}")
    for problem in problems:
        say(f"lab {prefix}: {problem}")
    if names or not problems:
        say(f"lab {prefix}: {'removed' if names else 'nothing to remove'}"
            f"{'' if not problems else ' (with problems)'}")
    return not left and not problems


def _stop_agents(prefix: str, root: Path, names: list[str], say: Say) -> list[str]:
    """The agents we started, by the pid we wrote (only if it is still that
    agent); then each node's `cni-fan node down`, the agent's own clean-up of
    what lives outside the namespace (pins, say). Returns the problems."""
    agents = []
    for pid_file in sorted(root.glob("n*/agent.pid")) if root.exists() else []:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if str(pid_file.with_name("10-fan.conflist")) in cmdline(pid):
            agents.append((pid, pid_file.parent.name))
    downs = [(f"{prefix}{c.parent.name}", str(c)) for c in sorted(root.glob("n*/10-fan.conflist"))
             if f"{prefix}{c.parent.name}" in names] if root.exists() else []
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for (pid, node), stopped in zip(agents, pool.map(stop, [pid for pid, _ in agents])):
            if not stopped:
                problems.append(f"agent pid {pid} ({node}) did not stop")
        list(pool.map(lambda job: node_down(*job, say), downs))
    return problems


def _stop_leftovers(names: list[str], say: Say) -> list[str]:
    """Anything still running inside the lab's namespaces was started by the lab."""
    problems = []
    for pid, name in sorted(pids_in(names).items()):
        say(f"  stopping pid {pid} left in {name}: {cmdline(pid)[:120]}")
        if not stop(pid, timeout=3.0):
            problems.append(f"pid {pid} in {name} did not stop")
    return problems


def _remove_namespaces(prefix: str, names: list[str]) -> list[str]:
    """Pods first, the switch last: their devices go with them."""
    problems = []
    for name in sorted(names, key=lambda n: (n == f"{prefix}under", n in (f"{prefix}ext", f"{prefix}router"),
                                             -len(n), n)):
        try:
            netns.remove(name)
        except netns.LabNetError as exc:
            problems.append(str(exc))
    return problems


def _remove_files(root: Path) -> None:
    """The lab's directory, and /run/cni-fan-lab when no other lab is left."""
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    try:
        Path(LAB_ROOT).rmdir()
    except OSError:
        pass


# -- check ---------------------------------------------------------------------

@dataclass
class Endpoint:
    """Something `check` pings from or to: a pod, a node (its gateway) or ext."""
    name: str      # row/column label: n1p2, n1, ext
    netns: str
    kind: str      # pod, node, ext
    address: str   # what others ping (pods: overlay address; nodes: gateway)
    node: str      # the node it is on ("" for ext)


def endpoints(spec: LabSpec, state: dict, family: int = 4) -> tuple[list[Endpoint], list[Endpoint], Endpoint]:
    """(pods, nodes, ext) in `family` (6: a dual-stack lab's IPv6 side); a
    pod's address is the one its interface has now, the recorded one when
    it still has it."""
    of, key = (netns.ipv4_of, "address") if family == 4 else (netns.ipv6_of, "address6")
    pods, nodes = [], []
    for node in spec.all_nodes:
        gateway = node.gateway if family == 4 else node.gateway6
        nodes.append(Endpoint(node.short, node.netns, "node", str(gateway), node.short))
        for pod in node.pods:
            addresses = [c.split("/")[0] for c in of(pod.netns, POD_IF)] if netns.exists(pod.netns) else []
            recorded = state.get("pods", {}).get(pod.netns, {}).get(key)
            address = recorded if recorded in addresses or not addresses else addresses[0]
            pods.append(Endpoint(f"{node.short}p{pod.index}", pod.netns, "pod", address or "", node.short))
    ext = Endpoint("ext", spec.ext_netns, "ext", EXT_ADDRESS if family == 4 else EXT_ADDRESS6, "")
    return pods, nodes, ext


def _ping_plan(pods: list[Endpoint], nodes: list[Endpoint],
               ext: Endpoint) -> tuple[dict[str, dict[str, str]], list[Pair], dict[tuple[str, str], Pair]]:
    """Who pings whom: every pod and node, to every pod, every node's gateway,
    and ext. Returns the matrix (cells not to ping already filled in), the
    distinct (namespace, address) pairs to ping, and each cell's pair."""
    matrix: dict[str, dict[str, str]] = {}
    pairs: list[Pair] = []
    cell_pair: dict[tuple[str, str], Pair] = {}
    for src in [*pods, *nodes]:
        row = matrix.setdefault(src.name, {})
        for dst in [*pods, *nodes, ext]:
            if dst.name == src.name or not dst.address:
                row[dst.name] = "self" if dst.name == src.name else "no address"
                continue
            pair = (src.netns, dst.address)
            cell_pair[(src.name, dst.name)] = pair
            if pair not in pairs:
                pairs.append(pair)
    return matrix, pairs, cell_pair


def check(prefix: str, *, timeout: float = 3.0) -> dict:
    """Everything `lab check` looks at, as a JSON-able report; report["ok"]."""
    state = load_state(prefix)
    spec = LabSpec.from_dict(state["spec"])
    missing = [n for n in spec.namespaces() if not netns.exists(n)]
    if missing:
        raise LabError(f"lab {prefix!r} is incomplete: missing namespaces {', '.join(missing[:8])}"
                       f"{' ...' if len(missing) > 8 else ''} (phase {state.get('phase')!r})")
    # An IPv6-only lab has no IPv4 side: its checks are the IPv6 ones alone.
    pods, nodes, ext = endpoints(spec, state) if spec.has_ipv4 else ([], [], None)
    pods6, nodes6, ext6 = endpoints(spec, state, 6) if spec.has_ipv6 else ([], [], None)
    node_by_short = {n.short: n for n in spec.all_nodes}
    started = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        health_f = [pool.submit(healthz, n, timeout=10.0) for n in spec.all_nodes]  # a busy agent answers late
        shown_f = {n.short: pool.submit(node_show, n) for n in spec.all_nodes}
        state_f = {n.short: pool.submit(peer_state, spec, n) for n in spec.all_nodes}

        matrix, pairs, cell_pair = _ping_plan(pods, nodes, ext) if ext is not None else ({}, [], {})
        matrix6, pairs6, cell_pair6 = _ping_plan(pods6, nodes6, ext6) if ext6 is not None else ({}, [], {})
        # The masquerade probes run beside the pings (their own threads, their own sockets).
        nat_f = pool.submit(nat_probe, {p.netns: str(node_by_short[p.node].address) for p in pods}, ext.netns,
                            ext.address, timeout=timeout) if pods and ext is not None else None
        nat6_f = pool.submit(nat_probe, {p.netns: str(node_by_short[p.node].address6) for p in pods6}, ext6.netns,
                             ext6.address, timeout=timeout) if pods6 and ext6 is not None else None
        with PathWatch(spec.all_nodes) as watch:  # what each node sends on its underlay while the pings run
            rtts = ping_all(pairs + pairs6, timeout=timeout)
            seen = watch.seen()
            again = [*unsettled(path_verdicts(spec, pods, seen), pods),
                     *unsettled(path_verdicts(spec, pods6, seen), pods6)]
            if again:  # direct pairs seen only in the fallback, once more now that the MACs are known
                ping_all(again, timeout=timeout)
                watch.seen(into=seen)
        for cells, cell_pairs in ((matrix, cell_pair), (matrix6, cell_pair6)):
            for (src, dst), pair in cell_pairs.items():
                cells[src][dst] = "ok" if rtts.get(pair) is not None else "FAIL"
        nat = nat_f.result() if nat_f is not None else {}
        nat6 = nat6_f.result() if nat6_f is not None else {}
        states = {name: f.result() for name, f in state_f.items()}
        health = {n.short: f.result() for n, f in zip(spec.all_nodes, health_f)}
        shown = {name: f.result() for name, f in shown_f.items()}

    agents = {name: {"healthz": ok, "status": status, "show": shown[name]} for name, (ok, status) in health.items()}
    cells_ok = all(v in ("ok", "self") for row in matrix.values() for v in row.values())
    cells6_ok = all(v in ("ok", "self") for row in matrix6.values() for v in row.values())
    report = {
        "prefix": prefix,
        "spec": spec.to_dict(),
        "endpoints": {e.name: {"netns": e.netns, "kind": e.kind, "address": e.address, "node": e.node,
                               **({"underlay": str(node_by_short[e.name].address)} if e.kind == "node" else {})}
                      for e in [*pods, *nodes, *([ext] if ext is not None else [])]},
        "agents": agents,
        "matrix": matrix,
        "nat": {p.name: nat[p.netns] for p in pods},
        "peer_state": {name: {"ok": s.ok, "counted": s.counted, "static": s.static,
                              "underlay_neighbours": s.underlay_neigh, "entries_read": s.entries}
                       for name, s in states.items()},
        "seconds": None,
    }
    if ext6 is not None:
        report["endpoints6"] = {e.name: {"netns": e.netns, "kind": e.kind, "address": e.address, "node": e.node,
                                         **({"underlay": str(node_by_short[e.name].address6)}
                                            if e.kind == "node" else {})}
                                for e in [*pods6, *nodes6, ext6]}
        report["matrix6"] = matrix6
        report["nat6"] = {p.name: nat6[p.netns] for p in pods6}
    report["paths"] = path_verdicts(spec, pods, seen)
    if ext6 is not None:
        report["paths6"] = path_verdicts(spec, pods6, seen)
    report["checks"] = {
        "agents": all(a["healthz"] for a in agents.values()),
        **({"pings": cells_ok, "nat": all(n["ok"] for n in report["nat"].values())} if ext is not None else {}),
        "no_per_peer_state": all(s.ok for s in states.values()),
    }
    if ext6 is not None:
        report["checks"]["pings6"] = cells6_ok
        report["checks"]["nat6"] = all(n["ok"] for n in report["nat6"].values())
    report["checks"]["paths"] = all(v["ok"] for key in ("paths", "paths6") for v in report.get(key, {}).values())
    report["ok"] = all(report["checks"].values())
    report["seconds"] = round(time.monotonic() - started, 2)
    return report
