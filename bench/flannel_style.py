"""The flannel-style VXLAN datapath the throughput benchmark measures the fan against.

What flanneld's VXLAN backend and the flannel CNI's bridge program on a
node, built with `ip` and `bridge` in the lab's node namespaces (facts
from flannel's documented behaviour, written here); and the count of a
datapath's kernel entries on a node, for the per-node state comparison.
"""
from __future__ import annotations

from bench.common import BenchError
from bench.shell import batch, json_of, run_tool

FLANNEL_DEV = "flannel.1"
FLANNEL_BRIDGE = "cni0"
FLANNEL_VNI = 1
FLANNEL_PORT = 8472                       # flannel's default (the kernel's too)
FLANNEL_NET = "243.0.0.0/8"               # node i: 243.<i>.0.0/24; clear of the fan's 241.0.0.0/8
FLANNEL_POD_HOST_IF = "vethf1"


def flannel_mac(i: int) -> str:
    return "02:f1:00:00:%02x:%02x" % ((i >> 8) & 0xFF, i & 0xFF)


def flannel_subnet(i: int) -> str:
    return f"243.{i}.0.0/24"


def flannel_vtep(i: int) -> str:
    return f"243.{i}.0.0"


def flannel_gateway(i: int) -> str:
    return f"243.{i}.0.1"


def flannel_pod_address(i: int) -> str:
    return f"243.{i}.0.2"


def flannel_pod_netns(spec, i: int) -> str:
    # Not a name the lab owns (its `down` would not look for it); the run's prefix still covers it.
    return f"{spec.prefix}n{i}fp1"


def build_flannel(spec, with_pods: bool, mtu: int) -> dict[int, str]:
    """What flanneld (VXLAN backend) and the flannel CNI's bridge programs, on every node of `spec`.
    Returns {node index: flannel pod namespace} when `with_pods`."""
    nodes = spec.all_nodes
    pods: dict[int, str] = {}
    for node in nodes:
        i = node.index
        lines = [f"link add {FLANNEL_DEV} type vxlan id {FLANNEL_VNI} dstport {FLANNEL_PORT} local {node.address} "
                 f"dev eth0 nolearning",
                 f"link set {FLANNEL_DEV} address {flannel_mac(i)} mtu {mtu}",
                 f"addr add {flannel_vtep(i)}/32 dev {FLANNEL_DEV}",
                 f"link set {FLANNEL_DEV} up",
                 f"link add {FLANNEL_BRIDGE} type bridge",
                 f"link set {FLANNEL_BRIDGE} mtu {mtu}",
                 f"addr add {flannel_gateway(i)}/24 dev {FLANNEL_BRIDGE}",
                 f"link set {FLANNEL_BRIDGE} up"]
        fdb = []
        for peer in nodes:
            if peer.index == i:
                continue
            j = peer.index
            lines.append(f"route add {flannel_subnet(j)} via {flannel_vtep(j)} dev {FLANNEL_DEV} onlink")
            lines.append(f"neigh add {flannel_vtep(j)} lladdr {flannel_mac(j)} dev {FLANNEL_DEV} nud permanent")
            fdb.append(f"fdb add {flannel_mac(j)} dev {FLANNEL_DEV} dst {peer.address} self permanent")
        batch("ip", node.netns, lines)
        batch("bridge", node.netns, fdb)
        if with_pods:
            pod = flannel_pod_netns(spec, i)
            run_tool(["ip", "netns", "add", pod])
            pods[i] = pod
            attach_bridge_pod(node.netns, pod, FLANNEL_POD_HOST_IF, FLANNEL_BRIDGE,
                              flannel_pod_address(i), flannel_gateway(i), mtu)
    return pods


def attach_bridge_pod(node_ns: str, pod_ns: str, host_if: str, bridge: str, address: str, gateway: str,
                      mtu: int) -> None:
    """What the flannel CNI's bridge plugin does for one pod (for both flannel backends): a veth
    from `bridge` to the pod's eth0 with `address`/24 and a default route via `gateway`."""
    batch("ip", node_ns, [
        f"link add {host_if} mtu {mtu} type veth peer name eth0 netns {pod_ns} mtu {mtu}",
        f"link set {host_if} master {bridge}",
        f"link set {host_if} up"])
    batch("ip", pod_ns, ["link set lo up",
                         f"addr add {address}/24 dev eth0",
                         "link set eth0 up",
                         f"route add default via {gateway}"])


# -- counting entries ----------------------------------------------------------

def count_entries(ns: str, tunnel: str, bridge: str) -> dict:
    """A datapath's kernel entries in node namespace `ns`: on its tunnel device and its pod bridge."""
    devices = {tunnel, bridge}
    routes = [r for r in json_of("ip", ns, "-4", "route", "show", "table", "main") if r.get("dev") in devices]
    neigh = [n for n in json_of("ip", ns, "-4", "neigh", "show", "nud", "all")
             if n.get("dev") in devices and "NOARP" not in (n.get("state") or [])]
    fdb = [f for f in json_of("bridge", ns, "fdb", "show", "dev", tunnel) if f.get("dst")]
    filters = 0
    for dev in sorted(devices):
        for direction in ("ingress", "egress"):
            try:
                found = json_of("tc", ns, "filter", "show", "dev", dev, direction)
            except BenchError:
                found = []  # no clsact qdisc: no filters
            filters += sum(1 for f in found if f.get("options") is not None)
    out = {"routes": len(routes), "neighbours": len(neigh), "fdb": len(fdb), "tc_filters": filters}
    out["total"] = sum(out.values())
    return out
