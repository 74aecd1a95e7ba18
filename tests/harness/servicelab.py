"""A Kubernetes-shaped cluster on the node lab: Services, servers that say who they are, clients.

Built on tests/nodelab.py: two nodes (reverse-path filtering strict, as
RHEL sets it), two pods on each, the outside router and host, and
kube-proxy's rules (cni_fan/lab/kubeproxy.py) rendered for each node and
loaded into it, in one of kube-proxy's modes.

Every server (`WhoServer`) answers TCP and UDP on one port with its name and
the client address it saw, so one answer tells which backend was reached
and whether the client was masqueraded. `ask` and `ask_many` are the
clients, run in a thread inside a namespace (a socket per query).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from harness import nodelab
from harness.traffic import WhoServer, ask, ask_many  # noqa: F401 (the tests use them as sl.*)
from cni_fan.lab import kubeproxy as kp

POD_PORT = 8080          # every pod's server
SERVICE_PORT = 80
API_PORT = 6443          # the host-network backend (node 2's "API server")
API_CLUSTER_IP = "10.96.0.1"
DNS_CLUSTER_IP = "10.96.0.10"
LOCAL_CLUSTER_IP = "10.96.2.1"
EMPTY_CLUSTER_IP = "10.96.3.1"
LOCAL_NODE_PORT = 31001
SERVICE_CIDR = "10.96.0.0/16"
PROTOCOLS = ("tcp", "udp")

@dataclass
class Member:
    """A pod or a node as a client and a server: its namespace, name and address."""
    name: str
    ns: nodelab.Netns
    address: str
    node: nodelab.Node
    gateway: str            # its node's bridge address (what the node masquerades to inside the overlay)


@dataclass
class Cluster:
    mode: str
    fanmap: str
    lab: nodelab.FanLab
    nodes: list[nodelab.Node]
    pods: list[Member]                               # p1a, p1b on node 1; p2a, p2b on node 2
    node_members: list[Member]
    services: list[kp.Service]
    servers: list[WhoServer] = field(default_factory=list)

    def label(self) -> str:
        return f"{self.mode}/{self.fanmap}"

    def service_ip(self, backend: Member) -> str:
        """The ClusterIP of the one-backend service in front of `backend`."""
        return f"10.96.1.{self.pods.index(backend) + 1}"

    def node_port(self, backend: Member) -> int:
        return 30001 + self.pods.index(backend)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.lab.close()


def build(mode: str, fanmap: str, tmp) -> Cluster:
    """Two nodes with two pods each, the outside world, servers everywhere and
    kube-proxy's rules in `mode`. `fanmap` "routes" uses a /24 underlay (the
    routes fallback installs an entry per possible peer)."""
    nodelab.require_root_and_tools()
    if fanmap == "routes":
        underlay, cidrs = "198.18.255.0/24", ("198.18.255.11/24", "198.18.255.12/24")
    else:
        underlay, cidrs = "198.18.0.0/16", ("198.18.1.11/16", "198.18.2.12/16")
    lab = nodelab.FanLab(nodelab.new_prefix("ks"), tmp, underlay=underlay)
    cluster = None
    try:
        nodes = [lab.add_node(cidr, fanmap=fanmap) for cidr in cidrs]
        lab.add_outside()
        for node in nodes:
            node.ns.set_sysctl("net.ipv4.conf.all.rp_filter", "1")
            node.up()
            shown = node.show()
            if shown["fanmap"] != fanmap or shown["problems"]:
                raise RuntimeError(f"node {node.address} is not up with fanmap {fanmap}: {shown}")
        pods = []
        for i, node in enumerate(nodes, 1):
            for letter in "ab":
                pod = node.add_pod()
                pods.append(Member(f"p{i}{letter}", pod.ns, pod.address, node, pod.result["ips"][0]["gateway"]))
        node_members = [Member(f"node{i}", node.ns, node.address, node, pods[2 * (i - 1)].gateway)
                        for i, node in enumerate(nodes, 1)]
        cluster = Cluster(mode, fanmap, lab, nodes, pods, node_members, [])
        cluster.services = services_for(cluster)
        for member in pods:
            cluster.servers.append(WhoServer(member.ns, member.name, POD_PORT))
        api = node_members[1]
        cluster.servers.append(WhoServer(api.ns, api.name, API_PORT, host=api.address))
        cluster.servers.append(WhoServer(lab.outside.host, "outside", POD_PORT))
        for node in nodes:
            view = kp.NodeView(node.address, lab.overlay, SERVICE_CIDR)
            kp.apply(in_node(node), kp.render(mode, cluster.services, view))
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
    """One-backend services (ClusterIP and NodePort, Cluster policy) in front of
    each pod; a Local-policy NodePort with a backend on each node; a DNS-like
    service over all pods; `kubernetes` in front of node 2's address; and one
    without endpoints."""
    def ep(member: Member, port: int = POD_PORT) -> kp.Endpoint:
        return kp.Endpoint(member.address, port, member.node.address)

    out = []
    for proto in PROTOCOLS:
        for pod in cluster.pods:
            out.append(kp.Service(f"default/{pod.name}", cluster.service_ip(pod), SERVICE_PORT, proto, (ep(pod),),
                                  node_port=cluster.node_port(pod)))
        out.append(kp.Service("default/local", LOCAL_CLUSTER_IP, SERVICE_PORT, proto,
                              (ep(cluster.pods[0]), ep(cluster.pods[2])), node_port=LOCAL_NODE_PORT,
                              external_local=True))
        out.append(kp.Service("kube-system/dns", DNS_CLUSTER_IP, 53, proto, tuple(ep(p) for p in cluster.pods)))
        api = cluster.node_members[1]
        out.append(kp.Service("default/kubernetes", API_CLUSTER_IP, 443, proto, (ep(api, API_PORT),)))
        out.append(kp.Service("default/empty", EMPTY_CLUSTER_IP, SERVICE_PORT, proto, ()))
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
