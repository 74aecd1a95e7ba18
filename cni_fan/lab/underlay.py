"""The lab's underlay: one switch, or L2 segments joined by a router.

One segment (the default): bridge br0 in the underlay namespace, every
node and ext a port of it, all on one L2 (198.18.0.0/16). Several
(cni_fan.lab.segments): bridge br<s> per segment, ext alone on br0, and
the router namespace with a leg on every bridge, forwarding on; every node
and ext reach the rest of the underlay through their segment's leg.
"""
from __future__ import annotations

from cni_fan.lab import netns
from cni_fan.lab import segments as seg
from cni_fan.lab.topology import (EXT_IF, EXT_PORT, NODE_UNDERLAY_IF, UNDERLAY6, UNDERLAY_BRIDGE, UNDERLAY_MTU,
                                  LabSpec, Node)


def build_switches(spec: LabSpec) -> None:
    """The underlay namespace's bridges, the router (segmented labs) and ext on br0."""
    netns.create(spec.underlay_netns)
    netns.make_bridge(spec.underlay_netns, UNDERLAY_BRIDGE, UNDERLAY_MTU)
    if spec.segmented:
        _build_router(spec)
    netns.create(spec.ext_netns)
    netns.plug(spec.underlay_netns, UNDERLAY_BRIDGE, EXT_PORT, spec.ext_netns, EXT_IF,
               spec.ext_cidr if spec.has_ipv4 else None, UNDERLAY_MTU, spec.ext_cidr6 if spec.has_ipv6 else None)
    if spec.segmented:
        _route_via(spec, spec.ext_netns, seg.EXT_SEGMENT)


def plug_node(spec: LabSpec, node: Node) -> None:
    """Node's underlay interface on its segment's bridge (br0 when unsegmented), its route across the router."""
    bridge = seg.bridge_of(node.segment) if spec.segmented else UNDERLAY_BRIDGE
    netns.plug(spec.underlay_netns, bridge, node.port, node.netns, NODE_UNDERLAY_IF,
               node.cidr if spec.has_ipv4 else None, UNDERLAY_MTU, node.cidr6)
    if spec.segmented:
        _route_via(spec, node.netns, node.segment)


def _build_router(spec: LabSpec) -> None:
    """A bridge per segment and the router with a leg on each (and on br0, towards ext)."""
    netns.create(spec.router_netns)
    netns.enable_forwarding(spec.router_netns)
    legs = [(seg.bridge_of(s), seg.router_port(s), seg.router_leg(s), s) for s in range(1, spec.segments + 1)]
    legs.append((UNDERLAY_BRIDGE, seg.EXT_LEG_PORT, seg.EXT_LEG, seg.EXT_SEGMENT))
    for bridge, port, leg, segment in legs:
        if bridge != UNDERLAY_BRIDGE:
            netns.make_bridge(spec.underlay_netns, bridge, UNDERLAY_MTU)
        cidr = f"{seg.router_address(segment)}/{seg.SEGMENT_PREFIXLEN}" if spec.has_ipv4 else None
        cidr6 = f"{seg.router_address6(segment)}/{seg.SEGMENT6_PREFIXLEN}" if spec.has_ipv6 else None
        netns.plug(spec.underlay_netns, bridge, port, spec.router_netns, leg, cidr, UNDERLAY_MTU, cidr6)


def _route_via(spec: LabSpec, ns: str, segment: int) -> None:
    """The whole underlay (each family the lab has) via the router's leg on `segment`."""
    if spec.has_ipv4:
        netns.add_route(ns, spec.underlay, str(seg.router_address(segment)))
    if spec.has_ipv6:
        netns.add_route(ns, UNDERLAY6, str(seg.router_address6(segment)))
