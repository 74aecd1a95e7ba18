"""`cni-fan node up` on IPv6-only nodes (an IPv6 underlay): the datapath in real namespaces (marker `kernel`).

Two nodes on an IPv6 underlay switch (harness/nodelab.py, conflists without
`overlay`): each gets its bridge on its IPv6 slice, the VXLAN device over
IPv6 with zero UDP checksums, the fan program for outer IPv6, the IPv6
overlay route, IPv6 sysctls and the ip6 table; the nodes' gateways, and
pods the plugin made on each node, reach each other through the tunnel,
and `node down` leaves nothing.
"""
from __future__ import annotations

import json
from typing import Iterator

import pytest

from harness import nodelab
from harness.ping import ping_argv

pytestmark = pytest.mark.kernel

PREFIX = nodelab.new_prefix("v6")
UNDERLAY = "fd00:198:18::/112"
OVERLAY6 = "fd00:50::/48"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[list]:
    nodelab.require_root_and_tools()
    lab = nodelab.FanLab(PREFIX, tmp_path_factory.mktemp("nodes"), underlay=UNDERLAY, overlay=None,
                         overlay6=OVERLAY6)
    try:
        made = []
        for host in ("b", "c"):
            node = lab.add_node(None)
            node.ns.ip("addr", "add", f"fd00:198:18::{host}/112", "dev", "eth0", "nodad")
            node.cidr = f"fd00:198:18::{host}/112"
            made.append(node)
        for node in made:
            out = node.up()
            assert "set up" in out.stderr, out.stderr
        yield made
    finally:
        lab.close()


def test_node_show_says_the_ipv6_slice_and_no_problem(nodes) -> None:
    info = nodes[0].show()
    assert info["up"] and info["problems"] == [], info["problems"]
    assert (info["family"], info["slice"], info["gateway"]) == ("ipv6", "fd00:50:0:b::/64", "fd00:50:0:b::1")
    assert info["bridge"] == "fan6-500000000b" and info["mtu"] == 1430 and info["program"] is not None


def test_tunnel_is_vxlan_over_ipv6_taking_zero_checksums(nodes) -> None:
    link = json.loads(nodes[0].ns.run("ip", "-d", "-j", "link", "show", "fan-vxlan").stdout)[0]
    data = link["linkinfo"]["info_data"]
    assert data["local6"] == "fd00:198:18::b" and data["udp_zero_csum6_rx"] and data["udp_zero_csum6_tx"]
    assert link["mtu"] == 1430


def test_gateways_reach_each_other_through_the_tunnel(nodes) -> None:
    one, two = nodes
    proc = one.ns.run(*ping_argv("fd00:50:0:c::1", count=3, wait=2), check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Full-size packets fit: the MTU is the underlay's minus 70.
    proc = one.ns.run(*ping_argv("fd00:50:0:c::1", size=1430 - 48, dont_fragment=True), check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert two.ns.run("nstat", "-az", "Udp6InCsumErrors").stdout.split()[-2] == "0"


def test_the_plugins_status_says_ready(nodes) -> None:
    conf = nodes[0].conflist_data()["plugins"][0] | {"name": "fan", "cniVersion": "1.1.0"}
    code, answer, stderr = nodelab.run_plugin(nodes[0], "STATUS", conf)
    assert code == 0, (answer, stderr)


def test_pods_made_by_the_plugin_reach_each_other_across_nodes(nodes) -> None:
    """Pods of both nodes, from `fan` through cnitool: IPv6 only, full-size packets through the tunnel."""
    one, two = (node.add_pod() for node in nodes)
    assert one.address.startswith("fd00:50:0:b::") and two.address.startswith("fd00:50:0:c::")
    assert one.ns.ipv4_addrs("eth0") == set() and one.mtu == 1430
    assert one.reaches(two.address, wait=5) and two.reaches(one.address)
    proc = one.ping(two.address, size=1430 - 48, dont_fragment=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_ipv6_sysctls_and_the_ip6_table(nodes) -> None:
    ns = nodes[0].ns
    assert ns.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert ns.run("nft", "list", "table", "ip", "cni-fan", check=False).returncode != 0
    text = ns.run("nft", "list", "table", "ip6", "cni-fan").stdout
    assert "ip6 saddr != fd00:198:18::/112" in text and "masquerade" in text


def test_node_down_removes_what_up_made(nodes) -> None:
    node = nodes[1]
    node.down()
    ns = node.ns
    assert ns.run("ip", "link", "show", "fan-vxlan", check=False).returncode != 0
    assert ns.run("ip", "link", "show", "fan6-500000000c", check=False).returncode != 0
    assert ns.run("nft", "list", "table", "ip6", "cni-fan", check=False).returncode != 0
    assert node.up().returncode == 0
