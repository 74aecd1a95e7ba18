"""The bridge at scale (issue 5): N pods on one node, fan against bridge + host-local.

One node namespace (underlay veth `ul0` with 198.18.1.10/22) and, per size
N (default 100, 500, 1,000), N pod namespaces used by each network in turn:

- fan: `fan` with overlay 241.0.0.0/8 over underlay 198.18.0.0/22 (a /18
  slice, room for 16,381 pods), the plugin server running in the node
  namespace, neighbour suppression and anti-spoofing on (the defaults);
- fan-noguard: the same with `neighSuppress` and `antiSpoof` false (what
  the guard costs, and what the bridge does without it);
- reference: `bridge` (isGateway, no masquerade) + `host-local`, subnet
  sized for N (242.1.0.0/22 for 1,000).

Measured, through cnitool as a runtime calls plugins:

1. Bulk: ADD of all N pods, C calls at a time (default 8), then DEL of all
   N: wall time of each phase and per-call latency.
2. Broadcast: with the N pods attached, one pod resolves K others (default
   10): its neighbour table is flushed and it pings each target once.
   Reported per ARP resolution: the ARP frames delivered to the other pods
   (tcpdump on the host veths of 8 of them, scaled to all), and every frame
   delivered to them (host veth tx counters; this includes the IPv6
   multicast new pods send, which the guard also stops).
3. Sequential latency: S pods (default 30) added and deleted one call at a
   time, the three networks interleaved: the ADD latency with and without
   the guard.

    .venv/bin/python -m bench.run --only bridge_scale
    .venv/bin/python -m bench.run --only bridge_scale --sizes 50 --seq-pods 10   # quick
    .venv/bin/python -m bench.bridge_scale --sizes 100 --no-write               # on its own
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (BenchError, Call, Lab, cni_fan_command, find_cnitool, inside_netns, ip, run_batch,
                          wait_for_path)
from bench.record import envelope, machine, machine_line, md_table, ratio, summarize, utc_now, when

TITLE = "The bridge at scale: N pods on one node (issue 5)"
ORDER = 30
DEFAULT_SIZES = (100, 500, 1000)
DEFAULT_PARALLEL = 8
DEFAULT_TARGETS = 10
DEFAULT_SEQ_PODS = 30
CAPTURED = 8  # bystanders whose ARP frames are captured with tcpdump
UNDERLAY_ADDRESS = "198.18.1.10/22"
VARIANTS = ("fan", "fan-noguard", "reference")
LABELS = {"fan": "fan (guard on: defaults)", "fan-noguard": "fan, neighSuppress and antiSpoof off",
          "reference": "reference: bridge + host-local"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None, metavar="N,N",
                        help=f"bridge_scale: pod counts (default {','.join(map(str, DEFAULT_SIZES))}; "
                             "--pods N means just N)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="C",
                        help=f"bridge_scale: calls at a time in the bulk phases (default {DEFAULT_PARALLEL})")
    parser.add_argument("--targets", type=int, default=DEFAULT_TARGETS, metavar="K",
                        help=f"bridge_scale: ARP resolutions per size and network (default {DEFAULT_TARGETS})")
    parser.add_argument("--seq-pods", type=int, default=DEFAULT_SEQ_PODS, metavar="S",
                        help=f"bridge_scale: pods added one at a time per network (default {DEFAULT_SEQ_PODS})")


def _log(msg: str) -> None:
    print(f"bridge_scale: {msg}", file=sys.stderr, flush=True)


def _sizes(args) -> list[int]:
    raw = getattr(args, "sizes", None)
    if raw:
        sizes = [int(x) for x in str(raw).split(",") if x.strip()]
    elif getattr(args, "pods", None):
        sizes = [int(args.pods)]
    else:
        sizes = list(DEFAULT_SIZES)
    if not sizes or min(sizes) < 3 or max(sizes) > 4000:
        raise BenchError("--sizes must be pod counts from 3 to 4000")
    return sizes


def _reference_subnet(n: int) -> str:
    prefix = 32 - math.ceil(math.log2(n + 3))
    return f"242.1.0.0/{min(prefix, 24)}"


class Setup:
    def __init__(self, lab: Lab, max_pods: int) -> None:
        self.lab = lab
        self.cnitool = find_cnitool()
        for plugin in ("bridge", "host-local"):
            if not Path("/usr/lib/cni", plugin).exists():
                raise BenchError(f"reference plugin {plugin} not found in /usr/lib/cni")
        tmp = lab.tmp
        self.bin_dir = tmp / "bin"
        install = subprocess.run([*cni_fan_command(), "install", "--bin-dir", str(self.bin_dir)],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            raise BenchError(f"cni-fan install failed: {install.stderr}")
        self.socket = tmp / "plugin.sock"
        self.fan_net = lab.name("fan")
        self.conflists: dict[str, dict] = {}
        self.node = lab.add_netns(["node"])[0]
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"],
                    ["addr", "add", UNDERLAY_ADDRESS, "dev", "ul0"], ["link", "set", "ul0", "up"],
                    ["link", "set", "ul1", "up"]):
            ip(*cmd, netns=self.node)
        self.pods = lab.add_netns(f"p{i}" for i in range(max_pods))
        self.server = None
        self.write_confs(max_pods)

    def write_confs(self, n: int) -> None:
        """Confs for N pods; the reference gets a bridge of its own per size (its gateway prefix changes)."""
        tmp = self.lab.tmp
        self.ref_bridge = self.lab.name(f"b{n}")[-15:]
        fan = {"type": "fan", "overlay": "241.0.0.0/8", "underlay": "198.18.0.0/22",
               "dataDir": str(tmp / "fan-data"), "agentSocket": str(self.socket), "logLevel": "warning"}
        plugins = {
            "fan": (self.fan_net, fan),
            "fan-noguard": (self.fan_net, {**fan, "neighSuppress": False, "antiSpoof": False}),
            "reference": (self.lab.name("ref"), {"type": "bridge", "bridge": self.ref_bridge, "isGateway": True,
                                                 "ipMasq": False,
                                                 "ipam": {"type": "host-local", "subnet": _reference_subnet(n),
                                                          "dataDir": str(tmp / "host-local")}}),
        }
        for variant, (net, plugin) in plugins.items():
            conf_dir = tmp / "conf" / variant
            conf_dir.mkdir(parents=True, exist_ok=True)
            conflist = {"cniVersion": "1.0.0", "name": net, "plugins": [plugin]}
            text = json.dumps(conflist, indent=1)
            (conf_dir / f"10-{variant}.conflist").write_text(text + "\n")
            self.conflists[variant] = json.loads(text.replace(str(tmp), "<tmp>").replace(self.lab.prefix,
                                                                                         "bfan-<run>-"))

    def env(self, variant: str) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": str(self.lab.tmp / "conf" / variant),
                "CNI_PATH": f"{self.bin_dir}:/usr/lib/cni"}

    def net(self, variant: str) -> str:
        return self.lab.name("ref") if variant == "reference" else self.fan_net

    def start_server(self) -> None:
        log = open(self.lab.tmp / "server.log", "wb")
        self.server = self.lab.spawn([*cni_fan_command(), "serve", "--socket", str(self.socket),
                                      "--log-level", "warning"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        wait_for_path(self.socket, 60, self.server, "the plugin server")

    def calls(self, verb: str, variant: str, pods: list[str], parallel: int) -> tuple[list[Call], float]:
        """All calls, `parallel` at a time; returns the calls and the wall time of the whole phase."""
        out: list[Call] = []
        started = time.perf_counter()
        for start in range(0, len(pods), parallel):
            chunk = pods[start:start + parallel]
            calls = run_batch([[self.cnitool, verb, self.net(variant), f"/var/run/netns/{p}"] for p in chunk],
                              self.env(variant), timeout=600)
            for pod, call in zip(chunk, calls):
                call.check(f"{variant} {verb.upper()} {pod}")
            out += calls
        return out, time.perf_counter() - started

    def host_veths(self, calls: list[Call]) -> list[str]:
        """The host end of each pod's veth, from the ADD results."""
        out = []
        for call in calls:
            result = json.loads(call.stdout)
            names = [i["name"] for i in result["interfaces"] if not i.get("sandbox") and i["name"] != self.ref_bridge]
            out.append(names[0])
        return out

    def tx(self) -> dict[str, int]:
        links = json.loads(ip("-j", "-s", "link", "show", netns=self.node))
        return {link["ifname"]: link["stats64"]["tx"]["packets"] for link in links}

    def leftovers(self) -> int:
        """Bridge ports still in the node (should be none after the DELs)."""
        return sum(1 for link in json.loads(ip("-j", "link", "show", netns=self.node)) if "master" in link)


def _wait_listening(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until tcpdump says it is capturing (it can take seconds to start on a busy machine)."""
    deadline = time.monotonic() + timeout
    line = b""
    while b"listening on" not in line:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise BenchError(f"tcpdump did not start: {line!r}")
        line = proc.stderr.readline()


def _backlog_drops() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full (/proc/net/softnet_stat, all CPUs).

    A flood to N veths queues N copies on the sending CPU's backlog at once
    (`netdev_max_backlog`, 1000 by default): past that, copies are dropped,
    the target's among them. Machine-wide, so other work counts too.
    """
    with open("/proc/net/softnet_stat", encoding="ascii") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def _broadcast(s: Setup, pods: list[str], veths: list[str], targets: int, rng: random.Random,
               must_resolve: bool) -> dict:
    """One pod resolves `targets` others; what the rest of the bridge receives meanwhile.

    A resolution that gets no answer (no reply to ping within 5 s, i.e. the
    kernel's three ARP requests one second apart all lost) is counted, not
    fatal, for networks that flood: that is the failure this benchmark is
    about. For `must_resolve` (fan with its guard: nothing is flooded) it is
    a bug and stops the run.
    """
    asker = 0
    chosen = rng.sample(range(1, len(pods)), min(targets, len(pods) - 1))
    addresses = []
    for i in chosen:
        out = subprocess.run(["ip", "-j", "-n", pods[i], "-4", "addr", "show", "eth0"], capture_output=True,
                             text=True, check=True).stdout
        addresses.append(json.loads(out)[0]["addr_info"][0]["local"])
    subprocess.run(["ip", "-n", pods[asker], "neigh", "flush", "dev", "eth0"], check=True)
    bystanders = [veths[i] for i in range(1, len(pods)) if i not in set(chosen)]
    watched = rng.sample(bystanders, min(CAPTURED, len(bystanders)))
    pcaps = [s.lab.tmp / f"{v}.pcap" for v in watched]
    captures = [s.lab.spawn(["tcpdump", "-n", "--immediate-mode", "-Q", "out", "-i", v, "-U", "-w", str(p), "arp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for v, p in zip(watched, pcaps)]
    for proc in captures:
        _wait_listening(proc)
    before, drops_before = s.tx(), _backlog_drops()
    # -W 5: room for the kernel's ARP retries (1 s apart) when a 1,000-port flood is slow to answer.
    script = "for ip in " + " ".join(addresses) + "; do ping -n -q -c 1 -W 5 $ip >/dev/null 2>&1 || echo $ip; done"
    failed = subprocess.run(["nsenter", f"--net=/var/run/netns/{pods[asker]}", "sh", "-c", script],
                            capture_output=True, text=True).stdout.split()
    after, drops_after = s.tx(), _backlog_drops()
    time.sleep(0.3)
    for proc in captures:
        proc.terminate()
        proc.wait(timeout=10)
    if failed and must_resolve:
        raise BenchError(f"pings failed: {failed[:5]}")
    arp_seen = sum(len(subprocess.run(["tcpdump", "-n", "-r", str(p)], capture_output=True, text=True)
                       .stdout.splitlines()) for p in pcaps)
    to_targets = [after[veths[i]] - before[veths[i]] for i in chosen]
    to_bystanders = sum(after[v] - before[v] for v in bystanders)
    arp_per_bystander = arp_seen / len(watched) if watched else 0.0
    return {"resolutions": len(chosen), "bystanders": len(bystanders), "captured_bystanders": len(watched),
            "arp_frames_on_captured": arp_seen,
            "broadcast_per_resolution": round(arp_per_bystander * len(bystanders) / len(chosen), 2),
            "frames_to_bystanders": to_bystanders,
            "all_frames_per_resolution": round(to_bystanders / len(chosen), 2),
            "frames_per_target": round(sum(to_targets) / len(chosen), 2),
            "failed_resolutions": len(failed), "backlog_drops": drops_after - drops_before}


def _bulk(s: Setup, n: int, parallel: int, targets: int, rng: random.Random) -> dict:
    out = {}
    pods = s.pods[:n]
    s.write_confs(n)
    for variant in _rotate(VARIANTS, n):
        adds, add_wall = s.calls("add", variant, pods, parallel)
        veths = s.host_veths(adds)
        bcast = _broadcast(s, pods, veths, targets, rng, must_resolve=variant == "fan")
        dels, del_wall = s.calls("del", variant, pods, parallel)
        left = s.leftovers()
        out[variant] = {"add_wall_s": round(add_wall, 2), "del_wall_s": round(del_wall, 2),
                        "add_ms": summarize([c.ms for c in adds]), "del_ms": summarize([c.ms for c in dels]),
                        "broadcast": bcast, "leftover_ports": left}
        _log(f"N={n} {variant}: ADD {add_wall:.1f} s, DEL {del_wall:.1f} s, "
             f"{bcast['broadcast_per_resolution']} broadcast frames per resolution")
    return out


def _rotate(seq, k: int) -> tuple:
    k %= len(seq)
    return tuple(seq[k:]) + tuple(seq[:k])


def _sequential(s: Setup, count: int) -> dict:
    """One pod namespace per step: ADD then DEL, one call at a time, the networks interleaved."""
    samples = {v: {"add": [], "del": []} for v in VARIANTS}
    s.write_confs(max(count, 3))
    for i, pod in enumerate(s.pods[:count]):
        for variant in _rotate(VARIANTS, i):
            samples[variant]["add"].append(s.calls("add", variant, [pod], 1)[0][0].ms)
            samples[variant]["del"].append(s.calls("del", variant, [pod], 1)[0][0].ms)
    return {v: {"add": summarize(samples[v]["add"]), "del": summarize(samples[v]["del"])} for v in VARIANTS}


def run(args) -> dict:
    sizes = _sizes(args)
    parallel = max(1, int(getattr(args, "parallel", None) or DEFAULT_PARALLEL))
    targets = max(1, int(getattr(args, "targets", None) or DEFAULT_TARGETS))
    seq_pods = max(0, int(getattr(args, "seq_pods", DEFAULT_SEQ_PODS) if getattr(args, "seq_pods", None)
                          is not None else DEFAULT_SEQ_PODS))
    started = utc_now()
    desc = machine()
    rng = random.Random(5)
    with Lab() as lab:
        _log(f"run {lab.run_id}: sizes {sizes}, {parallel} calls at a time, {targets} resolutions, "
             f"{seq_pods} sequential pods")
        s = Setup(lab, max(sizes + [seq_pods, 3]))
        with inside_netns(s.node):
            subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True)
            s.start_server()
            s.calls("add", "fan", s.pods[:1], 1)  # warm-up; also creates the bridge
            s.calls("del", "fan", s.pods[:1], 1)
            sequential = _sequential(s, seq_pods) if seq_pods else {}
            bulk = {str(n): _bulk(s, n, parallel, targets, rng) for n in sizes}
        run_id = lab.run_id
    guard_cost = {}
    if sequential:
        guard_cost = {"add_median_ms": round(sequential["fan"]["add"]["median"]
                                             - sequential["fan-noguard"]["add"]["median"], 2),
                      "del_median_ms": round(sequential["fan"]["del"]["median"]
                                             - sequential["fan-noguard"]["del"]["median"], 2)}
    ratios = {n: {"add_wall": ratio(b["fan"]["add_wall_s"], b["reference"]["add_wall_s"]),
                  "del_wall": ratio(b["fan"]["del_wall_s"], b["reference"]["del_wall_s"])} for n, b in bulk.items()}
    return {
        **envelope("bridge_scale", TITLE, started, run_id, desc),
        "method": {"sizes": sizes, "parallel": parallel, "targets": targets, "sequential_pods": seq_pods,
                   "underlay": UNDERLAY_ADDRESS, "conflists": s.conflists, "cni_version": "1.0.0",
                   "timed": "wall time of cnitool processes spawned from inside the node namespace; bulk phases "
                            "run `parallel` at a time, a phase's wall time is from its first spawn to its last exit",
                   "broadcast": "ARP frames the node delivered to pods that were neither the asker nor a target "
                                f"(tcpdump on {CAPTURED} of them, scaled to all), divided by the resolutions; "
                                "all frames: host veth tx counters of all of them (IPv6 off on the node itself)"},
        "labels": LABELS,
        "sequential": sequential,
        "guard_cost": guard_cost,
        "bulk": bulk,
        "ratios_fan_to_reference": ratios,
    }


# -- rendering ------------------------------------------------------------------

def render(data: dict) -> str:
    m = data.get("machine", {})
    method = data.get("method", {})
    labels = {**LABELS, **data.get("labels", {})}
    out = [f"## {data.get('title', TITLE)}", "",
           f"Measured {when(data)} UTC on {machine_line(m)} "
           f"(load {m.get('loadavg_1min_at_start', '?')} at start); cni-fan {m.get('cni_fan', '?')} "
           f"(commit {m.get('git_commit', '?')}). Result: `{data.get('_file', '?')}`.", ""]
    bulk = data.get("bulk", {})
    rows = []
    for n, per in bulk.items():
        for v in VARIANTS:
            if v in per:
                b = per[v]
                rows.append([n, labels[v], b["add_wall_s"], b["del_wall_s"], b["add_ms"].get("median"),
                             b["add_ms"].get("p90"), b["del_ms"].get("median"),
                             b["broadcast"]["broadcast_per_resolution"],
                             b["broadcast"].get("all_frames_per_resolution"),
                             _failed_cell(b["broadcast"]), b.get("leftover_ports")])
    out.append(f"### ADD and DEL of N pods, {method.get('parallel', '?')} calls at a time; broadcast per ARP "
               "resolution")
    out.append("")
    out.append(md_table(["N", "network", "ADD all (s)", "DEL all (s)", "ADD median (ms)", "ADD p90 (ms)",
                         "DEL median (ms)", "ARP broadcasts to other pods per resolution",
                         "all frames to other pods per resolution", "resolutions failed (backlog drops)",
                         "ports left"], rows))
    out.append("")
    seq = data.get("sequential", {})
    if seq:
        out.append(f"### One call at a time ({method.get('sequential_pods', '?')} pods per network, interleaved), ms")
        out.append("")
        out.append(md_table(["network", "ADD median", "ADD p90", "DEL median", "DEL p90"],
                            [[labels[v], seq[v]["add"].get("median"), seq[v]["add"].get("p90"),
                              seq[v]["del"].get("median"), seq[v]["del"].get("p90")] for v in VARIANTS if v in seq]))
        cost = data.get("guard_cost", {})
        out.append("")
        out.append(f"The guard (neighbour suppression and anti-spoofing) adds {cost.get('add_median_ms')} ms to the "
                   f"median ADD and {cost.get('del_median_ms')} ms to the median DEL.")
        out.append("")
    out.append("### How it was measured")
    out.append("")
    out.append(f"- {method.get('timed', '')}.")
    out.append(f"- Broadcast: {method.get('broadcast', '')}. One pod flushes its neighbour table and pings "
               f"{method.get('targets', '?')} others once each. Without the guard every ARP request reaches every "
               "port; with it the bridge answers on the requester's port.")
    out.append("- Resolutions failed: pings with no reply within 5 s (the kernel's three ARP requests, one second "
               "apart, all lost). A flood queues one copy per port on the sending CPU's input backlog "
               "(`net.core.netdev_max_backlog`, 1000 here); the copies past it are dropped, the target's among "
               "them, and in the same order each time. Backlog drops are the machine-wide increase of "
               "/proc/net/softnet_stat's drop counter during the resolutions (– in results older than this column).")
    out.append("- Networks: " + "; ".join(f"{labels[v]}" for v in VARIANTS) + ". Conflists in the result file.")
    out.append(f"- The whole run took {data.get('duration_s', '?')} s.")
    return "\n".join(out) + "\n"


def _failed_cell(broadcast: dict) -> str:
    if "failed_resolutions" not in broadcast:
        return "–"
    return f"{broadcast['failed_resolutions']} of {broadcast['resolutions']} ({broadcast.get('backlog_drops', '?')})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bridge_scale", description=TITLE)
    parser.add_argument("--pods", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print the result instead of writing it")
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    if args.no_write:
        print(json.dumps(result, indent=1))
    else:
        from bench.common import write_result

        print(write_result("bridge_scale", result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
