"""Kubernetes Services and host networking through the Fan datapath, in every pattern kube-proxy makes (kernel tests).

One dual-stack cluster per configuration (tests/harness/servicelab.py):
kube-proxy's rules in iptables mode (ip6tables for IPv6) and in nftables
mode (`table ip` and `table ip6 kube-proxy`) (cni_fan/lab/kubeproxy.py),
each over the eBPF Fan map and over the `fanmap: routes` fallback, and
with direct routing (issue 12) over two underlay segments (nftables) and
within one (iptables, the nodes' traffic unencapsulated); two nodes
with strict reverse-path filtering, two pods on each, a router and a host
outside the cluster. Every test runs once per family (`-IPv4`, `-IPv6`) on
the same cluster; the IPv6 run is skipped, naming why, when the pods got
no IPv6 address. Every server answers with its name and the client address
it saw, so each answer checks both the backend reached and the source it saw.

Each test runs every client/backend pair that applies, over TCP and UDP,
collects what went wrong and fails once, naming pattern, configuration,
protocol, client and backend of every failure.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

import pytest

from harness import frames
from harness import servicelab as sl
from cni_fan.lab.wireframes import DIRECT, ENCAPSULATED, classify, in_order, path_ok
from cni_fan.lab import kubeproxy as kp

pytestmark = pytest.mark.kernel

# (kube-proxy mode, fanmap, where the nodes sit): the direct-routing rows (issue 12) put the two
# nodes on two segments (traffic between them encapsulated through the router) and on one
# (unencapsulated: kube-proxy's rules see the pods' packets as they come off the wire).
CONFIGS = [(kp.IPTABLES, "bpf", sl.FLAT), (kp.NFTABLES, "bpf", sl.FLAT), (kp.IPTABLES, "routes", sl.FLAT),
           (kp.NFTABLES, "routes", sl.FLAT), (kp.NFTABLES, "bpf", sl.DIRECT_2SEG), (kp.IPTABLES, "bpf", sl.DIRECT_1SEG)]
DNS_QUERIES = 120


@pytest.fixture(scope="module", params=CONFIGS,
                ids=[f"{m}-{f}" + ("" if lay == sl.FLAT else f"-{lay}") for m, f, lay in CONFIGS])
def built(request, tmp_path_factory):
    mode, fanmap, layout = request.param
    made = sl.build(mode, fanmap, tmp_path_factory.mktemp(f"k8s-{mode}-{fanmap}-{layout}"), layout)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=sl.FAMILIES, ids=[f"IPv{f}" for f in sl.FAMILIES])
def cluster(request, built):
    """The configuration's cluster seen through one family."""
    return built.view(request.param)


class Failures:
    """What went wrong in one test, each line naming pattern, configuration, protocol, client and backend."""

    def __init__(self, cluster: sl.Cluster, pattern: str) -> None:
        self.cluster, self.pattern, self.lines, self.checked = cluster, pattern, [], 0

    def expect(self, ok: bool, proto: str, client: str, target: str, backend: str, got: str, want: str) -> None:
        self.checked += 1
        if not ok:
            self.lines.append(f"{self.pattern} [{self.cluster.label()}] {proto}: {client} -> {target} "
                              f"(backend {backend}): got {got!r}, want {want}")

    def check(self) -> None:
        assert self.checked, f"{self.pattern}: nothing was checked"
        assert not self.lines, f"{len(self.lines)} of {self.checked} failed:\n" + "\n".join(self.lines)


def _split(answer: str) -> tuple[str, str]:
    name, _, seen = answer.partition(" ")
    return name, seen


# -- ClusterIP from pods ------------------------------------------------------------------------

def test_cluster_ip_from_pods_same_node_other_node_and_hairpin(cluster) -> None:
    """Pods keep their address towards a backend; a pod reaching itself
    through its service is masqueraded (to its node's bridge address)."""
    failures = Failures(cluster, "ClusterIP from a pod")
    for proto in sl.PROTOCOLS:
        for client in cluster.pods:
            for backend in cluster.pods:
                kind = "hairpin" if client is backend else "same node" if client.node is backend.node else "other node"
                got = sl.ask(client.ns, proto, cluster.service_ip(backend), sl.SERVICE_PORT)
                name, seen = _split(got)
                want_seen = client.gateway if kind == "hairpin" else client.address
                failures.expect(name == backend.name and seen == want_seen, proto, f"{client.name} ({kind})",
                                f"{cluster.service_ip(backend)}:{sl.SERVICE_PORT}", backend.name, got,
                                f"'{backend.name} {want_seen}'")
    failures.check()


def test_a_service_to_a_pod_on_the_other_node_takes_the_layouts_path(cluster) -> None:
    """How the packets of ClusterIP flows to a pod on the other node leave node 1,
    seen on its underlay interface: unencapsulated when both nodes share a segment
    with direct routing on, encapsulated otherwise."""
    client, backend = cluster.pods[0], cluster.pods[2]
    assert client.node is not backend.node
    sock = frames.packet_socket(client.node.ns.path, "eth0")
    try:
        answers = sl.ask_many(client.ns, "udp", cluster.service_ip(backend), sl.SERVICE_PORT, 5)
        seen = []
        while True:
            try:
                frame, address = sock.recvfrom(65535)
            except BlockingIOError:
                break
            carried = classify(frame) if address[2] == frames.PACKET_OUTGOING else None
            if carried and ipaddress.ip_address(carried.dst) == ipaddress.ip_address(backend.address):
                seen.append(carried.path)
    finally:
        sock.close()
    assert [_split(a)[0] for a in answers] == [backend.name] * 5, answers
    want = DIRECT if cluster.layout == sl.DIRECT_1SEG else ENCAPSULATED
    # (direct from the first direct packet on: before it, the program's fallback while the MAC is learnt)
    assert path_ok(want, seen), (cluster.label(), in_order(seen))


def test_dns_like_udp_service_many_short_flows_all_answered(cluster) -> None:
    """A service over all four pods, a new socket (and conntrack entry) per
    query, from every pod and every node: every query answered, by backends on both nodes."""
    failures = Failures(cluster, "DNS-like service, short flows")
    for proto, count in (("udp", DNS_QUERIES), ("tcp", DNS_QUERIES // 4)):
        for client in cluster.pods + cluster.node_members:
            answers = sl.ask_many(client.ns, proto, cluster.dns_ip, 53, count, give_up_after=3)
            names = Counter(_split(a)[0] for a in answers)
            backends = {p.name for p in cluster.pods}
            unanswered = [a for a in answers if _split(a)[0] not in backends]
            failures.expect(len(answers) == count and not unanswered, proto, client.name, f"{cluster.dns_ip}:53",
                            "any of 4", f"{len(unanswered)} of {len(answers)} sent unanswered (gave up after 3"
                            f" timeouts), e.g. {unanswered[:3]}, answered by {dict(names)}", f"all {count} answered")
            nodes_hit = {name[1] for name in names if name in backends}
            failures.expect(nodes_hit == {"1", "2"}, proto, client.name, f"{cluster.dns_ip}:53", "any of 4",
                            dict(names), "backends on both nodes")
    failures.check()


def test_cluster_ip_without_endpoints_is_refused(cluster) -> None:
    """kube-proxy rejects, so clients fail at once instead of timing out (a
    host-network UDP client's send is rejected in its own output hook: EPERM)."""
    failures = Failures(cluster, "ClusterIP without endpoints")
    eperm = "error: [Errno 1] Operation not permitted"
    for proto in sl.PROTOCOLS:
        for client in (cluster.pods[0], cluster.node_members[1]):
            got = sl.ask(client.ns, proto, cluster.empty_ip, sl.SERVICE_PORT)
            allowed = ("refused", eperm) if client in cluster.node_members else ("refused",)
            failures.expect(got in allowed, proto, client.name, f"{cluster.empty_ip}:{sl.SERVICE_PORT}",
                            "none", got, " or ".join(map(repr, allowed)))
    failures.check()


# -- NodePort from outside the cluster -------------------------------------------------------------

def test_nodeport_cluster_policy_from_outside_to_every_node_local_and_remote_backend(cluster) -> None:
    """The node the client reached masquerades (Cluster policy), so the
    backend sees an address of that node's slice, also across the tunnel."""
    failures = Failures(cluster, "NodePort, Cluster policy, from outside")
    outside = cluster.lab.outside.host
    for proto in sl.PROTOCOLS:
        for ingress in cluster.node_members:
            for backend in cluster.pods:
                where = "local" if backend.node is ingress.node else "remote"
                target = f"{ingress.address}:{cluster.node_port(backend)}"
                got = sl.ask(outside, proto, ingress.address, cluster.node_port(backend))
                name, seen = _split(got)
                ok = name == backend.name and seen == ingress.gateway
                failures.expect(ok, proto, f"outside {cluster.outside_address}", f"{target} ({ingress.name}, backend {where})",
                                backend.name, got, f"'{backend.name} {ingress.gateway}'")
    failures.check()


def test_nodeport_local_policy_keeps_the_client_address(cluster) -> None:
    failures = Failures(cluster, "NodePort, Local policy, from outside")
    outside = cluster.lab.outside
    for proto in sl.PROTOCOLS:
        for ingress, backend in zip(cluster.node_members, (cluster.pods[0], cluster.pods[2])):
            got = sl.ask(outside.host, proto, ingress.address, sl.LOCAL_NODE_PORT)
            want = f"{backend.name} {cluster.outside_address}"
            failures.expect(got == want, proto, f"outside {cluster.outside_address}",
                            f"{ingress.address}:{sl.LOCAL_NODE_PORT} ({ingress.name})", backend.name, got, repr(want))
    failures.check()


def test_nodeport_local_policy_drops_at_a_node_without_a_local_endpoint(cluster) -> None:
    """kube-proxy drops a Local-policy NodePort on a node with no local endpoint (it must not
    forward it across the tunnel to the endpoint elsewhere); the node that has one answers."""
    failures = Failures(cluster, "NodePort, Local policy, node without an endpoint")
    outside = cluster.lab.outside
    with_endpoint, without = cluster.node_members[0], cluster.node_members[1]
    backend = cluster.pods[0]
    assert backend.node is with_endpoint.node
    for proto in sl.PROTOCOLS:
        got = sl.ask(outside.host, proto, with_endpoint.address, sl.LOCAL_ONE_NODE_PORT)
        want = f"{backend.name} {cluster.outside_address}"
        failures.expect(got == want, proto, f"outside {cluster.outside_address}",
                        f"{with_endpoint.address}:{sl.LOCAL_ONE_NODE_PORT} ({with_endpoint.name})", backend.name, got,
                        repr(want))
        got = sl.ask(outside.host, proto, without.address, sl.LOCAL_ONE_NODE_PORT, timeout=1.0)
        failures.expect(got == "timeout", proto, f"outside {cluster.outside_address}",
                        f"{without.address}:{sl.LOCAL_ONE_NODE_PORT} ({without.name})", "none (dropped)", got,
                        "'timeout'")
    failures.check()


# -- host-network clients and backends ------------------------------------------------------------

def test_host_network_clients_to_cluster_ips_local_and_remote_backend(cluster) -> None:
    """The node's own processes (kubelet, hostNetwork pods) leave with the
    underlay address; kube-proxy masquerades them (outside clusterCIDR) to
    the outgoing device's address, which must be the node's overlay address."""
    failures = Failures(cluster, "host-network client to ClusterIP")
    for proto in sl.PROTOCOLS:
        for client in cluster.node_members:
            for backend in cluster.pods:
                where = "local" if backend.node is client.node else "remote"
                got = sl.ask(client.ns, proto, cluster.service_ip(backend), sl.SERVICE_PORT)
                want = f"{backend.name} {client.gateway}"
                failures.expect(got == want, proto, client.name, f"{cluster.service_ip(backend)}:{sl.SERVICE_PORT}",
                                f"{backend.name} ({where})", got, repr(want))
    failures.check()


def test_host_network_clients_to_pod_ips_on_every_node(cluster) -> None:
    failures = Failures(cluster, "host-network client to pod IP")
    for proto in sl.PROTOCOLS:
        for client in cluster.node_members:
            for backend in cluster.pods:
                got = sl.ask(client.ns, proto, backend.address, sl.POD_PORT)
                want = f"{backend.name} {client.gateway}"
                failures.expect(got == want, proto, client.name, f"{backend.address}:{sl.POD_PORT}", backend.name, got,
                                repr(want))
    failures.check()


def test_pods_to_a_host_network_backend_behind_a_service(cluster) -> None:
    """`kubernetes` (10.96.0.1:443, fd00:96::1 in IPv6) in front of node 2's
    address: a pod on node 2 arrives with its own address, one on node 1
    with node 1's address (the Fan's ipMasq, NAT66 in IPv6: the destination
    is outside the overlay)."""
    failures = Failures(cluster, "pod to host-network backend")
    api = cluster.node_members[1]
    for proto in sl.PROTOCOLS:
        for client in cluster.pods:
            got = sl.ask(client.ns, proto, cluster.api_ip, 443)
            want_seen = client.address if client.node is api.node else client.node_address
            want = f"{api.name} {want_seen}"
            failures.expect(got == want, proto, client.name, f"{cluster.api_ip}:443",
                            f"{api.name} {api.address}:{sl.API_PORT}", got, repr(want))
    failures.check()


# -- hostPort, egress ------------------------------------------------------------------------------

def test_host_port_through_chained_portmap_from_outside_and_del_removes_it(cluster) -> None:
    """The reference portmap after `fan` (DNAT in the node's ip or ip6 nat
    table, by the family of the pod's address), reached from outside at the
    node's address of the family; DEL takes the rules away."""
    failures = Failures(cluster, "hostPort (portmap)")
    outside = cluster.lab.outside
    host_port = 8081
    mappings = [{"hostPort": host_port, "containerPort": sl.POD_PORT, "protocol": proto} for proto in sl.PROTOCOLS]
    for node, member in zip(cluster.nodes, cluster.node_members):
        target = f"{sl.kp.host_port(member.address, host_port)}"
        ns = cluster.lab.new_netns("p")
        cluster.lab.pods.append(ns)
        sl.cnitool_with_ports(node, "add", ns, mappings)
        server = sl.WhoServer(ns, f"hostport-{node.index}", sl.POD_PORT, host="0.0.0.0,::")
        try:
            made = portmap_rules(node, host_port, cluster.family)
            failures.expect(bool(made), "-", "cnitool add", target, server.name,
                            "no portmap rules", f"its DNAT chain in the IPv{cluster.family} nat table")
            for proto in sl.PROTOCOLS:
                got = sl.ask(outside.host, proto, member.address, host_port)
                want = f"{server.name} {cluster.outside_address}"
                failures.expect(got == want, proto, f"outside {cluster.outside_address}", target,
                                server.name, got, repr(want))
            sl.cnitool_with_ports(node, "del", ns, mappings)
            left = portmap_rules(node, host_port, cluster.family)
            failures.expect(not left, "-", "cnitool del", target, server.name,
                            "\n".join(left), "no portmap rules left")
            for proto in sl.PROTOCOLS:
                got = sl.ask(outside.host, proto, member.address, host_port, timeout=1.0)
                failures.expect(not got.startswith(server.name), proto, "outside after DEL",
                                target, server.name, got, "no answer from the pod")
        finally:
            server.stop()
            ns.delete()
    failures.check()


def portmap_rules(node, host_port: int, family: int = 4) -> list[str]:
    """portmap's rules for `host_port` in the node's nat table of `family`
    (its CNI-DN-* chain and the jump to it)."""
    save = "iptables-save" if family == 4 else "ip6tables-save"
    return [line for line in node.ns.run(save, "-t", "nat").stdout.splitlines()
            if line.startswith("-A CNI-DN-") or re.search(rf"--dports? {host_port}\b", line)]


def test_pods_reach_the_outside_world_through_ip_masq(cluster) -> None:
    failures = Failures(cluster, "pod to outside (ipMasq)")
    for proto in sl.PROTOCOLS:
        for client in cluster.pods:
            got = sl.ask(client.ns, proto, cluster.outside_address, sl.POD_PORT)
            want = f"outside {client.node_address}"
            failures.expect(got == want, proto, client.name, f"{cluster.outside_address}:{sl.POD_PORT}", "outside", got,
                            repr(want))
    failures.check()
