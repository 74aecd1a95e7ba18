"""`node show`: what an operator needs to see when something is off."""
from __future__ import annotations

from typing import Any

from cni_fan.bpf.fanprog import Hook
from cni_fan.ipam.pool import AddressPool
from cni_fan.local_slice import pool_version
from cni_fan.net import links, tc
from cni_fan.net.rtnl import Rtnl
from cni_fan.node.conf import NodeConfig
from cni_fan.node.datapath import NodeDatapath
from cni_fan.node.fanmap_bpf import attached_counters


def describe(datapath: NodeDatapath, conf: NodeConfig) -> dict[str, Any]:
    p = datapath.plan
    ipr = datapath.ipr
    problems = datapath.problems()
    tunnel_index = links.link_index(ipr, p.tunnel)
    program = None
    if tunnel_index:
        with Rtnl() as sock:
            program = tc.find(sock, tunnel_index, Hook.EGRESS)
    pool = AddressPool.existing(conf.fan.params.state_dir, version=pool_version(conf.fan.params))
    pods = [] if pool is None else [{"address": str(r.addr), "containerID": r.container_id, "ifname": r.ifname}
                                    for r in pool.allocations()]
    bridge_index = links.link_index(ipr, p.bridge)
    ports = links.bridge_ports(ipr, bridge_index) if bridge_index else []
    return {
        "up": not [x for x in problems if not x.startswith("sysctl ")],
        "problems": problems,
        "conflist": conf.path,
        # The primary family's slice (IPv4's, IPv6's on an IPv6-only node); "ipv6" below on dual-stack ones.
        "overlay": str(p.primary.overlay.cidr), "underlay": str(p.primary.underlay.cidr),
        "host": str(p.host), "underlay_interface": p.underlay_ifname,
        "slice": str(p.primary.slice), "gateway": str(p.primary.gateway), "capacity": p.primary.fanmap.capacity,
        "family": f"ipv{p.primary.version}",
        "ipv6": None if p.ipv6 is None or p.ipv4 is None else {"overlay": str(p.ipv6.overlay.cidr), "slice": str(p.ipv6.slice),
                                             "gateway": str(p.ipv6.gateway), "tunnel_address": str(p.ipv6.tunnel_address)},
        "bridge": p.bridge, "bridge_ports": len(ports), "mtu": p.mtu,
        "tunnel": p.tunnel, "encap": p.encap, "vni": p.vni, "vxlan_port": p.vxlan_port,
        "fanmap": p.fanmap_mode,
        "direct_routing": p.direct, "segment": None if p.segment is None else str(p.segment),
        "direct_sources": [str(p.segment_overlay(sl)) for sl in p.slices] if p.direct else [],
        # The program's verdicts (passed, encapsulated, dropped, punted, direct, fallback).
        "program_packets": {} if program is None or program.prog_id is None or p.encap != "vxlan"
        else attached_counters(program.prog_id),
        "dropped_direct_source_packets": datapath.firewall.dropped_direct(),
        "program": None if program is None else {"id": program.prog_id, "tag": program.tag, "name": program.name,
                                                 "direct_action": program.direct_action},
        "firewall": datapath.firewall.name,
        "dropped_foreign_tunnel_packets": datapath.firewall.dropped_foreign(),
        "pods": pods,
    }


def _direct_line(info: dict[str, Any]) -> str:
    if not info["direct_routing"]:
        return f"  direct    off (segment {info['segment'] or 'unknown'}: encapsulated, next hop per packet)"
    return (f"  direct    on in segment {info['segment']} (overlay sources accepted unencapsulated: "
            f"{', '.join(info['direct_sources'])}; dropped: {info['dropped_direct_source_packets']})")


def render(info: dict[str, Any]) -> str:
    lines = [
        f"node {info['host']} ({info['underlay_interface']}): {'UP' if info['up'] else 'NOT UP'}",
        f"  slice     {info['slice']} (gateway {info['gateway']}, {len(info['pods'])} of {info['capacity']} in use)",
        f"  overlay   {info['overlay']} over underlay {info['underlay']}",
        *([] if info.get("ipv6") is None else [
            f"  slice6    {info['ipv6']['slice']} (gateway {info['ipv6']['gateway']}, same container indexes)",
            f"  overlay6  {info['ipv6']['overlay']}"]),
        f"  bridge    {info['bridge']} ({info['bridge_ports']} ports, mtu {info['mtu']})",
        f"  tunnel    {info['tunnel']} ({info['encap']}, vni {info['vni']}, port {info['vxlan_port']})",
        f"  fanmap    {info['fanmap']}: " + (f"program id {info['program']['id']} tag {info['program']['tag']}"
                                             if info["program"] else "no program attached"),
        f"  firewall  {info['firewall']}; foreign tunnel packets dropped: {info['dropped_foreign_tunnel_packets']}",
        _direct_line(info),
    ]
    if info["program_packets"]:
        lines.append("  packets   " + ", ".join(f"{k} {v}" for k, v in info["program_packets"].items()))
    for problem in info["problems"]:
        lines.append(f"  PROBLEM   {problem}")
    for pod in info["pods"]:
        lines.append(f"  pod       {pod['address']:<16} {pod['containerID'][:24]} {pod['ifname']}")
    return "\n".join(lines)
