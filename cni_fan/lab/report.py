"""What `cni-fan lab` prints: the lab it built (`up`) and what `check` found.

Pure: turns lab.json and the check's report (plain dicts) into text.
"""
from __future__ import annotations

from cni_fan.lab.topology import EXT_ADDRESS, EXT_ADDRESS6, PHANTOM_HOST, PHANTOM_HOST6, LabSpec


def describe(state: dict) -> str:
    """What `lab up` built: every namespace with its underlay address, slice or address and gateway."""
    spec = LabSpec.from_dict(state["spec"])
    overlays = (f"overlay6 {spec.overlay6} (IPv6-only)" if spec.ipv6_only else f"overlay {spec.overlay}"
                + (f" and {spec.overlay6} (dual-stack)" if spec.dual_stack else ""))
    lines = [f"lab {spec.prefix}: {spec.nodes} nodes x {spec.pods_per_node} pods, {overlays}"
             + f" over {spec.fan_underlay}, encap {spec.encap}, fanmap {spec.fanmap}"
             + (", direct routing" if spec.direct_routing else "")
             + (f"; {spec.segments} underlay segments joined by {spec.router_netns} (node i on segment "
                f"(i-1) mod {spec.segments} + 1, 198.18.<segment>.0/24), ext behind it" if spec.segmented else ""),
             f"  {'namespace':<22} {'underlay':<16} {'slice / address':<20} gateway"]
    for node in spec.all_nodes:
        lines.append(f"  {node.netns:<22} {str(node.address):<16} {str(node.slice):<20} {node.gateway}")
        if spec.dual_stack:
            lines.append(f"  {'':<22} {str(node.address6):<16} {str(node.slice6):<20} {node.gateway6}")
        for pod in node.pods:
            entry = state.get("pods", {}).get(pod.netns, {})
            lines.append(f"    {pod.netns:<20} {'':<16} {entry.get('address', '?'):<20} {entry.get('gateway') or ''}")
            if spec.dual_stack:
                lines.append(f"    {'':<20} {'':<16} {entry.get('address6') or 'no IPv6 address':<20} "
                             f"{entry.get('gateway6') or ''}")
    lines.append(f"  {spec.ext_netns:<22} {EXT_ADDRESS6 if spec.ipv6_only else EXT_ADDRESS:<16} (outside the cluster)")
    if spec.dual_stack:
        lines.append(f"  {'':<22} {EXT_ADDRESS6}")
    lines.append(f"  files: {spec.root}  (agent logs: {spec.root}/n<i>/agent.log)")
    return "\n".join(lines)


def format_report(report: dict, *, ascii_only: bool = False) -> str:
    """The check's report as text: agents, the ping matrix, the masquerade, per-peer state, the verdict."""
    good, bad, same = ("ok", "FAIL", "-") if ascii_only else ("✓", "✗", "·")
    mark = {"ok": good, "FAIL": bad, "self": same, "no address": "?"}
    ep = report["endpoints"] or report.get("endpoints6", {})  # an IPv6-only lab has IPv6 endpoints only
    lines = [f"lab {report['prefix']}: {report['spec']['nodes']} nodes x {report['spec']['pods_per_node']} pods, "
             f"encap {report['spec']['encap']}, fanmap {report['spec']['fanmap']}"
             + (", direct routing" if report["spec"].get("direct_routing") else "")
             + (f", {report['spec']['segments']} underlay segments" if report["spec"].get("segments", 1) > 1 else "")]
    lines.append("")
    lines.append("agents:")
    for name, agent in report["agents"].items():
        show = agent["show"]
        detail = (f"bridge {show.get('bridge')}, tunnel {show.get('tunnel')}, slice {show.get('slice')}"
                  if "error" not in show else f"node show: {show['error'][:120]}")
        lines.append(f"  {good if agent['healthz'] else bad} {name} {ep[name].get('underlay', '?'):<15} healthz "
                     f"{agent['status'] or '-'}; {detail}")
    if report["matrix"]:
        lines += _matrix("ping", report["matrix"], ep, mark)
        lines += _nat("masquerade", report["nat"], good, bad)
    if "matrix6" in report:
        lines += _matrix("IPv6 ping", report["matrix6"], report["endpoints6"], mark)
        lines += _nat("IPv6 masquerade (NAT66)", report["nat6"], good, bad)
    lines.append("")
    lines.append("per-peer state (routes, nexthops, neighbours off the underlay interface, FDB, tunnels "
                 "naming a remote node):")
    for name, s in report["peer_state"].items():
        counted = sum(len(v) for v in s["counted"].values())
        read = s.get("entries_read", {})
        lines.append(f"  {good if s['ok'] else bad} {name}: {counted} per-peer entries"
                     + (f" ({', '.join(f'{k} {len(v)}' for k, v in s['counted'].items())})" if counted else "")
                     + f"; read: routes {read.get('routes', 0)}, IPv6 routes {read.get('routes6', 0)}, "
                       f"neighbours {read.get('neighbours', 0)}, fdb {read.get('fdb', 0)}")
        for kind, entries in s["counted"].items():
            for e in entries[:10]:
                lines.append(f"      {kind}: {e}")
        for kind, count in s["static"].items():
            lines.append(f"      {kind}: {count} entries name remote nodes, but the same kind exists for a host "
                         f"that is no node ({PHANTOM_HOST6 if report['spec'].get('ipv6_only') else PHANTOM_HOST}): "
                         "a table for every possible host, not counted")
        if s["underlay_neighbours"]:
            lines.append(f"      underlay ARP/ND (not counted): {'; '.join(s['underlay_neighbours'][:6])}")
    for key, title in (("paths", "paths"), ("paths6", "IPv6 paths")):
        if key in report:
            lines += _paths(title, report[key], good, bad)
    lines.append("")
    checks = report["checks"]
    lines.append(("PASS" if report["ok"] else "FAIL") + f" in {report['seconds']} s: "
                 + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in checks.items()))
    return "\n".join(lines)


def _matrix(title: str, matrix: dict, ep: dict, mark: dict) -> list[str]:
    cols = list(next(iter(matrix.values()), {}).keys())
    width = max([4, *(len(c) for c in cols)]) + 1
    lines = ["", f"{title} (rows ping columns; a node column is its gateway, ext is outside the cluster):",
             "  " + ", ".join(f"{n} {e['address'] or '(none)'}" for n, e in ep.items()),
             "  " + " " * 7 + "".join(f"{c:>{width}}" for c in cols)]
    for row, cells in matrix.items():
        lines.append(f"  {row:<7}" + "".join(f"{mark.get(cells[c], '?'):>{width}}" for c in cols))
    return lines


def _nat(title: str, nat: dict, good: str, bad: str) -> list[str]:
    lines = ["", f"{title} (pod -> ext: the source ext sees, expected the node's underlay address):"]
    for pod, n in nat.items():
        lines.append(f"  {good if n['ok'] else bad} {pod:<7} udp seen {n['udp_seen'] or '-':<15} "
                     f"echo {'back' if n['udp_echo'] else 'lost'}; tcp seen {n['tcp_seen'] or '-':<15} "
                     f"expected {n['expected']}")
    return lines


def _paths(title: str, paths: dict, good: str, bad: str) -> list[str]:
    """How many pod pairs took the path expected, by path; each pair that did not, listed."""
    wrong = {pair: v for pair, v in paths.items() if not v["ok"]}
    counts: dict[str, int] = {}
    for v in paths.values():
        if v["ok"]:
            counts[v["expected"]] = counts.get(v["expected"], 0) + 1
    summary = ", ".join(f"{n} {path}" for path, n in sorted(counts.items())) or "none"
    lines = ["", f"{title} (pod pairs across nodes, seen on the sender's underlay; direct iff direct routing "
                 f"and one segment):",
             f"  {good if not wrong else bad} as expected: {summary}" + (f"; {len(wrong)} not" if wrong else "")]
    for pair, v in list(wrong.items())[:20]:
        lines.append(f"  {bad} {pair}: expected {v['expected']}, seen {', '.join(v['seen']) or 'nothing'}")
    return lines
