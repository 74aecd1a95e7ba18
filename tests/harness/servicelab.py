"""A Kubernetes-shaped cluster on the node lab: Services, servers that say who they are, clients.

Built on tests/nodelab.py: two dual-stack nodes (reverse-path filtering
strict, as RHEL sets it; `overlay6` beside `overlay`, an IPv6 address beside
the IPv4 underlay one), two pods on each, the outside router and host in
both families, and kube-proxy's rules (cni_fan/lab/kubeproxy.py) rendered
for each node and family and loaded into it, in one of kube-proxy's modes.
`Cluster.view(6)` is the IPv6 side; it skips, naming why, when the pods
got no IPv6 address.

Every server (`WhoServer`) answers TCP and UDP on one port with its name and
the client address it saw, so one answer tells which backend was reached
and whether the client was masqueraded. `ask` and `ask_many` are the
clients, run in a thread inside a namespace (a socket per query).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

import netaddr

from harness import nodelab
from harness.traffic import WhoServer, ask, ask_many  # noqa: F401 (the tests use them as sl.*)
from cni_fan.lab import kubeproxy as kp

POD_PORT = 8080          # every pod's server
SERVICE_PORT = 80
API_PORT = 6443          # the host-network backend (node 2's "API server")
LOCAL_NODE_PORT = 31001
LOCAL_ONE_NODE_PORT = 31002  # Local policy, its one endpoint on node 1: node 2 has none
PROTOCOLS = ("tcp", "udp")
FAMILIES = (4, 6)
# The dual-stack lab: IPv6 overlay (the Fan's `overlay6`), the nodes' IPv6
# addresses beside their IPv4 underlay ones (kubelet --node-ip, both
# families), the router's IPv6 side and the outside host's IPv6 address.
OVERLAY6 = "fd00:50::/48"
NODE6_NET = "fd00:18::/64"
ROUTER6_UNDERLAY = "fd00:18::fe"
OUTSIDE6_ROUTER = "fd00:19::1"
OUTSIDE6_HOST = "fd00:19::2"
# Where the two nodes sit: one L2 underlay (/16, "flat"), or with direct routing (issue 12)
# on two /24 segments the router joins (their traffic encapsulated, routed) or on one
# (their traffic unencapsulated, straight across the segment).
FLAT, DIRECT_2SEG, DIRECT_1SEG = "flat", "direct-2seg", "direct-1seg"
SEGMENT_CIDRS = {DIRECT_2SEG: ("198.18.1.11/24", "198.18.2.12/24"), DIRECT_1SEG: ("198.18.1.11/24", "198.18.1.12/24")}


@dataclass(frozen=True)
class ServiceIPs:
    """One family's service range and the ClusterIPs the tests use in it."""
    cidr: str
    api: str            # `kubernetes`, in front of node 2's address
    dns: str            # over all four pods
    local: str          # the Local-policy NodePort
    empty: str          # no endpoints
    first_pod: str      # the one-backend services: this, then the next addresses
    local_one: str      # the Local-policy NodePort with an endpoint on node 1 only

    def for_pod(self, index: int) -> str:
        return str(ipaddress.ip_address(self.first_pod) + index)


SERVICE_IPS = {
    4: ServiceIPs("10.96.0.0/16", "10.96.0.1", "10.96.0.10", "10.96.2.1", "10.96.3.1", "10.96.1.1", "10.96.2.2"),
    6: ServiceIPs("fd00:96::/112", "fd00:96::1", "fd00:96::a", "fd00:96::201", "fd00:96::301", "fd00:96::101",
                  "fd00:96::202"),
}
# Kept for the tests and modules that name the IPv4 ones.
SERVICE_CIDR, API_CLUSTER_IP, DNS_CLUSTER_IP = SERVICE_IPS[4].cidr, SERVICE_IPS[4].api, SERVICE_IPS[4].dns
LOCAL_CLUSTER_IP, EMPTY_CLUSTER_IP = SERVICE_IPS[4].local, SERVICE_IPS[4].empty


@dataclass
class Member:
    """A pod or a node as a client and a server, in one family: its namespace,
    name and address, its node's bridge address and its node's address."""
    name: str
    ns: nodelab.Netns
    address: str
    node: nodelab.Node
    gateway: str            # its node's bridge address (what the node masquerades to inside the overlay)
    node_address: str = ""  # its node's address of the family (what ipMasq masquerades to outside the overlay)

    def __post_init__(self) -> None:
        self.node_address = self.node_address or self.node.address


@dataclass
class Cluster:
    """The cluster as one family sees it (`view(6)` gives the IPv6 side of
    the same namespaces, servers and rules)."""
    mode: str
    fanmap: str
    lab: nodelab.FanLab
    nodes: list[nodelab.Node]
    pods: list[Member]                               # p1a, p1b on node 1; p2a, p2b on node 2
    node_members: list[Member]
    services: list[kp.Service]
    servers: list[WhoServer] = field(default_factory=list)
    family: int = 4
    outside_address: str = nodelab.OUTSIDE_HOST
    families: dict[int, "Cluster"] = field(default_factory=dict)  # family -> view; what the pods have
    no_ipv6: str = ""                                # why there is no IPv6 view (a skip)
    broken: dict[int, str] = field(default_factory=dict)  # family -> what its preflight found (a failure)
    layout: str = FLAT                               # FLAT, DIRECT_2SEG or DIRECT_1SEG

    @property
    def ips(self) -> ServiceIPs:
        return SERVICE_IPS[self.family]

    @property
    def dns_ip(self) -> str:
        return self.ips.dns

    @property
    def api_ip(self) -> str:
        return self.ips.api

    @property
    def local_ip(self) -> str:
        return self.ips.local

    @property
    def empty_ip(self) -> str:
        return self.ips.empty

    def label(self) -> str:
        return f"{self.mode}/{self.fanmap}{'' if self.layout == FLAT else '/' + self.layout}/IPv{self.family}"

    def service_ip(self, backend: Member) -> str:
        """The ClusterIP of the one-backend service in front of `backend`."""
        return self.ips.for_pod(self.pods.index(backend))

    def node_port(self, backend: Member) -> int:
        return 30001 + self.pods.index(backend)

    def view(self, family: int) -> "Cluster":
        """The same cluster seen through `family`; pytest.skip when a piece
        it needs is missing (pods without an IPv6 address, nodes without an
        IPv6 overlay route), pytest.fail at once when the family's preflight
        pings failed (rather than every query timing out)."""
        import pytest

        if family not in self.families:
            pytest.skip(self.no_ipv6 or f"no IPv{family} view")
        if family in self.broken:
            pytest.fail(self.broken[family], pytrace=False)
        return self.families[family]

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.lab.close()


def _missing_ipv6_route(nodes: list[nodelab.Node]) -> str:
    """Why the nodes cannot carry IPv6 pods yet (no route for overlay6: a node
    agent without dual-stack), or ""."""
    for node in nodes:
        routes = node.ns.ip_json("-6", "route", "show", "table", "all")
        if not any(r.get("dst") == OVERLAY6 for r in routes):
            return (f"nodes have no IPv6 overlay route: node agent without dual-stack (`node up` on node "
                    f"{node.address} installed no route for {OVERLAY6})")
    return ""


def _preflight(view: "Cluster") -> str:
    """Every pod pings its gateway and every other pod, every node every pod
    (one ICMP round, a few seconds): what failed, or ""."""
    from cni_fan.lab.probes import ping_all

    pairs = [(m.ns.path, p.address) for m in view.pods for p in view.pods if p is not m]
    pairs += [(m.ns.path, m.gateway) for m in view.pods]
    pairs += [(n.ns.path, p.address) for n in view.node_members for p in view.pods]
    rtts = ping_all(pairs, timeout=5.0)
    lost = [f"{ns.rsplit('/', 1)[-1]} -> {dst}" for (ns, dst), rtt in rtts.items() if rtt is None]
    if not lost:
        return ""
    return (f"IPv{view.family} preflight: {len(lost)} of {len(pairs)} pings unanswered "
            f"({'; '.join(lost[:6])}{' ...' if len(lost) > 6 else ''}): the IPv{view.family} pod datapath is broken")


def _ipv6_of(result: dict) -> dict | None:
    """The IPv6 entry of an ADD result's `ips`, if any."""
    return next((ip for ip in result.get("ips") or [] if ":" in ip.get("address", "")), None)


def _ipv6_members(pods: list, nodes: list[nodelab.Node], node6: list[str]) -> tuple[list[Member], list[Member]] | str:
    """(pods, node members) in IPv6, or why not (the pods' results have no IPv6 address)."""
    from cni_fan.fanmap import FanMap
    from cni_fan.plan import slice_plan

    missing = [f"{pod.ns.name}: ips {[ip.get('address') for ip in pod.result.get('ips') or []]}"
               for pod in pods if _ipv6_of(pod.result) is None]
    if missing:
        return ("pods have no IPv6 address: plugin without dual-stack (ADD with overlay6 returned "
                + "; ".join(missing[:2]) + ")")
    fan6 = FanMap.parse(OVERLAY6, nodes[0].lab.underlay)
    gateways = {node.index: str(slice_plan(fan6, netaddr.IPAddress(node.address)).gateway) for node in nodes}
    members = []
    for pod, letter in zip(pods, "abab"):
        entry = _ipv6_of(pod.result)
        members.append(Member(f"p{pod.node.index}{letter}", pod.ns, entry["address"].split("/")[0], pod.node,
                              entry.get("gateway") or gateways[pod.node.index], node6[pod.node.index - 1]))
    node_members = [Member(f"node{node.index}", node.ns, node6[node.index - 1], node, gateways[node.index],
                           node6[node.index - 1]) for node in nodes]
    return members, node_members


def _add_ipv6_underlay(lab: nodelab.FanLab, nodes: list[nodelab.Node]) -> list[str]:
    """IPv6 beside the IPv4 underlay: each node's address (no DAD, so it is
    usable at once) and default route via the router, the router's two
    sides with forwarding, the outside host. Returns the nodes' addresses."""
    prefix = ipaddress.ip_network(NODE6_NET)
    router, host = lab.outside.router, lab.outside.host
    router.ip("-6", "addr", "add", f"{ROUTER6_UNDERLAY}/{prefix.prefixlen}", "dev", "eth0", "nodad")
    router.ip("-6", "addr", "add", f"{OUTSIDE6_ROUTER}/64", "dev", "eth1", "nodad")
    router.set_sysctl("net.ipv6.conf.all.forwarding", "1")
    host.ip("-6", "addr", "add", f"{OUTSIDE6_HOST}/64", "dev", "eth0", "nodad")
    host.ip("-6", "route", "add", "default", "via", OUTSIDE6_ROUTER)
    addresses = []
    for node in nodes:
        address = str(prefix.network_address + int(ipaddress.ip_address(node.address)) % 256)
        node.ns.ip("-6", "addr", "add", f"{address}/{prefix.prefixlen}", "dev", "eth0", "nodad")
        node.ns.ip("-6", "route", "replace", "default", "via", ROUTER6_UNDERLAY)
        addresses.append(address)
    return addresses


def _on_segments(lab: nodelab.FanLab, cidrs: tuple[str, ...]) -> list[nodelab.Node]:
    """Nodes with directRouting on, each on the /24 segment of its address, the
    router's leg in that segment (.254) its default route."""
    router = lab.add_outside().router  # first: a node's default route is its own segment's leg
    nodes = []
    for cidr in cidrs:
        node = lab.add_node(None, overlay6=OVERLAY6, directRouting=True)
        leg = str(netaddr.IPNetwork(cidr)[-2])
        router.ip("addr", "replace", f"{leg}/{netaddr.IPNetwork(cidr).prefixlen}", "dev", "eth0")
        node.ns.ip("addr", "add", cidr, "dev", "eth0")
        node.cidr = cidr
        node.ns.ip("route", "replace", "default", "via", leg)
        nodes.append(node)
    return nodes


def build(mode: str, fanmap: str, tmp, layout: str = FLAT) -> Cluster:
    """Two dual-stack nodes (`overlay6` beside `overlay`) with two pods each,
    the outside world in both families, servers everywhere and kube-proxy's
    rules in `mode` for each family the pods have. `fanmap` "routes" uses a
    /24 underlay (the routes fallback installs an entry per possible peer);
    a direct `layout` puts the nodes on /24 segments with directRouting on."""
    nodelab.require_root_and_tools()
    if fanmap == "routes":
        underlay, cidrs = "198.18.255.0/24", ("198.18.255.11/24", "198.18.255.12/24")
    else:
        underlay, cidrs = "198.18.0.0/16", SEGMENT_CIDRS.get(layout, ("198.18.1.11/16", "198.18.2.12/16"))
    lab = nodelab.FanLab(nodelab.new_prefix("ks"), tmp, underlay=underlay)
    cluster = None
    try:
        if layout == FLAT:
            nodes = [lab.add_node(cidr, fanmap=fanmap, overlay6=OVERLAY6) for cidr in cidrs]
            lab.add_outside()
        else:
            nodes = _on_segments(lab, cidrs)
        node6 = _add_ipv6_underlay(lab, nodes)
        for node in nodes:
            node.ns.set_sysctl("net.ipv4.conf.all.rp_filter", "1")
            node.up()
            shown = node.show()
            if shown["fanmap"] != fanmap or shown["problems"] or shown["direct_routing"] != (layout != FLAT):
                raise RuntimeError(f"node {node.address} is not up with fanmap {fanmap}: {shown}")
        added = [node.add_pod() for node in nodes for _ in "ab"]
        pods = [Member(f"p{pod.node.index}{letter}", pod.ns, pod.address, pod.node, pod.result["ips"][0]["gateway"])
                for pod, letter in zip(added, "abab")]
        node_members = [Member(f"node{i}", node.ns, node.address, node, pods[2 * (i - 1)].gateway)
                        for i, node in enumerate(nodes, 1)]
        cluster = Cluster(mode, fanmap, lab, nodes, pods, node_members, [], layout=layout)
        cluster.families[4] = cluster
        ipv6 = _ipv6_members(added, nodes, node6)
        if isinstance(ipv6, str) or _missing_ipv6_route(nodes):
            cluster.no_ipv6 = ipv6 if isinstance(ipv6, str) else _missing_ipv6_route(nodes)
        else:
            cluster.families[6] = dataclasses.replace(cluster, pods=ipv6[0], node_members=ipv6[1], family=6,
                                                      outside_address=OUTSIDE6_HOST)
        for view in cluster.families.values():
            view.services = services_for(view)
        all_services = [svc for view in cluster.families.values() for svc in view.services]
        hosts = "0.0.0.0,::"
        for member in pods:
            cluster.servers.append(WhoServer(member.ns, member.name, POD_PORT, host=hosts))
        api = [view.node_members[1].address for view in cluster.families.values()]
        cluster.servers.append(WhoServer(node_members[1].ns, node_members[1].name, API_PORT, host=",".join(api)))
        cluster.servers.append(WhoServer(lab.outside.host, "outside", POD_PORT, host=hosts))
        for view in cluster.families.values():
            view.servers = cluster.servers
            for node, member in zip(nodes, view.node_members):
                overlay = lab.overlay if view.family == 4 else OVERLAY6
                node_view = kp.NodeView(member.address, overlay, view.ips.cidr)
                kp.apply(in_node(node), kp.render(mode, all_services, node_view))
        for family, view in cluster.families.items():
            problem = _preflight(view)
            if problem:
                cluster.broken[family] = problem
        return cluster
    except BaseException:
        if cluster is not None:
            cluster.close()
        else:
            lab.close()
        raise


def in_node(node: nodelab.Node) -> kp.ArgvWrapper:
    """kubeproxy's argv wrapper for a node's namespace."""
    return lambda argv: node.ns.argv(*argv)


def services_for(cluster: Cluster) -> list[kp.Service]:
    """For the view's family: one-backend services (ClusterIP and NodePort,
    Cluster policy) in front of each pod; a Local-policy NodePort with a
    backend on each node; a DNS-like service over all pods; `kubernetes` in
    front of node 2's address; and one without endpoints."""
    def ep(member: Member, port: int = POD_PORT) -> kp.Endpoint:
        return kp.Endpoint(member.address, port, member.node_address)

    ips = cluster.ips
    out = []
    for proto in PROTOCOLS:
        for pod in cluster.pods:
            out.append(kp.Service(f"default/{pod.name}", cluster.service_ip(pod), SERVICE_PORT, proto, (ep(pod),),
                                  node_port=cluster.node_port(pod)))
        out.append(kp.Service("default/local", ips.local, SERVICE_PORT, proto,
                              (ep(cluster.pods[0]), ep(cluster.pods[2])), node_port=LOCAL_NODE_PORT,
                              external_local=True))
        out.append(kp.Service("default/local-one", ips.local_one, SERVICE_PORT, proto, (ep(cluster.pods[0]),),
                              node_port=LOCAL_ONE_NODE_PORT, external_local=True))
        out.append(kp.Service("kube-system/dns", ips.dns, 53, proto, tuple(ep(p) for p in cluster.pods)))
        api = cluster.node_members[1]
        out.append(kp.Service("default/kubernetes", ips.api, 443, proto, (ep(api, API_PORT),)))
        out.append(kp.Service("default/empty", ips.empty, SERVICE_PORT, proto, ()))
    return out


# -- hostPort through the chained portmap plugin ----------------------------------------------

def portmap_conf_dir(node: nodelab.Node) -> str:
    """A conflist of the same network with the reference `portmap` chained after `fan`."""
    conf_dir = node.dir / "net.d-portmap"
    conf_dir.mkdir(parents=True, exist_ok=True)
    data = node.conflist_data()
    data["plugins"].append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    (conf_dir / "10-fan.conflist").write_text(json.dumps(data, indent=1))
    return str(conf_dir)


def cnitool_with_ports(node: nodelab.Node, command: str, ns: nodelab.Netns,
                       mappings: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    env = dict(nodelab.BASE_ENV, NETCONFPATH=portmap_conf_dir(node),
               CNI_PATH=f"{nodelab.CNI_BIN}:{nodelab.netlab.REFERENCE_BIN}",
               CAP_ARGS=json.dumps({"portMappings": mappings}))
    return nodelab.run(node.ns.argv(nodelab.CNITOOL, command, nodelab.NETWORK, ns.path), env=env)
