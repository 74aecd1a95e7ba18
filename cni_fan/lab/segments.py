"""A lab's underlay cut into L2 segments joined by a router. Pure: no system calls.

With `segments` N >= 2 (`lab up --segments N`) node i sits on segment
s = ((i - 1) mod N) + 1, round-robin, each segment its own bridge in the
underlay namespace (br<s>), and a router namespace has one leg per
segment plus one towards ext (on br0), forwarding on:

    segment s   198.18.s.0/24              fd00:198:18::s:0/112
    node i      198.18.s.(10+i)/24         fd00:198:18::s:(10+i)/112
    router      198.18.s.254 (leg s<s>)    fd00:198:18::s:fffe
    ext         198.18.200.1/24            fd00:198:18::c8:1/112 (leg x0: .254, ::c8:fffe)

Every node and ext route the whole underlay (198.18.0.0/16 and
fd00:198:18::/64) via their segment's router leg. A node's host bits
(s * 256 + 10 + i, and s * 65536 + 10 + i in IPv6) stay unique because i
is, so every node still owns its own slice; the IPv6 segments are /112s
inside the IPv6-only lab's /104 fan underlay, so an IPv6-only lab can be
segmented the same way. With one segment (the default) the lab is what
it always was: one switch (br0), node i at 198.18.i.(10+i)/16, no router.

Direct routing (issue 12) sends in-segment peers unencapsulated: the
path `lab check` expects between two nodes follows from this module.
"""
from __future__ import annotations

import netaddr

MAX_SEGMENTS = 16                 # bridges br1..br16; well clear of ext's 198.18.200.0/24
SEGMENT_PREFIXLEN = 24
SEGMENT6_PREFIXLEN = 112
EXT_SEGMENT = 200                 # ext's own segment, behind the router (198.18.200.0/24)
ROUTER_HOST = 254                 # the router's last octet on every IPv4 segment
ROUTER_HOST6 = 0xFFFE             # and its last 16 bits on every IPv6 segment
UNDERLAY_BASE = netaddr.IPAddress("198.18.0.0")
UNDERLAY6_BASE = netaddr.IPAddress("fd00:198:18::")
EXT_LEG = "x0"                    # the router's leg towards ext (on br0)
EXT_LEG_PORT = "rx"               # that leg's port on br0


class SegmentError(ValueError):
    """A segment count the lab cannot build."""


def check_segments(segments: object, nodes: int) -> int:
    """`segments` if the lab can be cut that way (1..MAX_SEGMENTS, no more than nodes)."""
    if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= MAX_SEGMENTS:
        raise SegmentError(f"segments: must be a whole number from 1 to {MAX_SEGMENTS}, got {segments!r}")
    if segments > nodes:
        raise SegmentError(f"segments: {segments} segments need at least {segments} nodes (one each), got {nodes}")
    return segments


def segment_of(node_index: int, segments: int) -> int:
    """The segment (1-based) node i sits on: round-robin."""
    return (node_index - 1) % segments + 1


def bridge_of(segment: int) -> str:
    """The underlay bridge of a segment (br0 is ext's, or the whole underlay's with one segment)."""
    return f"br{segment}"


def router_leg(segment: int) -> str:
    """The router's interface on a segment (in the router namespace)."""
    return f"s{segment}"


def router_port(segment: int) -> str:
    """The router's port on a segment's bridge (in the underlay namespace)."""
    return f"r{segment}"


def node_address(node_index: int, segment: int) -> netaddr.IPAddress:
    """Node i on segment s: 198.18.s.(10+i)."""
    return netaddr.IPAddress(int(UNDERLAY_BASE) + (segment << 8) + 10 + node_index)


def node_address6(node_index: int, segment: int) -> netaddr.IPAddress:
    """Node i on segment s: fd00:198:18::s:(10+i)."""
    return netaddr.IPAddress(int(UNDERLAY6_BASE) + (segment << 16) + 10 + node_index, 6)


def router_address(segment: int) -> netaddr.IPAddress:
    return netaddr.IPAddress(int(UNDERLAY_BASE) + (segment << 8) + ROUTER_HOST)


def router_address6(segment: int) -> netaddr.IPAddress:
    return netaddr.IPAddress(int(UNDERLAY6_BASE) + (segment << 16) + ROUTER_HOST6, 6)


def segment_network(segment: int) -> netaddr.IPNetwork:
    return netaddr.IPNetwork(f"{node_address(0, segment)}/{SEGMENT_PREFIXLEN}").cidr


def segment_network6(segment: int) -> netaddr.IPNetwork:
    return netaddr.IPNetwork(f"{node_address6(0, segment)}/{SEGMENT6_PREFIXLEN}").cidr


def expected_path(direct_routing: bool, segment_a: int, segment_b: int) -> str:
    """What crosses the sender's underlay between two nodes: "direct" (no
    encapsulation) iff direct routing is on and both share a segment."""
    return "direct" if direct_routing and segment_a == segment_b else "encapsulated"
