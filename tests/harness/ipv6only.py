"""IPv6-only node namespaces for the plugin and IPAM tests: an IPv6 underlay address and nothing of IPv4.

    node   u0 fd00:198:18::a/112 (no DAD: usable at once), its veth peer u0p
           -> slice fd00:50:0:a::/64 of overlay6 fd00:50::/48, gateway fd00:50:0:a::1
"""
from __future__ import annotations

from pathlib import Path

from netaddr import IPNetwork

from cni_fan.ipam.pool import AddressPool
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


def global_ipv6(ns: Netns, ifname: str) -> dict[str, list[str]]:
    """Global IPv6 addresses of `ifname` with their flags (e.g. "tentative", "nodad")."""
    out = {}
    for link in ns.ip_json("-6", "addr", "show", "dev", ifname):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                out[f"{a['local']}/{a['prefixlen']}"] = [k for k, v in a.items() if v is True]
    return out


def held6(data: Path, net: str) -> dict[str, str]:
    """The IPv6-keyed IPAM records of network `net` under `data`: address -> container ID."""
    pool = AddressPool.existing(str(data / "networks" / net), version=6)
    return {} if pool is None else {str(r.addr): r.container_id for r in pool.allocations()}
