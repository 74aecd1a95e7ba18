"""NetworkPolicy engines that work through netfilter see every pod packet.

Flannel-like CNIs leave NetworkPolicy to a separate engine in netfilter:
kube-network-policies (kindnet, flannel's chart: an nftables `inet` table
with chains on the forward, postrouting and input hooks, keyed on pod
addresses) and kube-router's firewall (k3s: iptables chains from FORWARD
and INPUT, ipsets of pod addresses). Whatever the Fan datapath does (the
bridge, the port guard's tc program, the tunnel's eBPF encapsulation) must
leave those hooks in the path: a rule keyed on pod addresses, in each hook,
has to stop same-node and cross-node pod traffic, and Service traffic after
kube-proxy-style DNAT, on the node where the engine puts it.

kube-network-policies hands new connections to its userspace with an
NFQUEUE verdict; this kernel has no nftables queue (CONFIG_NFT_QUEUE
unset), so the rules here give the verdict that userspace would (drop)
directly. What is tested is that the packets reach the hook, keyed on pod
addresses, which is the same either way.

Each case checks three things: without the rule the pair talks; with it
the pair does not (TCP and UDP), and the rule's own counter rose (it was
this rule, not something else, that stopped them); a bystander pair that
the rule does not name still talks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pytest

from harness import nodelab
from harness.nodelab import FanLab, Node, Pod
from harness.traffic import WhoServer, ask

pytestmark = pytest.mark.kernel

PORT = 8080
NODE_PORT = 9090
SERVICE_IP = "10.96.7.7"
SERVICE_PORT = 80
lab = nodelab.lab_fixture(nodelab.new_prefix("np"))


@dataclass
class Cluster:
    n1: Node
    n2: Node
    a: Pod   # on n1
    b: Pod   # on n1
    c: Pod   # on n2
    d: Pod   # on n2


@pytest.fixture(scope="module")
def cluster(lab: FanLab) -> Iterator[Cluster]:
    n1, n2, a, c = nodelab.two_nodes_up(lab)
    b, d = n1.add_pod(), n2.add_pod()
    for node in (n1, n2):
        node.ns.set_sysctl("net.ipv4.conf.all.rp_filter", "1")  # strict, as RHEL sets it
    servers = []
    try:
        for name, ns in (("a", a.ns), ("b", b.ns), ("c", c.ns), ("d", d.ns)):
            servers.append(WhoServer(ns, name, PORT))
        servers.append(WhoServer(n1.ns, "n1", NODE_PORT, host=n1.address))
        # A ClusterIP on both nodes, DNAT to pod a (on n1), as kube-proxy
        # does in nat PREROUTING (what the policy hooks must see is the
        # packet after this DNAT, addressed to the pod).
        for node in (n1, n2):
            node.ns.run("nft", "-f", "-", input=(
                "table ip svc {\n"
                " chain prerouting {\n"
                "  type nat hook prerouting priority dstnat; policy accept;\n"
                f"  ip daddr {SERVICE_IP} meta l4proto {{ tcp, udp }} th dport {SERVICE_PORT} dnat to {a.address}:{PORT}\n"
                " }\n"
                "}\n"))
        yield Cluster(n1, n2, a, b, c, d)
    finally:
        for server in servers:
            server.stop()


@dataclass(frozen=True)
class Path:
    """Who talks to whom, and on which node the engine's rule is put."""
    name: str
    client: str          # pod attribute of Cluster
    target: str          # pod attribute, or "n1" for the node itself
    via_service: bool    # connect to the ClusterIP (DNAT to pod a) instead
    rule_node: str       # where the policy engine enforces
    bystander: str       # a client the rule does not name, same target, through the same hook


FORWARD_PATHS = [
    Path("same-node", "b", "a", False, "n1", "c"),
    Path("cross-node, at the receiving node", "c", "a", False, "n1", "d"),
    Path("cross-node, at the sending node", "a", "c", False, "n1", "b"),
    Path("service after DNAT, same node", "b", "a", True, "n1", "c"),
    Path("service after DNAT, at the sending node", "c", "a", True, "n2", "d"),
    Path("service after DNAT, at the receiving node", "c", "a", True, "n1", "d"),
]
INPUT_PATHS = [Path("pod to its node", "a", "n1", False, "n1", "b")]


def _addr(cl: Cluster, who: str) -> str:
    return cl.n1.address if who == "n1" else getattr(cl, who).address


def _dest(cl: Cluster, path: Path) -> tuple[str, int]:
    if path.via_service:
        return SERVICE_IP, SERVICE_PORT
    return _addr(cl, path.target), NODE_PORT if path.target == "n1" else PORT


def _talks(cl: Cluster, client: str, path: Path, proto: str, timeout: float = 2.0) -> bool:
    host, port = _dest(cl, path)
    answer = ask(getattr(cl, client).ns, proto, host, port, timeout=timeout)
    return answer.split()[0] == path.target


# -- the two engines' rule shapes ------------------------------------------------

class KubeNetworkPolicies:
    """An `inet kube-network-policies` table: a set of the policed pods'
    addresses and one base chain on the hook, matching by address."""
    name = "kube-network-policies (nftables)"
    hooks = ("forward", "postrouting", "input")

    def install(self, node: Node, hook: str, src: str, dst: str) -> None:
        node.ns.run("nft", "-f", "-", input=(
            "table inet kube-network-policies {\n"
            f" set podips-v4 {{ type ipv4_addr; elements = {{ {dst} }} }}\n"
            f" chain {hook} {{\n"
            f"  type filter hook {hook} priority filter - 5; policy accept;\n"
            f"  ip daddr @podips-v4 ip saddr {src} counter drop\n"
            " }\n"
            "}\n"))

    def hits(self, node: Node, hook: str) -> int:
        text = node.ns.run("nft", "list", "chain", "inet", "kube-network-policies", hook).stdout
        return int(text.split("counter packets ")[1].split()[0])

    def remove(self, node: Node) -> None:
        node.ns.run("nft", "delete", "table", "inet", "kube-network-policies", check=False)


class KubeRouterFirewall:
    """kube-router's shape: KUBE-ROUTER-<HOOK> jumped from the filter hook,
    a per-pod firewall chain selected by destination, ipsets of sources."""
    name = "kube-router firewall (iptables + ipset)"
    hooks = ("forward", "input")

    def install(self, node: Node, hook: str, src: str, dst: str) -> None:
        top, chain = f"KUBE-ROUTER-{hook.upper()}", "KUBE-POD-FW-TEST"
        for argv in (["ipset", "create", "KUBE-SRC-TEST", "hash:ip"], ["ipset", "add", "KUBE-SRC-TEST", src],
                     ["iptables", "-N", top], ["iptables", "-N", chain],
                     ["iptables", "-I", hook.upper(), "1", "-j", top],
                     ["iptables", "-A", top, "-d", f"{dst}/32", "-j", chain],
                     ["iptables", "-A", chain, "-m", "set", "--match-set", "KUBE-SRC-TEST", "src", "-j", "DROP"]):
            node.ns.run(*argv)

    def hits(self, node: Node, hook: str) -> int:
        out = node.ns.run("iptables", "-L", "KUBE-POD-FW-TEST", "-v", "-x", "-n").stdout
        return int(next(line for line in out.splitlines() if "DROP" in line).split()[0])

    def remove(self, node: Node) -> None:
        for hook in self.hooks:
            top = f"KUBE-ROUTER-{hook.upper()}"
            node.ns.run("iptables", "-D", hook.upper(), "-j", top, check=False)
            node.ns.run("iptables", "-F", top, check=False)
            node.ns.run("iptables", "-X", top, check=False)
        node.ns.run("iptables", "-F", "KUBE-POD-FW-TEST", check=False)
        node.ns.run("iptables", "-X", "KUBE-POD-FW-TEST", check=False)
        node.ns.run("ipset", "destroy", "KUBE-SRC-TEST", check=False)


ENGINES = [KubeNetworkPolicies(), KubeRouterFirewall()]
CASES = [pytest.param(engine, hook, path, id=f"{type(engine).__name__}-{hook}-{path.name}")
         for engine in ENGINES for hook in engine.hooks
         for path in (INPUT_PATHS if hook == "input" else FORWARD_PATHS)]


@pytest.mark.parametrize("engine,hook,path", CASES)
def test_policy_keyed_on_pod_addresses_is_enforced(cluster: Cluster, engine, hook: str, path: Path) -> None:
    node = getattr(cluster, path.rule_node)
    src, dst = _addr(cluster, path.client), _addr(cluster, path.target)
    for proto in ("tcp", "udp"):
        assert _talks(cluster, path.client, path, proto), f"{path.name} {proto}: no connection even without a rule"
    engine.install(node, hook, src, dst)
    try:
        for proto in ("tcp", "udp"):
            before = engine.hits(node, hook)
            assert not _talks(cluster, path.client, path, proto, timeout=1.0), (
                f"{engine.name}, {hook} hook on {path.rule_node}: {path.name} ({path.client} -> {path.target}, "
                f"{proto}) got through a rule keyed on {src} -> {dst}")
            assert engine.hits(node, hook) > before, f"{path.name} {proto}: stopped, but not by the rule"
            assert _talks(cluster, path.bystander, path, proto), (
                f"{engine.name}, {hook} hook: bystander {path.bystander} -> {path.target} ({proto}) was blocked too")
    finally:
        engine.remove(node)
    for proto in ("tcp", "udp"):
        assert _talks(cluster, path.client, path, proto), f"{path.name} {proto}: still blocked after the rule went"
