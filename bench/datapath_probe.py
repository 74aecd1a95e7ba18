"""Rough throughput probe: our eBPF Fan datapath vs a flannel-style VXLAN.

Builds two labs side by side (tests/harness/bpflab.py, the lab of
tests/test_bpf_datapath.py: an underlay switch, 2 nodes, one pod per node),
one per datapath, then runs single-stream TCP iperf3 pod -> pod across the
nodes, alternating between the datapaths, and prints the ratio.

    sudo .venv/bin/python bench/datapath_probe.py [--rounds 4] [--seconds 10]

Everything lives in namespaces named tbpf-*; they are removed at the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lab_module():
    """The Lab class lives in the tests' harness (tests/harness/bpflab.py)."""
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from harness import bpflab
    return bpflab


def _ping(pod, dst: str):
    """One echo from the pod (the datapath tests' pinger)."""
    from harness.ping import echo
    return echo(pod.path, dst)


def iperf(lab, seconds: int, port: int, attempts: int = 3) -> dict:
    """One single-stream TCP run pod 1 -> pod 2; a fresh one-off server per
    attempt (an attempt that failed half-way leaves no server behind)."""
    src, dst = lab.pods[0], lab.pods[1]
    last = ""
    for _ in range(attempts):
        server = subprocess.Popen(
            ["ip", "netns", "exec", dst.ns, "iperf3", "-s", "-1", "-p",
             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            out = subprocess.run(
                ["ip", "netns", "exec", src.ns, "iperf3", "-c",
                 str(dst.address), "-p", str(port), "-t", str(seconds), "-J"],
                capture_output=True, text=True, timeout=seconds + 30)
            data = json.loads(out.stdout or "{}")
            if out.returncode == 0 and "error" not in data:
                end = data["end"]
                cpu = end["cpu_utilization_percent"]
                gbytes = end["sum_received"]["bytes"] / 1e9
                secs = end["sum_received"]["seconds"]
                return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                        "retransmits": end["sum_sent"].get("retransmits", 0),
                        "cpu": cpu["host_total"],
                        # CPU time of sender + receiver per GB: less
                        # sensitive than throughput to other load.
                        "cpu_s_per_gb": (cpu["host_total"]
                                         + cpu["remote_total"]) / 100
                        * secs / gbytes}
            last = data.get("error") or out.stderr[-300:]
        finally:
            server.kill()
            server.wait()
    raise RuntimeError(f"iperf3 failed {attempts} times: {last}")


# name -> Lab keyword arguments. "fan" is the product configuration.
VARIANTS = {
    "fan": dict(mode="fan", attach_point="none"),       # egress-only default
    "fan-bridge": dict(mode="fan", attach_point="bridge"),
    "fan-onlink": dict(mode="fan", attach_point="none",
                       onlink_underlay=True),
    "fan-veth": dict(mode="fan", attach_point="veth"),
    "fan-nocount": dict(mode="fan", attach_point="none", counters=False),
    "flannel": dict(mode="flannel"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--variants", default="fan,fan-bridge,flannel",
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    names = args.variants.split(",")
    if "flannel" not in names:
        names.append("flannel")
    mod = _lab_module()
    labs = {n: mod.Lab(nodes=2, **VARIANTS[n]) for n in names}
    results: dict[str, list[dict]] = {k: [] for k in labs}
    counters = {}
    try:
        for lab in labs.values():
            lab.build()
        for name, lab in labs.items():     # warm-up: ARP, caches
            _ping(lab.pods[0], str(lab.pods[1].address))
        for r in range(args.rounds):
            # Rotate the order so no variant always runs first or last.
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                res = iperf(labs[name], args.seconds, 5201 + r)
                results[name].append(res)
                print(f"round {r + 1} {name:11s} {res['gbps']:6.2f} Gbit/s "
                      f"retr {res['retransmits']:5d} cpu {res['cpu']:5.1f} % "
                      f"{res['cpu_s_per_gb']:.3f} cpu-s/GB",
                      flush=True)
        for name, lab in labs.items():
            if lab.mode == "fan" and lab.with_counters:
                counters[name] = lab.counters(lab.nodes[0])
    finally:
        for lab in labs.values():
            lab.close()
    base = results["flannel"]
    print(f"flannel-style median {statistics.median(x['gbps'] for x in base):.2f}"
          " Gbit/s")
    for name in names:
        if name == "flannel":
            continue
        got = results[name]
        ratios = [f["gbps"] / b["gbps"] for f, b in zip(got, base)]
        cpu = [f["cpu_s_per_gb"] / b["cpu_s_per_gb"] for f, b in zip(got, base)]
        print(f"{name:11s} median {statistics.median(x['gbps'] for x in got):.2f}"
              f" Gbit/s; throughput ratio to flannel-style: median of rounds "
              f"{statistics.median(ratios):.3f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"CPU per GB ratio {statistics.median(cpu):.3f}")
    for name, c in counters.items():
        print(f"{name} node 1 counters: "
              + ", ".join(f"{h}/{k}={v}" for (h, k), v in c.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
