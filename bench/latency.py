"""ADD/DEL latency of `fan` against the reference `bridge` + `host-local` (issue 2).

One node namespace (an underlay veth with 198.18.1.10/16), pod namespaces,
and three networks called through cnitool exactly as a runtime calls them:

- reference: bridge (isGateway, no masquerade) + host-local in 242.1.10.0/24;
- fan-server: `fan` (overlay 241.0.0.0/8, underlay 198.18.0.0/16) with the
  plugin server running in the node namespace (what a node agent does);
- fan-standalone: the same network, but its `agentSocket` names a socket
  nobody listens on, so every call runs in the `fan` process itself;
- fan-dual-stack: `fan` with `overlay6` too (each pod gets an IPv4 and an
  IPv6 address), served; its ratio to fan-server is what dual-stack costs;
- fan-server-bundle, fan-standalone-bundle: the same two ways of calling,
  but with the PyInstaller bundle (`make build`: what nodes run), installed
  as the DaemonSet installs it (bench/packaged.py's `Layout`) and served by
  the bundle's own `cni-fan serve`. Measured when dist/cni-fan/ is built from
  the sources as they are (or `--bundle DIR` names one); left out otherwise.
Both installs make `fan` the native thin client where one was compiled; the
results say which client each variant's `fan` was (`method.clients`).

The harness enters the node namespace itself (setns) and spawns cnitool
directly; a latency is the wall time of one cnitool process, from spawn to
exit, so it includes cnitool, the plugin processes and their work. The
networks are interleaved (the order rotates every pod and every round), so
noise hits all alike. Warm-up calls (they create the bridges) are not counted.

Sequential: ADD of pod 1..N, one call at a time, then DEL of pod 1..N.
Concurrent: C ADDs started at once, then C DELs at once, per network, for
R rounds; per-call latency and the wall time of each batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (BenchError, Call, Lab, cni_fan_command, find_cnitool, inside_netns, ip,
                          proc_children_cpu_seconds, run_batch, run_one, wait_for_path)
from bench.packaged import current_bundle
from bench.record import (envelope, history_table, machine, machine_line, md_table, ratio, summarize, utc_now, when,
                          yes_no)

TITLE = "ADD/DEL latency: fan against bridge + host-local (issue 2)"
ORDER = 10
DONE_RATIO = 3.0
TARGET_RATIO = 1.0
CALL_PATH_BAR = {"fan-server": (1.5, 2.0), "fan-server-bundle": (1.5, 2.0), "fan-dual-stack": (1.5, 2.0),  # issue 13
                 "fan-standalone": (4.0, None), "fan-standalone-bundle": (4.0, None)}  # (sequential, concurrent)
DEFAULT_PODS = 50
DEFAULT_CONCURRENT = 20
DEFAULT_ROUNDS = 3
DEFAULT_WARMUP = 3
DEFAULT_BUDGET = 240  # seconds; on a busy machine fewer concurrent rounds, so a run stays under ~5 minutes
UNDERLAY_ADDRESS = "198.18.1.10/16"
VENV_VARIANTS = ("reference", "fan-server", "fan-standalone", "fan-dual-stack")
BUNDLE_VARIANTS = ("fan-server-bundle", "fan-standalone-bundle")
ALL_VARIANTS = VENV_VARIANTS + BUNDLE_VARIANTS
VARIANTS = VENV_VARIANTS  # what a run without a bundle measures
FAN_VARIANTS = ("fan-server", "fan-standalone", "fan-dual-stack") + BUNDLE_VARIANTS
LABELS = {
    "reference": "reference: bridge + host-local",
    "fan-server": "fan, plugin server running",
    "fan-standalone": "fan, standalone (no server)",
    "fan-dual-stack": "fan dual-stack (overlay6), plugin server running",
    "fan-server-bundle": "fan bundle, plugin server running",
    "fan-standalone-bundle": "fan bundle, standalone (no server)",
}
TAGS = {"reference": "r", "fan-server": "s", "fan-standalone": "l", "fan-dual-stack": "d",
        "fan-server-bundle": "b", "fan-standalone-bundle": "c"}
TOMBSTONE_PREFIX = "fanz"  # cni_fan.net.tombstone: veths a DEL deletes after answering
SETTLE_S = 20.0
OVERLAY6 = "fd00:241::/48"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrent", type=int, default=DEFAULT_CONCURRENT, metavar="C",
                        help=f"latency: calls started at once in the concurrent part (default {DEFAULT_CONCURRENT})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="R",
                        help=f"latency: concurrent batches per network (default {DEFAULT_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="W",
                        help=f"latency: uncounted ADD+DEL per network before measuring (default {DEFAULT_WARMUP})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="S",
                        help=f"latency: start no further concurrent round (after the first) that would end "
                             f"later than S seconds into the run (default {DEFAULT_BUDGET})")
    parser.add_argument("--ref-cni-dir", default="/usr/lib/cni", metavar="DIR",
                        help="latency: directory of the reference bridge and host-local (default /usr/lib/cni)")
    parser.add_argument("--bundle", type=Path, default=None, metavar="DIR",
                        help="latency: the PyInstaller bundle to measure too (default: dist/cni-fan/ when it was "
                             "built from the sources as they are; `make build`)")


def _param(args, name: str, default: int) -> int:
    value = getattr(args, name, None)
    value = default if value is None else int(value)
    if value < 1 and name != "warmup":
        raise BenchError(f"--{name} must be at least 1")
    return max(0, value)


def _rotate(seq, k: int):
    k %= len(seq)
    return tuple(seq[k:]) + tuple(seq[:k])


def _log(msg: str) -> None:
    print(f"latency: {msg}", file=sys.stderr, flush=True)


class Setup:
    """The node, the pods and the network configs of one run."""

    def __init__(self, lab: Lab, pods: int, ref_cni_dir: str, bundle: Path | None = None) -> None:
        self.lab = lab
        self.variants = ALL_VARIANTS if bundle is not None else VENV_VARIANTS
        self.cnitool = find_cnitool()
        for plugin in ("bridge", "host-local"):
            if not Path(ref_cni_dir, plugin).exists():
                raise BenchError(f"reference plugin {plugin} not found in {ref_cni_dir} "
                                 "(Debian package containernetworking-plugins)")
        tmp = lab.tmp
        self.bin_dir = tmp / "bin"
        install = run_one([*cni_fan_command(), "install", "--bin-dir", str(self.bin_dir)], {"PATH": "/usr/bin:/bin"})
        install.check("cni-fan install")
        self.socket = tmp / "plugin.sock"
        self.bundle = None
        if bundle is not None:
            from bench.packaged import Layout  # installs it as the DaemonSet does

            self.bundle = Layout("bundle", bundle / "cni-fan", tmp)
        self.fan_net = lab.name("fan")
        self.ref_net = lab.name("ref")
        self.dual_net = lab.name("fan6")
        fan = {"type": "fan", "overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16", "dataDir": str(tmp / "fan-data")}
        ref = {"type": "bridge", "bridge": lab.name("br")[-15:], "isGateway": True, "ipMasq": False,
               "ipam": {"type": "host-local", "subnet": "242.1.10.0/24", "dataDir": str(tmp / "host-local")}}
        plugins = {
            "reference": (self.ref_net, ref),
            "fan-server": (self.fan_net, {**fan, "agentSocket": str(self.socket)}),
            # Same network and state; only the socket differs, and nobody listens there.
            "fan-standalone": (self.fan_net, {**fan, "agentSocket": str(tmp / "no-server" / "plugin.sock")}),
            # Its own network, bridge name and pool: the same node cannot hold one slice on two bridges.
            "fan-dual-stack": (self.dual_net, {**fan, "overlay": "243.0.0.0/8", "overlay6": OVERLAY6,
                                               "dataDir": str(tmp / "fan6-data"), "agentSocket": str(self.socket)}),
        }
        if self.bundle is not None:  # the venv's network and state, the bundle's plugins and server
            plugins["fan-server-bundle"] = (self.fan_net, {**fan, "agentSocket": str(self.bundle.socket)})
            plugins["fan-standalone-bundle"] = plugins["fan-standalone"]
        self.conf_dirs: dict[str, Path] = {}
        self.conflists: dict[str, dict] = {}  # as written, with this run's paths and names made generic
        for variant, (net, plugin) in plugins.items():
            conf_dir = tmp / "conf" / variant
            conf_dir.mkdir(parents=True)
            conflist = {"cniVersion": "1.0.0", "name": net, "plugins": [plugin]}
            text = json.dumps(conflist, indent=1)
            (conf_dir / f"10-{variant}.conflist").write_text(text + "\n")
            self.conflists[variant] = json.loads(text.replace(str(tmp), "<tmp>").replace(lab.prefix, "bfan-<run>-"))
            self.conf_dirs[variant] = conf_dir
        self.ref_cni_dir = ref_cni_dir

        self.node = lab.add_netns(["node"])[0]
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"],
                    ["addr", "add", UNDERLAY_ADDRESS, "dev", "ul0"],
                    ["link", "set", "ul0", "up"],
                    ["link", "set", "ul1", "up"]):
            ip(*cmd, netns=self.node)
        self.pods = {v: lab.add_netns(f"{TAGS[v]}{i}" for i in range(pods)) for v in self.variants}
        self.server = None
        self.bundle_server = None

    def bin_dir_of(self, variant: str) -> Path:
        return self.bundle.bin_dir if variant in BUNDLE_VARIANTS else self.bin_dir

    def client(self, variant: str) -> str:
        """Which thin client this variant's `fan` is, so how its calls start (bench.packaged.thin_client)."""
        from bench.packaged import thin_client

        return thin_client(self.bin_dir_of(variant), standalone=variant in ("fan-standalone", "fan-standalone-bundle"))

    def env(self, variant: str) -> dict[str, str]:
        bin_dir = self.bin_dir_of(variant)
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": str(self.conf_dirs[variant]),
                "CNI_PATH": f"{bin_dir}:{self.ref_cni_dir}"}

    def net(self, variant: str) -> str:
        return {"reference": self.ref_net, "fan-dual-stack": self.dual_net}.get(variant, self.fan_net)

    def argv(self, verb: str, variant: str, pod: str) -> list[str]:
        return [self.cnitool, verb, self.net(variant), f"/var/run/netns/{pod}"]

    def start_server(self) -> None:
        """`cni-fan serve` in the node namespace (call from inside it), and the bundle's when measured."""
        self.server = self._serve(cni_fan_command(), self.socket, "server.log")
        if self.bundle is not None:
            self.bundle_server = self._serve([str(self.bundle.cni_fan)], self.bundle.socket, "bundle-server.log")

    def _serve(self, command: list[str], socket: Path, log_name: str) -> subprocess.Popen:
        log = open(self.lab.tmp / log_name, "wb")
        server = self.lab.spawn([*command, "serve", "--socket", str(socket), "--log-level", "info"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        wait_for_path(socket, 30, server, f"the plugin server ({command[0]})")
        return server

    def server_log(self) -> str:
        text = ""
        for name in ("server.log", "bundle-server.log"):
            try:
                text += (self.lab.tmp / name).read_text(errors="replace")
            except OSError:
                pass
        return text

    def calls(self, verb: str, variant: str, pods: list[str]) -> list[Call]:
        calls = run_batch([self.argv(verb, variant, p) for p in pods], self.env(variant))
        for pod, call in zip(pods, calls):
            call.check(f"{variant} {verb.upper()} {pod}")
            if verb == "add":
                try:
                    ips = json.loads(call.stdout).get("ips")
                except ValueError:
                    ips = None
                if not ips or (variant == "fan-dual-stack" and len(ips) != 2):
                    raise BenchError(f"{variant} ADD {pod} answered without its addresses: {call.stdout[:500]!r}")
        return calls


def _sequential(s: Setup, pods: int) -> dict:
    samples = {v: {"add": [], "del": []} for v in s.variants}
    for verb in ("add", "del"):
        for i in range(pods):
            for variant in _rotate(s.variants, i):
                call = s.calls(verb, variant, [s.pods[variant][i]])[0]
                samples[variant][verb].append(call.ms)
        _log(f"sequential {verb.upper()} of {pods} pods done")
    return samples


def _concurrent(s: Setup, width: int, rounds: int, deadline: float) -> dict:
    samples = {v: {"add": [], "del": [], "add_batch": [], "del_batch": []} for v in s.variants}
    round_took = 0.0
    for r in range(rounds):
        if r and time.monotonic() + round_took > deadline:
            _log(f"time budget reached: {r} of {rounds} concurrent rounds")
            break
        round_start = time.monotonic()
        for variant in _rotate(s.variants, r):
            pods = s.pods[variant][:width]
            for verb in ("add", "del"):
                calls = s.calls(verb, variant, pods)
                samples[variant][verb] += [c.ms for c in calls]
                wall = (max(c.end for c in calls) - min(c.start for c in calls)) * 1000.0
                samples[variant][f"{verb}_batch"].append(wall)
        round_took = time.monotonic() - round_start
        _log(f"concurrent round {r + 1}/{rounds} done")
    return samples


def _warmup(s: Setup, count: int) -> None:
    for i in range(count):
        for variant in _rotate(s.variants, i):
            pod = [s.pods[variant][i]]
            s.calls("add", variant, pod)
            s.calls("del", variant, pod)


def _leftover_ports(s: Setup) -> int:
    """Host veths still in the node after every DEL (should be none), once the tombstones the
    last DELs delete after answering had time to go (a tombstone still there then counts)."""
    def names() -> list[str]:
        out = ip("-o", "link", "show", "type", "veth", netns=s.node)
        return [n for n in (line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
                if n not in ("ul0", "ul1")]

    deadline = time.monotonic() + SETTLE_S
    while any(n.startswith(TOMBSTONE_PREFIX) for n in names()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(names())


def _sum_medians(stats: dict) -> float:
    return round(stats["add"]["median"] + stats["del"]["median"], 2)


def _ratios(fan: dict, ref: dict) -> dict:
    return {"add": ratio(fan["add"]["median"], ref["add"]["median"]),
            "del": ratio(fan["del"]["median"], ref["del"]["median"]),
            "add_del": ratio(_sum_medians(fan), _sum_medians(ref))}


def run(args) -> dict:
    pods = _param(args, "pods", DEFAULT_PODS)
    width = _param(args, "concurrent", DEFAULT_CONCURRENT)
    rounds = _param(args, "rounds", DEFAULT_ROUNDS)
    warmup = _param(args, "warmup", DEFAULT_WARMUP)
    ref_cni_dir = getattr(args, "ref_cni_dir", None) or "/usr/lib/cni"
    bundle = current_bundle(getattr(args, "bundle", None), _log)
    budget = float(getattr(args, "budget", None) or DEFAULT_BUDGET)
    started = utc_now()
    deadline = time.monotonic() + budget
    desc = machine()
    with Lab() as lab:
        _log(f"run {lab.run_id}: {pods} pods sequential, {width} at once x {rounds} rounds, {warmup} warm-up")
        s = Setup(lab, max(pods, width, warmup), ref_cni_dir, bundle)
        with inside_netns(s.node):
            s.start_server()
            _warmup(s, warmup)
            seq = _sequential(s, pods)
            con = _concurrent(s, width, rounds, deadline)
            server_cpu = proc_children_cpu_seconds(s.server.pid)
            leftover = _leftover_ports(s)
        clients = {v: s.client(v) for v in FAN_VARIANTS if v in s.variants}  # while the bin dirs exist
        fallbacks = s.server_log().count("differs from server")
        run_id = lab.run_id
    if fallbacks:
        raise BenchError(f"the plugin server refused {fallbacks} call(s) (client and server versions differ); "
                         "the fan-server numbers would be standalone ones")

    variants = s.variants
    sequential = {v: {"add": summarize(seq[v]["add"]), "del": summarize(seq[v]["del"])} for v in variants}
    concurrent = {v: {"add": summarize(con[v]["add"]), "del": summarize(con[v]["del"]),
                      "add_batch_wall": summarize(con[v]["add_batch"]),
                      "del_batch_wall": summarize(con[v]["del_batch"])} for v in variants}
    for part in (sequential, concurrent):
        for stats in part.values():
            stats["add_del_median_sum"] = _sum_medians(stats)
    ratios = {}
    for v in (v for v in FAN_VARIANTS if v in variants):
        ratios[v] = {"sequential": _ratios(sequential[v], sequential["reference"]),
                     "concurrent": _ratios(concurrent[v], concurrent["reference"])}
        fan_wall = concurrent[v]["add_batch_wall"]["median"] + concurrent[v]["del_batch_wall"]["median"]
        ref_wall = (concurrent["reference"]["add_batch_wall"]["median"]
                    + concurrent["reference"]["del_batch_wall"]["median"])
        ratios[v]["concurrent"]["batch_wall_add_del"] = ratio(fan_wall, ref_wall)
    ratios["dual_stack_vs_ipv4"] = {mode: _ratios(part["fan-dual-stack"], part["fan-server"])
                                    for mode, part in (("sequential", sequential), ("concurrent", concurrent))}
    verdict = {v: {mode: {"add_del_ratio": ratios[v][mode]["add_del"],
                          "done": ratios[v][mode]["add_del"] is not None and ratios[v][mode]["add_del"] <= DONE_RATIO,
                          "target_met": (ratios[v][mode]["add_del"] is not None
                                         and ratios[v][mode]["add_del"] <= TARGET_RATIO)}
                   for mode in ("sequential", "concurrent")} for v in FAN_VARIANTS if v in variants}
    r2 = lambda xs: [round(x, 2) for x in xs]  # noqa: E731
    return {
        **envelope("latency", TITLE, started, run_id, desc),
        "method": {
            "pods_sequential": pods, "concurrent": width, "rounds": len(con["reference"]["add_batch"]),
            "rounds_requested": rounds, "budget_s": budget, "warmup_per_network": warmup,
            "timed": "wall time of one cnitool process (spawn to exit), spawned by the harness from inside the "
                     "node namespace (setns; no `ip netns exec` in the timed path)",
            "interleaving": "order of the networks rotates every pod (sequential) and every round "
                            "(concurrent)",
            "ratio": "fan / reference of medians; ADD+DEL is the ratio of the sums of the ADD and DEL medians",
            "percentiles": "median and p90 interpolated linearly between the closest ranks",
            "conflists": s.conflists,
            "clients": clients,
            "underlay": UNDERLAY_ADDRESS,
            "cni_version": "1.0.0",
        },
        "labels": LABELS,
        "sequential": sequential,
        "concurrent": concurrent,
        "ratios": ratios,
        "verdict": {"done_threshold": DONE_RATIO, "target": TARGET_RATIO, **verdict},
        "checks": {"server_children_cpu_s": round(server_cpu, 2), "server_fallbacks": fallbacks,
                   "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
                   "leftover_host_veths": leftover},
        "raw_ms": {"sequential": {v: {k: r2(x) for k, x in seq[v].items()} for v in variants},
                   "concurrent": {v: {k: r2(x) for k, x in con[v].items()} for v in variants}},
    }


# -- rendering ------------------------------------------------------------------

def _ms(stats: dict | None, key: str):
    return (stats or {}).get(key)


def _call_path_bar(variant: str, seq: dict, con: dict) -> str:
    """Issue 13's thresholds (ADD+DEL / reference) for this variant, each with whether the run meets it."""
    bars = [(bar, got.get("add_del_ratio"), mode) for bar, got, mode
            in zip(CALL_PATH_BAR[variant], (seq, con), ("sequential", "concurrent")) if bar is not None]
    return ", ".join(f"≤ {bar} {mode}: {yes_no(r is not None and r <= bar)}" for bar, r, mode in bars)


def render(data: dict) -> str:
    m = data.get("machine", {})
    method = data.get("method", {})
    labels = {**LABELS, **data.get("labels", {})}
    seq, con, ratios = data.get("sequential", {}), data.get("concurrent", {}), data.get("ratios", {})
    verdict = data.get("verdict", {})
    done, target = verdict.get("done_threshold", DONE_RATIO), verdict.get("target", TARGET_RATIO)
    out = [f"## {data.get('title', TITLE)}", ""]
    out.append(f"Measured {when(data)} UTC on {machine_line(m)}; "
               f"{m.get('reference_plugins', 'reference plugins ?')}; cni-fan {m.get('cni_fan', '?')} "
               f"(commit {m.get('git_commit', '?')}); load average {m.get('loadavg_1min_at_start', '?')} at the "
               f"start. Result: `{data.get('_file', '?')}`.")
    out.append("")
    lines = []
    for v in (v for v in FAN_VARIANTS if v in verdict):
        vv = verdict.get(v, {})
        s, c = vv.get("sequential", {}), vv.get("concurrent", {})
        lines.append(f"- **{labels[v]}**: ADD+DEL ratio {s.get('add_del_ratio')} sequential, "
                     f"{c.get('add_del_ratio')} concurrent — done (≤ {done}): {yes_no(s.get('done'))} / "
                     f"{yes_no(c.get('done'))}; product target (≤ {target}): {yes_no(s.get('target_met'))} / "
                     f"{yes_no(c.get('target_met'))}; per-call path bar (issue 13): {_call_path_bar(v, s, c)}.")
    dual = ratios.get("dual_stack_vs_ipv4")
    if dual:
        lines.append(f"- **Dual-stack against IPv4-only** (both served): ADD {dual['sequential']['add']}, "
                     f"ADD+DEL {dual['sequential']['add_del']} sequential; ADD {dual['concurrent']['add']}, "
                     f"ADD+DEL {dual['concurrent']['add_del']} concurrent.")
    out += lines + [""]

    out.append(f"### Sequential: {method.get('pods_sequential', '?')} pods, one call at a time (ms)")
    out.append("")
    out.append(md_table(["network", "ADD median", "ADD p90", "DEL median", "DEL p90", "ADD+DEL (medians)"],
                        [[labels[v], _ms(seq.get(v, {}).get("add"), "median"), _ms(seq.get(v, {}).get("add"), "p90"),
                          _ms(seq.get(v, {}).get("del"), "median"), _ms(seq.get(v, {}).get("del"), "p90"),
                          seq.get(v, {}).get("add_del_median_sum")] for v in ALL_VARIANTS if v in seq]))
    out.append("")
    out.append(f"### Concurrent: {method.get('concurrent', '?')} ADDs at once, then {method.get('concurrent', '?')} "
               f"DELs at once, {method.get('rounds', '?')} round(s) (ms)")
    out.append("")
    cut = ""
    if method.get("rounds_requested", method.get("rounds")) != method.get("rounds"):
        cut = (f" Only {method.get('rounds')} of {method.get('rounds_requested')} requested rounds fitted the "
               f"time budget of {method.get('budget_s')} s.")
    out.append("Per-call latency over all calls of all rounds; batch wall time = first spawn to last exit, "
               "median over the rounds." + cut)
    out.append("")
    out.append(md_table(["network", "ADD median", "ADD p90", "DEL median", "DEL p90", "ADD+DEL (medians)",
                         "ADD batch wall", "DEL batch wall"],
                        [[labels[v], _ms(con.get(v, {}).get("add"), "median"), _ms(con.get(v, {}).get("add"), "p90"),
                          _ms(con.get(v, {}).get("del"), "median"), _ms(con.get(v, {}).get("del"), "p90"),
                          con.get(v, {}).get("add_del_median_sum"),
                          _ms(con.get(v, {}).get("add_batch_wall"), "median"),
                          _ms(con.get(v, {}).get("del_batch_wall"), "median")] for v in ALL_VARIANTS if v in con]))
    out.append("")
    out.append("### Ratios fan / reference (of medians)")
    out.append("")
    rows = []
    for v in (v for v in FAN_VARIANTS if v in ratios):
        for mode in ("sequential", "concurrent"):
            r = ratios.get(v, {}).get(mode, {})
            vv = verdict.get(v, {}).get(mode, {})
            rows.append([labels[v], mode, r.get("add"), r.get("del"), r.get("add_del"),
                         r.get("batch_wall_add_del") if mode == "concurrent" else None,
                         yes_no(vv.get("done")), yes_no(vv.get("target_met"))])
    out.append(md_table(["fan", "mode", "ADD", "DEL", "ADD+DEL", "batch wall ADD+DEL", f"done (≤ {done})",
                         f"target (≤ {target})"], rows))
    out.append("")
    out.append("### How it was measured")
    out.append("")
    out.append(f"- One node namespace (veth `ul0` with {method.get('underlay', UNDERLAY_ADDRESS)}), one pod "
               "namespace per pod and network; all named `bfan-<run>-…` and removed afterwards.")
    out.append("- Networks, each a `cniVersion` 1.0.0 conflist called through `cnitool add|del NET "
               "/var/run/netns/POD` with its own `NETCONFPATH`: reference = `bridge` (own bridge, isGateway, "
               "no ipMasq) + `host-local` (242.1.10.0/24); fan = `fan` (overlay 241.0.0.0/8, underlay "
               "198.18.0.0/16) with `agentSocket` served by `cni-fan serve` started in the node namespace, "
               "or pointing to a socket nobody serves (standalone: every call imports pyroute2); both fan variants "
               "are one network (one bridge, one address pool), as on a node whose agent is down for a while"
               + (f"; dual-stack = `fan` with overlay 243.0.0.0/8 and overlay6 {OVERLAY6}, served, its own bridge "
                  "and pool." if "fan-dual-stack" in seq else "."))
    if "fan-server-bundle" in seq:
        out.append("- Bundle: the PyInstaller bundle (`make build`), installed with its own `cni-fan install` and "
                   "served by its own `cni-fan serve` in the node namespace; same network, bridge and pool as the "
                   "venv's fan variants, whose plugins the venv's `cni-fan install` wrote.")
    if method.get("clients"):
        out.append("- `fan` was: " + "; ".join(f"{labels.get(v, v)}: {c}" for v, c in method["clients"].items()) + ".")
    out.append(f"- Timed: {method.get('timed', '?')}.")
    out.append(f"- Interleaving: {method.get('interleaving', '?')}; "
               f"{method.get('warmup_per_network', '?')} uncounted warm-up ADD+DEL per network first.")
    out.append(f"- Ratios: {method.get('ratio', '?')}; {method.get('percentiles', 'median and p90')}.")
    checks = data.get("checks", {})
    if checks:
        out.append(f"- Checks: plugin-server children used {checks.get('server_children_cpu_s')} s CPU (proof the "
                   f"fast path ran); version fallbacks {checks.get('server_fallbacks')}; host veths left after "
                   f"DEL {checks.get('leftover_host_veths')}. Full run took {data.get('duration_s', '?')} s; load average "
                   f"{m.get('loadavg_1min_at_start', '?')} at the start, {checks.get('loadavg_1min_at_end', '?')} at "
                   "the end (other work on the machine inflates both sides, the heavier side more).")
    return "\n".join(out) + "\n"


def render_history(runs: list[dict]) -> str:
    """One line per stored result, newest first (only when there is more than one)."""
    def cells(d: dict) -> list:
        r = d.get("ratios", {})
        return [r.get(v, {}).get(mode, {}).get("add_del") for v in ("fan-server", "fan-standalone")
                for mode in ("sequential", "concurrent")]

    return history_table(runs, "Earlier runs (ADD+DEL ratio fan / reference)",
                         ["server, sequential", "server, concurrent", "standalone, sequential",
                          "standalone, concurrent"], cells)
