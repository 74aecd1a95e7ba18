"""Throughput, per-node datapath state and `node up` time: fan against flannel-style VXLAN (issue 3).

One run builds real labs (`cni_fan.lab`: `lab up`, the node agents, pods
added by the `fan` plugin) named after the run (`bfan-<run>-…`) and tears
each down when done with it, also on an error or Ctrl-C.

1. Throughput. A dual-stack lab (`overlay6`, issue 11) of 2 nodes with
   one fan pod each. In the same two
   node namespaces the harness also builds what flanneld's VXLAN backend
   programs: a `flannel.1` VXLAN device (VNI 1, UDP 8472, `nolearning`,
   the node's 243.<i>.0.0/32 on it), a `cni0` bridge with 243.<i>.0.1/24
   and one pod namespace on a veth, and per peer a route
   `243.<j>.0.0/24 via 243.<j>.0.0 dev flannel.1 onlink`, a permanent
   neighbour `243.<j>.0.0 lladdr <peer's flannel.1 MAC>` and an FDB entry
   `<peer's MAC> dst <peer's underlay address> self permanent`. Pods of
   both have MTU = underlay MTU - 50. Single-stream TCP with iperf3 (a
   one-off server per run; the receiver's bits per second) for node 1 ->
   node 2 over the underlay, fan pod -> fan pod and flannel-style pod ->
   pod across the nodes, plus fan pod -> fan pod over IPv6 (the same
   pods' IPv6 addresses, the same tunnel) and node -> node over the
   underlay's IPv6 (the kernel's own IPv6 against IPv4 cost, the
   reference for the fan's); the five rotate their order every round, so the
   load of the (shared, busy) machine hits all of them alike. Every run
   checks, by the receiving node's device counters, that the bytes went
   through the tunnel they were meant for.
2. Per-node datapath entries as the lab grows (default 2, 5, 10, 20 nodes,
   no pods): on every node, the routes (main table), IPv4 neighbours
   (not NOARP), VXLAN FDB entries (with a `dst`) and tc filters on the
   tunnel device and the pod bridge, first of the fan as the agent set it
   up, then of the flannel-style datapath built for all N nodes.
3. `cni-fan node up` wall time on an extra node namespace of the first lab
   (no agent there): after `node down` (a fresh node) and again on a node
   that is up (idempotent), each as the wall time of the process (Python
   start included) and the time the command reports for its own work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RUN_RE, BenchError, Lab, cni_fan_command, inside_netns, run_is_over, run_one
from bench.record import envelope, machine, ratio, summarize, utc_now
from bench.flannel_style import (FLANNEL_BRIDGE, FLANNEL_DEV, FLANNEL_NET, FLANNEL_PORT, FLANNEL_VNI, build_flannel,
                                 count_entries, flannel_pod_address)
from bench.hostgw_style import HOSTGW_BRIDGE, HOSTGW_NET, build_hostgw, count_hostgw_entries, hostgw_pod_address
from bench.iperf import iperf_once, rx_bytes
from bench.shell import ENV, run_tool
from bench.throughput_report import LABELS, TITLE, VARIANTS, render, render_history  # noqa: F401 (bench.run)

ORDER = 20
DEFAULT_SECONDS = 10
DEFAULT_ROUNDS = 5
DEFAULT_SIZES = (2, 5, 10, 20)
DEFAULT_NODE_UP_RUNS = 5
TARGET_RATIO = 1.0          # fan / flannel-style throughput
IPV6_TARGET_RATIO = 0.95    # fan over IPv6 / fan over IPv4, same pods (issue 11)
DIRECT_UNDERLAY_TARGET = 0.95  # fan direct / underlay (issue 12)
DIRECT_HOSTGW_TARGET = 1.0     # fan direct / host-gw-style (issue 12)
OVERLAY6 = "fd00:241::/48"  # the throughput lab's IPv6 overlay beside topology.DEFAULT_OVERLAY
NOISE_TOLERANCE = 0.05      # "within noise": at least TARGET_RATIO - this
NODE_UP_TARGET_S = 1.0
AGENT_TIMEOUT = 240.0       # a 20-node lab on a busy 2-core machine starts slowly

FAN_TUNNEL = "fan-vxlan"

ENTRY_KINDS = ("routes", "neighbours", "fdb", "tc_filters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-seconds", type=int, default=DEFAULT_SECONDS, metavar="S",
                        help=f"throughput: seconds per iperf3 run (default {DEFAULT_SECONDS})")
    parser.add_argument("--tp-rounds", type=int, default=DEFAULT_ROUNDS, metavar="R",
                        help=f"throughput: rounds of underlay, fan and flannel-style runs (default {DEFAULT_ROUNDS})")
    parser.add_argument("--tp-sizes", default=None, metavar="N,N",
                        help="throughput: lab sizes for the per-node entries "
                             f"(default {','.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--tp-node-up", type=int, default=DEFAULT_NODE_UP_RUNS, metavar="K",
                        help=f"throughput: timed `node up` runs of each kind (default {DEFAULT_NODE_UP_RUNS})")


def _int_arg(args, name: str, default: int, minimum: int = 1) -> int:
    value = getattr(args, name, None)
    value = default if value is None else int(value)
    if value < minimum:
        raise BenchError(f"--{name.replace('_', '-')} must be at least {minimum}")
    return value


def _sizes(args) -> list[int]:
    text = getattr(args, "tp_sizes", None)
    if not text:
        return list(DEFAULT_SIZES)
    try:
        sizes = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise BenchError(f"--tp-sizes: not a list of whole numbers: {text!r}") from None
    if not sizes or sizes[0] < 2 or sizes[-1] > 100:
        raise BenchError("--tp-sizes: lab sizes from 2 to 100 nodes")
    return sizes


def _log(msg: str) -> None:
    print(f"throughput: {msg}", file=sys.stderr, flush=True)


def _rotate(seq, k: int):
    k %= len(seq)
    return tuple(seq[k:]) + tuple(seq[:k])


def _lab():
    """The lab modules (imported late: `bench.run --list` must not need pyroute2)."""
    from cni_fan.lab import netns as labnetns
    from cni_fan.lab import run as labrun
    from cni_fan.lab import topology

    return labnetns, labrun, topology


# -- labs -------------------------------------------------------------------------

def _remove_stale_labs() -> None:
    """Labs of earlier runs killed before their `lab down` (agents outlive a SIGKILL)."""
    _, labrun, topology = _lab()
    root = Path(topology.LAB_ROOT)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        m = RUN_RE.match(path.name)
        if not m or not path.is_dir():
            continue
        with run_is_over(m.group(1)) as over:
            if not over:
                continue  # that run is alive
        _log(f"removing lab {path.name} left by a killed run")
        labrun.down(path.name, say=lambda _m: None)


@contextlib.contextmanager
def real_lab(prefix: str, nodes: int, pods_per_node: int, overlay6: str | None = None, direct_routing: bool = False):
    """`cni-fan lab up`, then always `lab down` (the lab's own code, in process)."""
    _, labrun, topology = _lab()
    spec = topology.LabSpec(prefix=prefix, nodes=nodes, pods_per_node=pods_per_node, overlay6=overlay6,
                            direct_routing=direct_routing)
    started = time.monotonic()
    try:
        try:
            state = labrun.up(spec, timeout=AGENT_TIMEOUT, say=lambda _m: None)
        except labrun.LabError as exc:
            raise BenchError(f"lab up ({nodes} nodes) failed: {exc}") from None
        state["up_s"] = round(time.monotonic() - started, 2)
        yield spec, state
    finally:
        if not labrun.down(prefix, say=lambda m: _log(m)):
            _log(f"lab {prefix} was not removed completely")


def _fan_bridge(node) -> str:
    from cni_fan.plan import bridge_name_for

    return bridge_name_for(node.slice)


def _entries_for_size(prefix: str, nodes: int, mtu: int) -> dict:
    _, labrun, _ = _lab()
    with real_lab(prefix, nodes, 0) as (spec, state):
        fan = {n.index: count_entries(n.netns, FAN_TUNNEL, _fan_bridge(n)) for n in spec.all_nodes}
        per_peer = {}
        for n in (spec.node(1), spec.node(nodes)):  # the lab's own check, before anything else is built
            per_peer[n.short] = sum(len(v) for v in labrun.peer_state(spec, n).counted.values())
        build_flannel(spec, with_pods=False, mtu=mtu)
        flannel = {n.index: count_entries(n.netns, FLANNEL_DEV, FLANNEL_BRIDGE) for n in spec.all_nodes}
        build_hostgw(spec, with_pods=False, mtu=mtu)
        hostgw = {n.index: count_hostgw_entries(n.netns) for n in spec.all_nodes}
        up_s = state["up_s"]
    with real_lab(prefix + "d", nodes, 0, direct_routing=True) as (spec, _state):
        fan_direct = {n.index: count_entries(n.netns, FAN_TUNNEL, _fan_bridge(n)) for n in spec.all_nodes}
        direct_per_peer = {n.short: sum(len(v) for v in labrun.peer_state(spec, n).counted.values())
                           for n in (spec.node(1), spec.node(nodes))}

    def spread(counts: dict[int, dict]) -> dict:
        totals = [c["total"] for c in counts.values()]
        return {"node1": counts[1], "min_total": min(totals), "max_total": max(totals)}

    return {"nodes": nodes, "fan": spread(fan), "flannel": spread(flannel), "fan_direct": spread(fan_direct),
            "hostgw": spread(hostgw), "fan_per_peer_entries_lab_check": per_peer,
            "fan_direct_per_peer_entries_lab_check": direct_per_peer, "lab_up_s": up_s}


def _ping(pairs: list[tuple[str, str]]) -> list[str]:
    """Pairs (namespace, address) that do not answer."""
    _, labrun, _ = _lab()
    rtts = labrun.ping_all(pairs, timeout=5.0)
    return [f"{ns} -> {addr}" for (ns, addr), rtt in rtts.items() if rtt is None]


def _per_round(runs: dict[str, list[dict]], top: str, base: str, key: str = "gbps") -> list[float]:
    """`top` / `base` of `key` in each round (rounds are interleaved, so each ratio shares its noise);
    a round where either has no figure (nothing moved: the carrier check has failed the run then) is left out."""
    return [round(a[key] / b[key], 3) for a, b in zip(runs[top], runs[base]) if a[key] and b[key]]


def _throughput(lab: Lab, spec, state: dict, flannel_pods: dict[int, str], hostgw_pods: dict[int, str],
                direct: tuple, seconds: int, rounds: int) -> dict:
    """The variants in turn, rotating; `direct` is the direct-routing lab's (spec, state)."""
    n1, n2 = spec.node(1), spec.node(2)
    p1, p2 = n1.pods[0], n2.pods[0]
    pod_of = state["pods"]
    dspec, dstate = direct
    d1, d2 = dspec.node(1), dspec.node(2)
    dp1, dp2 = d1.pods[0], d2.pods[0]
    paths = {
        "underlay": (n1.netns, n2.netns, str(n2.address), "eth0"),
        "underlay6": (n1.netns, n2.netns, str(n2.address6), "eth0"),
        "fan": (p1.netns, p2.netns, pod_of[p2.netns]["address"], FAN_TUNNEL),
        "fan6": (p1.netns, p2.netns, pod_of[p2.netns]["address6"], FAN_TUNNEL),
        "flannel": (flannel_pods[1], flannel_pods[2], flannel_pod_address(2), FLANNEL_DEV),
        "fan_direct": (dp1.netns, dp2.netns, dstate["pods"][dp2.netns]["address"], "eth0"),
        "hostgw": (hostgw_pods[1], hostgw_pods[2], hostgw_pod_address(2), "eth0"),
    }
    back = {"underlay": str(n1.address), "underlay6": str(n1.address6), "fan": pod_of[p1.netns]["address"], "fan6": pod_of[p1.netns]["address6"],
            "flannel": flannel_pod_address(1), "fan_direct": dstate["pods"][dp1.netns]["address"],
            "hostgw": hostgw_pod_address(1)}
    # Where each variant's bytes must arrive (receiving namespace, device) and which devices must not carry them.
    carriers = {"fan": (n2.netns, FAN_TUNNEL, (FLANNEL_DEV,)), "fan6": (n2.netns, FAN_TUNNEL, (FLANNEL_DEV,)),
                "flannel": (n2.netns, FLANNEL_DEV, (FAN_TUNNEL,)),
                "hostgw": (n2.netns, "eth0", (FAN_TUNNEL, FLANNEL_DEV)),
                "fan_direct": (d2.netns, "eth0", (FAN_TUNNEL,))}
    dead = _ping([(src, addr) for src, _dst, addr, _dev in paths.values()]
                 + [(dst, back[v]) for v, (_s, dst, _a, _d) in paths.items()])
    if dead:
        raise BenchError(f"no answer before measuring: {', '.join(dead)}")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    tunnels_seen: dict[str, list[float]] = {v: [] for v in carriers}
    crossed: list[str] = []
    for r in range(rounds):
        for pos, variant in enumerate(_rotate(VARIANTS, r)):
            src, dst, addr, _dev = paths[variant]
            ns, own, others = carriers.get(variant, (n2.netns, None, ()))
            devices = [d for d in (own, *others) if d]
            before = {dev: rx_bytes(ns, dev) for dev in devices}
            res = iperf_once(lab, src, dst, addr, seconds)
            delta = {dev: rx_bytes(ns, dev) - before[dev] for dev in devices}
            if own is not None:
                share = delta[own] / res["bytes"] if res["bytes"] else 0.0
                tunnels_seen[variant].append(round(share, 3))
                if share < 0.9 or any(delta[o] > 0.05 * res["bytes"] for o in others):
                    crossed.append(f"round {r + 1} {variant}: {delta[own]} bytes on {own}, "
                                   + ", ".join(f"{delta[o]} on {o}" for o in others)
                                   + f", {res['bytes']} received")
            res.update({"round": r + 1, "position": pos + 1})
            runs[variant].append(res)
            _log(f"round {r + 1}/{rounds} {variant:8s} {res['gbps']:6.2f} Gbit/s, retransmits "
                 f"{res['retransmits']}, {res['cpu_s_per_gb']} CPU s/GB")
    if crossed:
        raise BenchError("traffic did not take the datapath it was meant to: " + "; ".join(crossed))
    med = {v: round(statistics.median(x["gbps"] for x in runs[v]), 3) for v in VARIANTS}
    cpu = {v: round(statistics.median(x["cpu_s_per_gb"] for x in runs[v] if x["cpu_s_per_gb"]), 4)
           for v in VARIANTS}
    per_round = _per_round(runs, "fan", "flannel")
    per_round6 = _per_round(runs, "fan6", "fan")
    per_round_cpu = _per_round(runs, "fan", "flannel", "cpu_s_per_gb")
    direct_rounds = {base: _per_round(runs, "fan_direct", base) for base in ("underlay", "hostgw")}
    return {
        "paths": {v: {"from": src.replace(spec.prefix, "<lab>"), "to": f"{addr} ({dst.replace(spec.prefix, '<lab>')})",
                      "tunnel_checked": dev if v in carriers else None}
                  for v, (src, dst, addr, dev) in paths.items()},
        "median_gbps": med,
        "min_gbps": {v: min(x["gbps"] for x in runs[v]) for v in VARIANTS},
        "max_gbps": {v: max(x["gbps"] for x in runs[v]) for v in VARIANTS},
        "median_retransmits": {v: statistics.median(x["retransmits"] for x in runs[v]) for v in VARIANTS},
        "median_cpu_s_per_gb": cpu,
        "ratios": {
            "fan_over_flannel": ratio(med["fan"], med["flannel"]),
            "fan_over_flannel_per_round": per_round,
            "fan_over_flannel_median_of_rounds": round(statistics.median(per_round), 3) if per_round else None,
            "fan_over_underlay": ratio(med["fan"], med["underlay"]),
            "fan6_over_fan": ratio(med["fan6"], med["fan"]),
            "fan6_over_fan_per_round": per_round6,
            "fan6_over_fan_median_of_rounds": round(statistics.median(per_round6), 3) if per_round6 else None,
            "fan6_over_flannel": ratio(med["fan6"], med["flannel"]),
            "underlay6_over_underlay": ratio(med["underlay6"], med["underlay"]),
            "flannel_over_underlay": ratio(med["flannel"], med["underlay"]),
            "cpu_per_gb_fan_over_flannel": ratio(cpu["fan"], cpu["flannel"]),
            "cpu_per_gb_fan_over_flannel_per_round": per_round_cpu,
            "fan_direct_over_underlay": ratio(med["fan_direct"], med["underlay"]),
            "fan_direct_over_underlay_per_round": direct_rounds["underlay"],
            "fan_direct_over_hostgw": ratio(med["fan_direct"], med["hostgw"]),
            "fan_direct_over_hostgw_per_round": direct_rounds["hostgw"],
            "hostgw_over_underlay": ratio(med["hostgw"], med["underlay"]),
            "cpu_per_gb_fan_direct_over_hostgw": ratio(cpu["fan_direct"], cpu["hostgw"]),
        },
        "tunnel_rx_share": tunnels_seen,
        "runs": runs,
    }


# -- node up ----------------------------------------------------------------------

_IN_PROCESS = re.compile(r"node up: .* (set up|already up) in ([0-9.]+)s")


def _node_cmd(ns: str, verb: str, conflist: str) -> tuple[float, float | None, str]:
    """(process wall ms, in-process ms or None, kind) of `cni-fan node <verb>` in `ns`."""
    with inside_netns(ns):
        call = run_one([*cni_fan_command(), "node", verb, "--conflist", conflist], ENV, timeout=120)
    if call.returncode != 0:
        raise BenchError(f"`cni-fan node {verb}` in {ns} exited {call.returncode}: "
                         f"{call.stderr.decode(errors='replace')[-600:]}")
    m = _IN_PROCESS.search(call.stderr.decode(errors="replace"))
    return call.ms, (float(m.group(2)) * 1000.0 if m else None), (m.group(1) if m else "")


def _node_up(spec, runs: int) -> dict:
    """Timed `node up` on an extra node of the lab (n<N+1>, no agent: nobody else touches it)."""
    labnetns, _, topology = _lab()
    node = spec.node(spec.nodes + 1)
    labnetns.create(node.netns)  # a lab namespace name: `lab down` removes it (and runs `node down` there)
    labnetns.plug(spec.underlay_netns, topology.UNDERLAY_BRIDGE, node.port, node.netns, topology.NODE_UNDERLAY_IF,
                  node.cidr, topology.UNDERLAY_MTU)
    Path(node.dir).mkdir(parents=True, exist_ok=True)
    Path(node.conflist_path).write_text(json.dumps(spec.conflist(node), indent=2) + "\n")
    samples = {"fresh": {"wall_ms": [], "in_process_ms": []}, "again": {"wall_ms": [], "in_process_ms": []}}
    kinds = {"fresh": [], "again": []}
    for k in range(runs):
        if k:
            _node_cmd(node.netns, "down", node.conflist_path)
        for mode in ("fresh", "again"):
            wall, inside, kind = _node_cmd(node.netns, "up", node.conflist_path)
            samples[mode]["wall_ms"].append(round(wall, 1))
            if inside is not None:
                samples[mode]["in_process_ms"].append(round(inside, 1))
            kinds[mode].append(kind)
    _log(f"node up: fresh median {statistics.median(samples['fresh']['wall_ms']):.0f} ms wall, "
         f"again {statistics.median(samples['again']['wall_ms']):.0f} ms wall")
    return {
        "runs": runs,
        "fresh": {k: summarize(v) for k, v in samples["fresh"].items()},
        "again": {k: summarize(v) for k, v in samples["again"].items()},
        "reported_as": kinds,
        "raw_ms": samples,
        "node": node.netns.replace(spec.prefix, "<lab>"),
    }


# -- run ----------------------------------------------------------------------------

def run(args) -> dict:
    seconds = _int_arg(args, "tp_seconds", DEFAULT_SECONDS)
    rounds = _int_arg(args, "tp_rounds", DEFAULT_ROUNDS)
    node_up_runs = _int_arg(args, "tp_node_up", DEFAULT_NODE_UP_RUNS)
    sizes = _sizes(args)
    for tool in ("iperf3", "ip", "bridge", "tc"):
        if not shutil.which(tool, path=ENV["PATH"]):
            raise BenchError(f"{tool} not found (Debian packages iperf3, iproute2)")
    started = utc_now()
    desc = machine()
    _remove_stale_labs()
    _, _, topology = _lab()
    mtu = topology.UNDERLAY_MTU - 50
    with Lab() as lab:
        _log(f"run {lab.run_id}: {rounds} rounds of {seconds} s iperf3; entries at {sizes} nodes; "
             f"{node_up_runs} node up runs")
        prefix = lab.prefix
        with real_lab(prefix + "t", 2, 1, overlay6=OVERLAY6) as (spec, state), \
                real_lab(prefix + "d", 2, 1, direct_routing=True) as direct:
            _log(f"2-node labs up in {state['up_s']} s (VXLAN) and {direct[1]['up_s']} s (direct routing); building "
                 "the flannel-style and host-gw-style datapaths beside the fan")
            pods = build_flannel(spec, with_pods=True, mtu=mtu)
            hostgw_pods = build_hostgw(spec, with_pods=True, mtu=mtu)
            try:
                throughput = _throughput(lab, spec, state, pods, hostgw_pods, direct, seconds, rounds)
                node_up = _node_up(spec, node_up_runs)
            finally:
                run_tool(["ip", "-force", "-batch", "-"],
                         stdin="".join(f"netns del {p}\n" for p in [*pods.values(), *hostgw_pods.values()]))
        entries = []
        for n in sizes:
            row = _entries_for_size(f"{prefix}s{n}", n, mtu)
            _log(f"{n} nodes: fan {row['fan']['node1']['total']} entries per node, flannel-style "
                 f"{row['flannel']['node1']['total']} (lab up {row['lab_up_s']} s)")
            entries.append(row)
        run_id = lab.run_id
    try:
        load_end = round(os.getloadavg()[0], 2)
    except OSError:
        load_end = -1.0

    fan_totals = [r["fan"]["node1"]["total"] for r in entries]
    fl = [(r["nodes"], r["flannel"]["node1"]["total"]) for r in entries]
    slope = (round((fl[-1][1] - fl[0][1]) / (fl[-1][0] - fl[0][0]), 2) if len(fl) > 1 else None)
    r = throughput["ratios"]["fan_over_flannel"]
    r6 = throughput["ratios"]["fan6_over_fan"]
    rd_u, rd_h = throughput["ratios"]["fan_direct_over_underlay"], throughput["ratios"]["fan_direct_over_hostgw"]
    fresh_wall_s = node_up["fresh"]["wall_ms"].get("median", 0) / 1000.0
    return {
        **envelope("throughput", TITLE, started, run_id, {**desc, "loadavg_1min_at_end": load_end}),
        "method": {
            "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
            "seconds_per_run": seconds, "rounds": rounds,
            "interleaving": f"{', '.join(VARIANTS)} rotate their order every round (ABC..., BC...A, ...)",
            "measure": "single TCP stream, `iperf3 -c ADDR -t S -J` from the sending namespace to a one-off server "
                       "(`iperf3 -s -1`) in the receiving one; the receiver's bits per second",
            "cpu": "iperf3's cpu_utilization_percent host_total + remote_total (the two iperf3 processes' user+system "
                   "time, so softirq work done in their context is in, other softirq work is not) times the run's "
                   "seconds, per GB received",
            "ratio": "of the medians; per round: fan / flannel-style and fan IPv6 / fan IPv4 of the same round",
            "mtu": {"underlay": topology.UNDERLAY_MTU, "pods_and_tunnels": mtu},
            "fan": f"the lab's own node agent and `fan` plugin (encap vxlan, fanmap bpf, overlay "
                   f"{topology.DEFAULT_OVERLAY} and overlay6 {OVERLAY6}: dual-stack pods, UDP 4789)",
            "fan_direct": "a second 2-node lab, up at the same time, with directRouting: true (both nodes on one "
                          "underlay segment: pod packets leave unencapsulated, the peer's underlay address the "
                          "computed next hop)",
            "hostgw_style": f"{HOSTGW_BRIDGE} bridge, {HOSTGW_NET} (node i: 244.i.0.0/24), per peer: a route to the "
                            "peer's subnet via the peer's underlay address on eth0 (no encapsulation)",
            "flannel_style": f"{FLANNEL_DEV} VXLAN id {FLANNEL_VNI} dstport {FLANNEL_PORT} nolearning, {FLANNEL_BRIDGE} "
                             f"bridge, {FLANNEL_NET} (node i: 243.i.0.0/24), per peer: route via the peer's VTEP "
                             "address onlink, permanent neighbour, FDB entry with dst = peer's underlay address",
            "entries_counted": "on the datapath's tunnel device and pod bridge: IPv4 routes of the main table, IPv4 "
                               "neighbours (not NOARP), VXLAN FDB entries with a dst, tc filters (ingress and egress); "
                               "labs with no pods",
            "node_up": "`cni-fan node up --conflist C` spawned inside a lab node namespace that has no agent: "
                       "'fresh' right after `node down` (the first run: a new namespace), 'again' on a node that "
                       "is up; wall = process spawn to exit (Python start included), in-process = what the "
                       "command prints",
            "lab_sizes": sizes,
        },
        "labels": LABELS,
        "throughput": throughput,
        "entries": {"rows": entries, "fan_totals": fan_totals,
                    "fan_direct_totals": [r["fan_direct"]["node1"]["total"] for r in entries],
                    "hostgw_totals": [r["hostgw"]["node1"]["total"] for r in entries],
                    "fan_constant": len(set(fan_totals)) == 1
                    and all(r_["fan"]["min_total"] == r_["fan"]["max_total"] for r_ in entries),
                    "flannel_entries_per_added_node": slope},
        "node_up": node_up,
        "verdict": {
            "throughput_target": TARGET_RATIO, "noise_tolerance": NOISE_TOLERANCE,
            "fan_over_flannel": r,
            "throughput_met": r is not None and r >= TARGET_RATIO,
            "throughput_met_within_noise": r is not None and r >= TARGET_RATIO - NOISE_TOLERANCE,
            "ipv6_target": IPV6_TARGET_RATIO, "fan6_over_fan": r6,
            "ipv6_met": r6 is not None and r6 >= IPV6_TARGET_RATIO,
            "direct_underlay_target": DIRECT_UNDERLAY_TARGET, "fan_direct_over_underlay": rd_u,
            "direct_underlay_met": rd_u is not None and rd_u >= DIRECT_UNDERLAY_TARGET,
            "direct_hostgw_target": DIRECT_HOSTGW_TARGET, "fan_direct_over_hostgw": rd_h,
            "direct_hostgw_met": rd_h is not None and rd_h >= DIRECT_HOSTGW_TARGET,
            "node_up_target_s": NODE_UP_TARGET_S,
            "node_up_fresh_wall_median_s": round(fresh_wall_s, 3),
            "node_up_met": 0 < fresh_wall_s < NODE_UP_TARGET_S,
        },
    }

