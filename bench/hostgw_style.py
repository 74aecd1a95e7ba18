"""The flannel host-gw-style datapath: the anchor the fan's direct routing is measured against.

What flanneld's host-gw backend and the flannel CNI's bridge program on a
node (facts from flannel's documented behaviour, written here): a bridge
with the node's subnet gateway, pods on veths, and per peer one route
`<peer's subnet> via <peer's underlay address> dev eth0`: no
encapsulation, every node on one L2 segment, one route per peer. Built
with `ip` in the lab's node namespaces beside the fan, under names of its
own so it never meets the flannel-style VXLAN datapath either.
"""
from __future__ import annotations

from bench.flannel_style import attach_bridge_pod
from bench.shell import batch, json_of, run_tool

HOSTGW_BRIDGE = "cnih"
HOSTGW_NET = "244.0.0.0/8"                # node i: 244.<i>.0.0/24; clear of the fan's 241/8 and flannel's 243/8
HOSTGW_POD_HOST_IF = "vethh1"
UNDERLAY_IF = "eth0"


def hostgw_subnet(i: int) -> str:
    return f"244.{i}.0.0/24"


def hostgw_gateway(i: int) -> str:
    return f"244.{i}.0.1"


def hostgw_pod_address(i: int) -> str:
    return f"244.{i}.0.2"


def hostgw_pod_netns(spec, i: int) -> str:
    # Not a name the lab owns (its `down` would not look for it); the run's prefix still covers it.
    return f"{spec.prefix}n{i}hp1"


def build_hostgw(spec, with_pods: bool, mtu: int) -> dict[int, str]:
    """What flanneld (host-gw backend) and the flannel CNI's bridge program, on every node of `spec`.
    Returns {node index: host-gw pod namespace} when `with_pods`."""
    nodes = spec.all_nodes
    pods: dict[int, str] = {}
    for node in nodes:
        i = node.index
        lines = [f"link add {HOSTGW_BRIDGE} type bridge",
                 f"link set {HOSTGW_BRIDGE} mtu {mtu}",
                 f"addr add {hostgw_gateway(i)}/24 dev {HOSTGW_BRIDGE}",
                 f"link set {HOSTGW_BRIDGE} up"]
        lines += [f"route add {hostgw_subnet(peer.index)} via {peer.address} dev {UNDERLAY_IF}"
                  for peer in nodes if peer.index != i]
        batch("ip", node.netns, lines)
        if with_pods:
            pod = hostgw_pod_netns(spec, i)
            run_tool(["ip", "netns", "add", pod])
            pods[i] = pod
            attach_bridge_pod(node.netns, pod, HOSTGW_POD_HOST_IF, HOSTGW_BRIDGE,
                              hostgw_pod_address(i), hostgw_gateway(i), mtu)
    return pods


def count_hostgw_entries(ns: str) -> dict:
    """The host-gw-style datapath's entries in node namespace `ns`: its routes (the bridge's and one
    per peer via the underlay), its bridge's neighbours (not NOARP); no FDB, no tc filters."""
    import netaddr

    net = netaddr.IPNetwork(HOSTGW_NET)
    routes = [r for r in json_of("ip", ns, "-4", "route", "show", "table", "main")
              if r.get("dst") not in (None, "default") and netaddr.IPNetwork(r["dst"]) in net]
    neigh = [n for n in json_of("ip", ns, "-4", "neigh", "show", "nud", "all")
             if n.get("dev") == HOSTGW_BRIDGE and "NOARP" not in (n.get("state") or [])]
    out = {"routes": len(routes), "neighbours": len(neigh), "fdb": 0, "tc_filters": 0}
    out["total"] = sum(out.values())
    return out
