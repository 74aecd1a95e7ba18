"""The throughput benchmark's section of docs/benchmarks.md, rendered from a stored result."""
from __future__ import annotations

from bench.record import history_table, machine_line, md_table, ratio, when, yes_no

TITLE = "Throughput, per-node state and `node up`: fan against flannel-style VXLAN (issue 3)"
VARIANTS = ("underlay", "underlay6", "fan_direct", "fan", "fan6", "flannel", "hostgw")
LABELS = {
    "underlay": "node ↔ node over the underlay",
    "fan": "fan: pod ↔ pod across nodes (eBPF encapsulation)",
    "fan6": "fan over IPv6: the same pods, their IPv6 addresses",
    "underlay6": "node ↔ node over the underlay's IPv6",
    "flannel": "flannel-style VXLAN: pod ↔ pod across nodes",
    "fan_direct": "fan with direct routing: pod ↔ pod, unencapsulated within the segment",
    "hostgw": "flannel host-gw-style: pod ↔ pod, a route per peer",
}

SHORT = {"underlay": "underlay", "underlay6": "underlay IPv6", "fan": "fan", "fan6": "fan IPv6",
         "flannel": "flannel-style", "fan_direct": "fan direct", "hostgw": "host-gw-style"}


def render(data: dict) -> str:
    m = data.get("machine", {})
    method = data.get("method", {})
    labels = {**LABELS, **data.get("labels", {})}
    tp = data.get("throughput", {})
    rt = tp.get("ratios", {})
    verdict = data.get("verdict", {})
    ent = data.get("entries", {})
    nu = data.get("node_up", {})
    out = [f"## {data.get('title', TITLE)}", ""]
    out.append(f"Measured {when(data)} UTC on {machine_line(m)}; "
               f"{method.get('iperf3', 'iperf3')}; cni-fan "
               f"{m.get('cni_fan', '?')} (commit {m.get('git_commit', '?')}); load average "
               f"{m.get('loadavg_1min_at_start', '?')} at the start, {m.get('loadavg_1min_at_end', '?')} at the end "
               f"(the machine is shared: absolute numbers are noisy, the interleaved ratios less so). "
               f"Result: `{data.get('_file', '?')}`.")
    out.append("")
    per_round = rt.get("fan_over_flannel_per_round") or []
    spread = f" (per round {min(per_round):.2f} to {max(per_round):.2f})" if per_round else ""
    out.append(f"- **Throughput, fan / flannel-style VXLAN: {rt.get('fan_over_flannel')}**{spread}; median of the "
               f"per-round ratios {rt.get('fan_over_flannel_median_of_rounds')}. Target ≥ "
               f"{verdict.get('throughput_target')}: {yes_no(verdict.get('throughput_met'))}; within noise (≥ "
               f"{round(verdict.get('throughput_target', 1) - verdict.get('noise_tolerance', 0), 2)}): "
               f"{yes_no(verdict.get('throughput_met_within_noise'))}. Against the underlay: fan "
               f"{rt.get('fan_over_underlay')}, flannel-style {rt.get('flannel_over_underlay')}. CPU per GB, fan / "
               f"flannel-style: {rt.get('cpu_per_gb_fan_over_flannel')}.")
    if rt.get("fan6_over_fan") is not None:
        per6 = rt.get("fan6_over_fan_per_round") or []
        spread6 = f" (per round {min(per6):.2f} to {max(per6):.2f})" if per6 else ""
        out.append(f"- **Throughput, fan over IPv6 / fan over IPv4 (same pods, same run): {rt['fan6_over_fan']}**"
                   f"{spread6}; median of the per-round ratios {rt.get('fan6_over_fan_median_of_rounds')}. Target ≥ "
                   f"{verdict.get('ipv6_target')}: {yes_no(verdict.get('ipv6_met'))}. IPv6 / flannel-style (IPv4): "
                   f"{rt.get('fan6_over_flannel')}."
                   + (f" The kernel's own cost, node ↔ node over the underlay, IPv6 / IPv4: "
                      f"{rt['underlay6_over_underlay']}." if rt.get("underlay6_over_underlay") is not None else ""))
    if rt.get("fan_direct_over_underlay") is not None:
        out.append(f"- **Throughput, fan with direct routing / underlay: {rt['fan_direct_over_underlay']}** "
                   f"(per round {_span(rt.get('fan_direct_over_underlay_per_round'))}); target ≥ "
                   f"{verdict.get('direct_underlay_target')}: {yes_no(verdict.get('direct_underlay_met'))}. "
                   f"**Fan direct / host-gw-style: {rt.get('fan_direct_over_hostgw')}** (per round "
                   f"{_span(rt.get('fan_direct_over_hostgw_per_round'))}); target ≥ "
                   f"{verdict.get('direct_hostgw_target')}: {yes_no(verdict.get('direct_hostgw_met'))}. "
                   f"Host-gw-style / underlay: {rt.get('hostgw_over_underlay')}; CPU per GB, fan direct / "
                   f"host-gw-style: {rt.get('cpu_per_gb_fan_direct_over_hostgw')}. Fan VXLAN / flannel-style: "
                   f"{rt.get('fan_over_flannel')} (above).")
    totals = ent.get("fan_totals") or []
    out.append(f"- **Per-node datapath entries**: fan {', '.join(map(str, totals))} at "
               f"{', '.join(str(r['nodes']) for r in ent.get('rows', []))} nodes (constant: "
               f"{yes_no(ent.get('fan_constant'))}); flannel-style "
               + (f"grows by {ent['flannel_entries_per_added_node']} per node."
                  if ent.get("flannel_entries_per_added_node") is not None else "measured at one lab size only.")
               + (f" With direct routing the fan holds {', '.join(map(str, ent['fan_direct_totals']))}; "
                  f"host-gw-style {', '.join(map(str, ent.get('hostgw_totals') or []))}."
                  if ent.get("fan_direct_totals") else ""))
    fresh, again = nu.get("fresh", {}), nu.get("again", {})
    out.append(f"- **`node up`**: {fresh.get('wall_ms', {}).get('median')} ms (process wall time, median) on a fresh "
               f"node, {again.get('wall_ms', {}).get('median')} ms on a node already up; under "
               f"{verdict.get('node_up_target_s')} s: {yes_no(verdict.get('node_up_met'))}.")
    out.append("")

    out.append(f"### Single-stream TCP, {method.get('rounds', '?')} rounds of {method.get('seconds_per_run', '?')} s")
    out.append("")
    med, lo, hi = tp.get("median_gbps", {}), tp.get("min_gbps", {}), tp.get("max_gbps", {})
    cpu, retr = tp.get("median_cpu_s_per_gb", {}), tp.get("median_retransmits", {})
    under = med.get("underlay")
    rows = [[labels.get(v, v), med.get(v), lo.get(v), hi.get(v), ratio(med.get(v) or 0, under or 0),
             ratio(med.get(v) or 0, med.get("flannel") or 0), retr.get(v), cpu.get(v)]
            for v in VARIANTS if v in med]
    out.append(md_table(["path", "median Gbit/s", "min", "max", "/ underlay", "/ flannel-style",
                         "retransmits (median)", "iperf3 CPU s per GB (median)"], rows))
    out.append("")
    runs = tp.get("runs", {})
    if runs.get("fan"):
        rrows = []
        per6 = rt.get("fan6_over_fan_per_round") or []
        present = [v for v in VARIANTS if runs.get(v)]
        for i, fan in enumerate(runs["fan"]):
            of = {v: (runs[v][i] if i < len(runs[v]) else {}) for v in present}
            order = sorted(((v, x) for v, x in of.items() if x), key=lambda kv: kv[1].get("position", 0))
            rrows.append([fan.get("round", i + 1), " → ".join(SHORT.get(k, k) for k, _ in order),
                          *(of[v].get("gbps") for v in present), per_round[i] if i < len(per_round) else None]
                         + ([per6[i] if i < len(per6) else None] if per6 else []))
        out.append("Per round (Gbit/s):")
        out.append("")
        out.append(md_table(["round", "order", *(SHORT[v] for v in present), "fan / flannel-style"]
                            + (["fan IPv6 / fan"] if per6 else []), rrows))
        out.append("")

    out.append("### Per-node datapath entries as the lab grows")
    out.append("")
    erows = []
    direct_rows = any("fan_direct" in r for r in ent.get("rows", []))
    for r in ent.get("rows", []):
        f, fl = r.get("fan", {}).get("node1", {}), r.get("flannel", {}).get("node1", {})
        same = (r.get("fan", {}).get("min_total") == r.get("fan", {}).get("max_total")
                and r.get("flannel", {}).get("min_total") == r.get("flannel", {}).get("max_total"))
        erows.append([r.get("nodes"), f.get("routes"), f.get("neighbours"), f.get("fdb"), f.get("tc_filters"),
                      f.get("total"), fl.get("routes"), fl.get("neighbours"), fl.get("fdb"), fl.get("tc_filters"),
                      fl.get("total"), yes_no(same), sum((r.get("fan_per_peer_entries_lab_check") or {}).values())]
                     + ([r.get("fan_direct", {}).get("node1", {}).get("total"),
                         r.get("hostgw", {}).get("node1", {}).get("total"),
                         sum((r.get("fan_direct_per_peer_entries_lab_check") or {}).values())] if direct_rows else []))
    out.append(md_table(["nodes", "fan routes", "fan neigh", "fan FDB", "fan tc", "**fan total**", "flannel routes",
                         "flannel neigh", "flannel FDB", "flannel tc", "**flannel-style total**",
                         "same on every node", "fan per-peer entries (lab check)"]
                        + (["**fan direct total**", "**host-gw-style total**", "fan direct per-peer entries"]
                           if direct_rows else []), erows))
    out.append("")
    out.append("Counted on node 1 (and compared with every other node): "
               f"{method.get('entries_counted', '')}. The last column is `lab check`'s own per-peer search "
               "(routes, neighbours, FDB, tunnels naming a remote node) on nodes 1 and N before the flannel-style "
               "datapath is added.")
    out.append("")

    out.append(f"### `cni-fan node up`, {nu.get('runs', '?')} runs of each kind (ms)")
    out.append("")
    nrows = []
    for mode, label in (("fresh", "fresh node (after `node down`)"), ("again", "node already up")):
        s = nu.get(mode, {})
        nrows.append([label, s.get("wall_ms", {}).get("median"), s.get("wall_ms", {}).get("p90"),
                      s.get("wall_ms", {}).get("max"), s.get("in_process_ms", {}).get("median"),
                      s.get("in_process_ms", {}).get("p90")])
    out.append(md_table(["run", "wall median", "wall p90", "wall max", "in-process median", "in-process p90"], nrows))
    out.append("")

    out.append("### How it was measured")
    out.append("")
    out.append("- One `cni-fan lab` of 2 nodes with one fan pod each (the real node agent and `fan` plugin); beside "
               f"it, in the same node namespaces, the flannel-style datapath: {method.get('flannel_style', '?')}"
               + (f"; and the host-gw-style one: {method['hostgw_style']}" if method.get("hostgw_style") else "")
               + ". "
               + (f"Fan direct: {method['fan_direct']}. " if method.get("fan_direct") else "") +
               f"MTU {method.get('mtu', {}).get('pods_and_tunnels', '?')} for pods and tunnels of both, "
               f"{method.get('mtu', {}).get('underlay', '?')} on the underlay (veths on a bridge).")
    measure = method.get("measure", "")
    out.append(f"- {measure[:1].upper() + measure[1:]}; {method.get('interleaving', '')}. Each tunnelled run is checked "
               "against the receiving node's counters: the bytes arrived on the tunnel device of that datapath "
               "(host-gw-style and fan direct: on the underlay interface, and next to none on the tunnels).")
    out.append(f"- Ratios: {method.get('ratio', '')}. CPU: {method.get('cpu', '')}.")
    out.append(f"- Entries: labs of {', '.join(map(str, method.get('lab_sizes', [])))} nodes (no pods), each "
               "built and torn down in turn; the fan's entries as its agents set them up, then the flannel-style "
               "datapath programmed for all N nodes.")
    out.append(f"- `node up`: {method.get('node_up', '')} (it prints seconds with two decimals).")
    out.append(f"- Full run took {data.get('duration_s', '?')} s. Raw runs are in the result file.")
    return "\n".join(out) + "\n"


def _span(values: list | None) -> str:
    return f"{min(values):.2f} to {max(values):.2f}" if values else "-"


def render_history(runs: list[dict]) -> str:
    def cells(d: dict) -> list:
        rt = d.get("throughput", {}).get("ratios", {})
        return [d.get("machine", {}).get("loadavg_1min_at_start"), rt.get("fan_over_flannel"),
                rt.get("fan_over_underlay"), d.get("node_up", {}).get("fresh", {}).get("wall_ms", {}).get("median")]

    return history_table(runs, "Earlier runs", ["load", "fan / flannel-style", "fan / underlay", "node up fresh, ms"],
                         cells)
