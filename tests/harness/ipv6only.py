"""IPv6-only node namespaces for the plugin and IPAM tests: an IPv6 underlay address and nothing of IPv4.

    node   u0 fd00:198:18::a/112 (no DAD: usable at once), its veth peer u0p
           -> slice fd00:50:0:a::/64 of overlay6 fd00:50::/48, gateway fd00:50:0:a::1
"""
from __future__ import annotations

from netaddr import IPNetwork

from harness.netlab import Netns, make_node

UNDERLAY6 = "fd00:198:18::/112"
NODE6 = "fd00:198:18::a"
OVERLAY6 = "fd00:50::/48"
SLICE6 = IPNetwork("fd00:50:0:a::/64")
GATEWAY6 = "fd00:50:0:a::1"


def make_node6(kind: str = "node6") -> Netns:
    """A node namespace whose only underlay address is IPv6 (the caller deletes it)."""
    node = make_node(kind, underlay=())
    try:
        node.ip("link", "add", "u0", "type", "veth", "peer", "name", "u0p")
        node.ip("addr", "add", f"{NODE6}/112", "dev", "u0", "nodad")
        node.ip("link", "set", "u0", "up")
        node.ip("link", "set", "u0p", "up")
    except BaseException:
        node.delete()
        raise
    return node
