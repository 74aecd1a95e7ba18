"""Dual-stack nodes (`overlay6`): `cni-fan node up|down|show` and IPv6 traffic (kernel tests).

A lab of its own (harness/nodelab.py with `overlay6`, prefix `tds<hex>`):
underlay 198.18.0.0/24, overlay 241.0.0.0/8, overlay6 fd41::/48, so node
198.18.0.11 owns 241.11.0.0/16 and fd41:0:0:b00::/56 (gateway
fd41:0:0:b00::1). Pods are plain namespaces with both addresses
(harness/dualstack.py). An outside router and host carry IPv4 and IPv6.

`routes` mode, three nodes: every pod reaches every other over IPv6; a
node reaches a remote pod with its IPv6 gateway as the source; pods reach
the outside IPv6 host through NAT66 (the outside sees the node's address);
`node up` twice changes nothing; `node down` removes every IPv6 address,
route and permanent neighbour `up` made; a missing tunnel /128 or IPv6
peer route is a problem (`node show`, STATUS) that `up` repairs. The
per-node state is the same at 2 and 4 nodes. `bpf` mode: the IPv6 route,
neighbour and /128 are made; IPv6 pings across nodes run once the program
maps IPv6 (skipped, with the reason, until then).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest

from cni_fan.bpf.fanprog import FanDatapathParams
from cni_fan.node import fanmap_routes
from harness import dualstack, nodelab
from harness.state import state_diff

pytestmark = pytest.mark.kernel

PREFIX = nodelab.new_prefix("ds")
UNDERLAY = "198.18.0.0/24"
OVERLAY6 = "fd41::/48"
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.bridge.bridge-nf-call-iptables",
           "net.bridge.bridge-nf-call-ip6tables", "net.ipv6.conf.default.forwarding")


def new_lab(tmp, suffix: str = "") -> nodelab.FanLab:
    nodelab.require_root_and_tools()
    return nodelab.FanLab(PREFIX + suffix, tmp, underlay=UNDERLAY, overlay6=OVERLAY6)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[nodelab.FanLab]:
    made = new_lab(tmp_path_factory.mktemp("nodes"))
    try:
        made.add_outside()
        dualstack.add_outside6(made)
        yield made
    finally:
        made.close()


@dataclasses.dataclass
class Cluster:
    nodes: list
    pods: list


@pytest.fixture(scope="module")
def cluster(lab) -> Cluster:
    """Three dual-stack nodes in `routes` mode, up, two pods each (container indexes 0 and 3)."""
    nodes = [lab.add_node(f"198.18.0.{11 + i}/24", fanmap="routes") for i in range(3)]
    for node in nodes:
        dualstack.give_ipv6_egress(node)
        out = node.up()
        assert "set up" in out.stderr, out.stderr
    pods = [dualstack.add_pod(lab, node, index) for node in nodes for index in (0, 3)]
    return Cluster(nodes, pods)


# -- traffic ------------------------------------------------------------------------------

def test_every_pod_reaches_every_other_over_ipv6(cluster) -> None:
    assert cluster.pods[0].ipv6 == "fd41:0:0:b00::2" and cluster.pods[1].ipv6 == "fd41:0:0:b00::5"
    assert cluster.pods[2].ipv6 == "fd41:0:0:c00::2"
    failed = [f"{a.ipv6} -> {b.ipv6}" for a in cluster.pods for b in cluster.pods
              if a is not b and not a.reaches(b.ipv6)]
    assert failed == [], f"{len(failed)} IPv6 pod pairs failed: {failed}"
    # IPv4 still works beside it.
    assert cluster.pods[0].reaches(cluster.pods[-1].ipv4)


def test_a_node_reaches_a_remote_pod_with_its_ipv6_gateway_as_source(cluster) -> None:
    n1, remote = cluster.nodes[0], cluster.pods[2]
    gateway6 = str(dualstack.node_plan(n1).ipv6.gateway)
    assert gateway6 == "fd41:0:0:b00::1"
    assert n1.ns.run("ping", "-n", "-q", "-c", "1", "-W", "2", remote.ipv6, check=False).returncode == 0
    assert dualstack.udp_source(remote.ns, n1.ns, remote.ipv6) == gateway6


def test_pods_reach_the_outside_ipv6_host_through_nat66(cluster, lab) -> None:
    for pod in (cluster.pods[0], cluster.pods[3]):
        assert pod.reaches(dualstack.OUTSIDE6_HOST), pod.ping(dualstack.OUTSIDE6_HOST).stdout
        node_address = f"fd00:ffff:1::{pod.node.index:x}"
        assert dualstack.udp_source(lab.outside.host, pod.ns, dualstack.OUTSIDE6_HOST) == node_address
    listing = cluster.nodes[0].ns.run("nft", "list", "table", "ip6", "cni-fan").stdout
    assert "ip6 saddr fd41:0:0:b00::/56 ip6 daddr != fd41::/48" in listing and "masquerade" in listing


# -- problems and repairs ------------------------------------------------------------------

def test_a_tunnel_without_its_ipv6_address_is_a_problem_and_up_puts_it_back(cluster) -> None:
    n1, remote = cluster.nodes[0], cluster.pods[2]
    n1.ns.ip("addr", "del", "fd41:0:0:b00::1/128", "dev", "fan-vxlan")
    try:
        broken = n1.show()
        assert broken["up"] is False
        assert "tunnel fan-vxlan lacks fd41:0:0:b00::1/128" in broken["problems"], broken["problems"]
    finally:
        n1.up()
    assert n1.show()["up"] is True
    assert "fd41:0:0:b00::1/128" in {a.split()[1] for a in dualstack.ipv6_state(n1.ns)["addrs6"]
                                     if a.startswith("fan-vxlan ")}
    assert dualstack.udp_source(remote.ns, n1.ns, remote.ipv6) == "fd41:0:0:b00::1"


def test_a_missing_ipv6_peer_route_fails_status_and_up_puts_it_back(cluster) -> None:
    n1 = cluster.nodes[0]
    config = {"cniVersion": "1.1.0", "name": "fan", **n1.conflist_data()["plugins"][0]}
    assert nodelab.run_plugin(n1, "STATUS", config)[0] == 0
    n1.ns.ip("-6", "route", "del", "fd41:0:0:c00::/56")
    code, out, err = nodelab.run_plugin(n1, "STATUS", config)
    assert code != 0 and out["code"] == 50, (code, out, err)
    assert "IPv6 peer routes" in out.get("details", ""), out
    assert not cluster.pods[0].reaches(cluster.pods[2].ipv6, wait=1)
    n1.up()
    assert nodelab.run_plugin(n1, "STATUS", config)[0] == 0
    assert cluster.pods[0].reaches(cluster.pods[2].ipv6)


def test_show_prints_both_slices(cluster) -> None:
    n1 = cluster.nodes[0]
    info = n1.show()
    assert info["slice"] == "241.11.0.0/16" and info["gateway"] == "241.11.0.1"
    assert info["ipv6"] == {"overlay": "fd41::/48", "slice": "fd41:0:0:b00::/56", "gateway": "fd41:0:0:b00::1",
                            "tunnel_address": "fd41:0:0:b00::1/128"}
    text = n1.cni_fan("node", "show", "--conflist", n1.conflist).stdout
    assert "slice6    fd41:0:0:b00::/56 (gateway fd41:0:0:b00::1" in text and "overlay6  fd41::/48" in text


# -- up twice, down --------------------------------------------------------------------------

@pytest.mark.parametrize("fanmap", ["routes", "bpf"])
def test_up_twice_changes_nothing_and_down_removes_every_ipv6_entry(lab, fanmap: str) -> None:
    node = lab.add_node(f"198.18.0.{40 + len(lab.nodes)}/24", fanmap=fanmap)
    node.ns.set_sysctl("net.ipv6.conf.all.forwarding", "0")
    before = node.ns.snapshot(SYSCTLS, ipv6=True)

    assert "set up" in node.up().stderr
    after_up = node.ns.snapshot(SYSCTLS, ipv6=True)
    plan = dualstack.node_plan(node)
    gw6 = str(plan.ipv6.gateway)
    assert f"{plan.bridge} {gw6}/{plan.ipv6.slice.prefixlen}" in after_up["addrs6"]
    assert f"fan-vxlan {gw6}/128" in after_up["addrs6"]
    assert after_up["sysctls"]["net.ipv6.conf.all.forwarding"] == "1"
    assert node.ns.sysctl(f"net.ipv6.conf.{plan.bridge}.accept_ra") == "0"
    if fanmap == "bpf":
        assert any('"dst": "fd41::/48"' in r and '"gateway": "fd41::"' in r and f'"prefsrc": "{gw6}"' in r
                   and '"onlink"' in r for r in after_up["routes6"]), after_up["routes6"]
        assert any('"dst": "fd41::"' in n and plan.tunnel_mac in n for n in after_up["neigh6"])
    else:
        assert any('"dst": "fd41::/48"' in r and '"type": "unreachable"' in r for r in after_up["routes6"])
        assert dualstack.fan_state_count(node)["routes6"] == fanmap_routes.expected_entries(plan) == 253

    second = node.up()
    assert "already up" in second.stderr, second.stderr
    changed = state_diff(after_up, node.ns.snapshot(SYSCTLS, ipv6=True))
    assert changed == [], "a second `node up` changed the node:\n" + "\n".join(changed)

    assert "removed" in node.down().stderr
    left = state_diff(before, node.ns.snapshot(SYSCTLS, ipv6=True))
    assert left == [], "node down left differences:\n" + "\n".join(left)


# -- per-node state ---------------------------------------------------------------------------

def test_per_node_state_is_the_same_at_2_and_4_nodes(tmp_path) -> None:
    small = new_lab(tmp_path, "s")
    try:
        nodes = [small.add_node(f"198.18.0.{21 + i}/24", fanmap="routes") for i in range(2)]
        for node in nodes:
            node.up()
        at_two = dualstack.fan_state_count(nodes[0])
        for i in range(2, 4):
            nodes.append(small.add_node(f"198.18.0.{21 + i}/24", fanmap="routes"))
            nodes[-1].up()
        at_four = dualstack.fan_state_count(nodes[0])
        assert at_two == at_four
        # Per possible host of the /24 but this one: IPv4 and IPv6 route and neighbour, one FDB entry.
        assert at_two == {"routes4": 253, "routes6": 253, "neigh4": 253, "neigh6": 253, "fdb": 253}
        a, b = dualstack.add_pod(small, nodes[0], 0), dualstack.add_pod(small, nodes[3], 0)
        assert a.reaches(b.ipv6) and b.reaches(a.ipv6)
    finally:
        small.close()


# -- bpf mode ----------------------------------------------------------------------------------

def test_bpf_mode_status_checks_the_ipv6_route_and_its_neighbour(lab) -> None:
    node = lab.add_node(f"198.18.0.{80 + len(lab.nodes)}/24")
    config = {"cniVersion": "1.1.0", "name": "fan", **node.conflist_data()["plugins"][0]}
    node.up()
    try:
        assert nodelab.run_plugin(node, "STATUS", config)[0] == 0
        node.ns.ip("-6", "route", "del", "fd41::/48")
        code, out, err = nodelab.run_plugin(node, "STATUS", config)
        assert code != 0 and out["code"] == 50 and "route to fd41::/48 is missing" in out.get("details", ""), out
        node.up()
        node.ns.ip("-6", "neigh", "del", "fd41::", "dev", "fan-vxlan")
        code, out, err = nodelab.run_plugin(node, "STATUS", config)
        assert code != 0 and "permanent neighbour fd41:: -> " in out.get("details", ""), out
        node.up()
        assert nodelab.run_plugin(node, "STATUS", config)[0] == 0
    finally:
        node.down()


def test_bpf_mode_pods_reach_each_other_over_ipv6(tmp_path) -> None:
    if "overlay6" not in {f.name for f in dataclasses.fields(FanDatapathParams)}:
        pytest.skip("the fan program maps IPv4 only (FanDatapathParams has no overlay6): IPv6 across "
                    "nodes in bpf mode needs the program's IPv6 mapping")
    bpf_lab = new_lab(tmp_path, "b")
    try:
        n1, n2 = (bpf_lab.add_node(f"198.18.0.{31 + i}/24") for i in range(2))
        for node in (n1, n2):
            node.up()
        a, b = dualstack.add_pod(bpf_lab, n1, 0), dualstack.add_pod(bpf_lab, n2, 0)
        assert a.reaches(b.ipv6), a.ping(b.ipv6).stdout
        assert b.reaches(a.ipv6), b.ping(a.ipv6).stdout
        assert dualstack.udp_source(b.ns, n1.ns, b.ipv6) == str(dualstack.node_plan(n1).ipv6.gateway)
    finally:
        bpf_lab.close()


def test_traffic_masqueraded_into_the_tunnel_leaves_with_the_tunnels_ipv6_address(cluster) -> None:
    """What kube-proxy's MASQUERADE does to NodePort and host-network traffic into the overlay:
    the source becomes an address of the tunnel, the /128 gateway. With
    `use_oif_addrs_only` (only the outgoing device's addresses count) the same
    packet without the /128 leaves with the tunnel's link-local source, which no
    router forwards: the remote pod never sees it."""
    n1, remote = cluster.nodes[0], cluster.pods[2]
    underlay6 = "fd00:ffff:1::1"
    kube = "table ip6 kp {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n" \
           f'  oifname "fan-vxlan" ip6 saddr {underlay6} masquerade\n }}\n}}\n'
    n1.ns.run("nft", "-f", "-", input=kube)
    n1.ns.set_sysctl("net.ipv6.conf.fan-vxlan.use_oif_addrs_only", "1")
    try:
        assert dualstack.udp_source(remote.ns, n1.ns, remote.ipv6, bind=underlay6) == "fd41:0:0:b00::1"
        n1.ns.ip("addr", "del", "fd41:0:0:b00::1/128", "dev", "fan-vxlan")
        assert dualstack.udp_source(remote.ns, n1.ns, remote.ipv6, bind=underlay6, port=5354) is None
        n1.up()
        assert dualstack.udp_source(remote.ns, n1.ns, remote.ipv6, bind=underlay6, port=5355) == "fd41:0:0:b00::1"
    finally:
        n1.ns.set_sysctl("net.ipv6.conf.fan-vxlan.use_oif_addrs_only", "0")
        n1.ns.run("nft", "delete", "table", "ip6", "kp", check=False)
        n1.up()


# -- IPv6 forwarding and router advertisements on the underlay ------------------------------

@pytest.mark.parametrize("accept_ra, kept", [("1", False), ("2", True)])
def test_ipv6_forwarding_drops_a_default_route_learnt_by_ra_unless_accept_ra_is_2(lab, accept_ra: str,
                                                                                    kept: bool) -> None:
    """docs/install.md: `node up` sets net.ipv6.conf.all.forwarding=1, after which the
    kernel drops default routes learnt from RAs on interfaces whose accept_ra is not 2
    (and ignores later RAs there). `up` does not touch the underlay interface."""
    router = lab.outside.router
    assert nodelab.wait_until(lambda: not [a for link in router.ip_json("-6", "addr", "show", "dev", "eth0")
                                           for a in link.get("addr_info", []) if a.get("tentative")], timeout=5)
    node = lab.add_node(f"198.18.0.{60 + len(lab.nodes)}/24", fanmap="routes")
    node.ns.set_sysctl("net.ipv6.conf.eth0.accept_ra", accept_ra)
    assert node.ns.sysctl("net.ipv6.conf.all.forwarding") == "0"
    # The node's link-local address must be usable before it accepts RAs.
    assert nodelab.wait_until(lambda: not [a for link in node.ns.ip_json("-6", "addr", "show", "dev", "eth0")
                                           for a in link.get("addr_info", []) if a.get("tentative")], timeout=5)
    dualstack.send_router_advertisement(router)
    assert nodelab.wait_until(lambda: dualstack.ra_default_routes(node.ns), timeout=3), "no RA default route"
    try:
        node.up()
        assert node.ns.sysctl("net.ipv6.conf.all.forwarding") == "1"
        assert node.ns.sysctl("net.ipv6.conf.eth0.accept_ra") == accept_ra
        assert bool(dualstack.ra_default_routes(node.ns)) is kept
        dualstack.send_router_advertisement(router)  # a later RA changes nothing either way
        assert bool(nodelab.wait_until(lambda: dualstack.ra_default_routes(node.ns), timeout=1)) is kept
    finally:
        node.down()
