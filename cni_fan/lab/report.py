"""What `cni-fan lab` prints: the lab it built (`up`) and what `check` found.

Pure: turns lab.json and the check's report (plain dicts) into text.
"""
from __future__ import annotations

from cni_fan.lab.topology import EXT_ADDRESS, PHANTOM_HOST, LabSpec


def describe(state: dict) -> str:
    """What `lab up` built: every namespace with its underlay address, slice or address and gateway."""
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


def format_report(report: dict, *, ascii_only: bool = False) -> str:
    """The check's report as text: agents, the ping matrix, the masquerade, per-peer state, the verdict."""
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
