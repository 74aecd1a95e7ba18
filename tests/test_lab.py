"""The lab: unit tests of its topology, and the whole lab end to end.

The end-to-end test builds 3 nodes x 2 pods with the real node agent and
the real `fan` plugin (`cni-fan lab up`), checks it (`cni-fan lab check`,
then explicit asserts of its own), and tears it down (`cni-fan lab down`),
always, even when an assert fails.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import netaddr
import pytest

from cni_fan.config import FanConfig
from cni_fan.lab import topology
from cni_fan.lab.topology import LabSpec, TopologyError
from harness.ping import ping_argv
from harness.labcli import lab as _lab


# -- topology (pure) ------------------------------------------------------------

def test_names_follow_the_prefix_and_stay_short() -> None:
    spec = LabSpec(prefix="tl0a1-", nodes=3, pods_per_node=2)
    assert spec.underlay_netns == "tl0a1-under"
    assert spec.ext_netns == "tl0a1-ext"
    assert [n.netns for n in spec.all_nodes] == ["tl0a1-n1", "tl0a1-n2", "tl0a1-n3"]
    assert [p.netns for p in spec.node(2).pods] == ["tl0a1-n2p1", "tl0a1-n2p2"]
    assert len(spec.namespaces()) == len(set(spec.namespaces())) == 2 + 3 + 6
    for name in (topology.UNDERLAY_BRIDGE, topology.NODE_UNDERLAY_IF, topology.EXT_IF, topology.POD_IF,
                 topology.EXT_PORT, *(n.port for n in LabSpec(nodes=topology.MAX_NODES).all_nodes)):
        assert 1 <= len(name) <= 15
    assert all(topology.lab_namespace_re("tl0a1-").match(n) for n in spec.namespaces())
    assert not topology.lab_namespace_re("tl0a1-").match("tl0a1-n1x")
    assert not topology.lab_namespace_re("tl0a1-").match("other-n1")
    assert topology.node_index_of("tl0a1-", "tl0a1-n12") == 12
    assert topology.node_index_of("tl0a1-", "tl0a1-n1p2") is None


def test_node_addresses_spread_over_several_slash24s() -> None:
    spec = LabSpec(nodes=5)
    nodes = spec.all_nodes
    assert [str(n.address) for n in nodes[:2]] == ["198.18.1.11", "198.18.2.12"]
    assert len({netaddr.IPNetwork(f"{n.address}/24").network for n in nodes}) == 5
    assert all(n.address in netaddr.IPNetwork(topology.UNDERLAY) for n in nodes)
    assert [str(n.slice) for n in nodes[:2]] == ["241.1.11.0/24", "241.2.12.0/24"]
    assert [str(n.gateway) for n in nodes[:2]] == ["241.1.11.1", "241.2.12.1"]
    assert len({n.slice for n in nodes}) == 5
    ext = netaddr.IPAddress(topology.EXT_ADDRESS)
    assert spec.ext_cidr == "198.18.200.1/16"
    assert ext not in spec.fan.overlay
    every = LabSpec(nodes=topology.MAX_NODES).all_nodes
    assert ext not in {n.address for n in every}
    assert netaddr.IPAddress(topology.PHANTOM_HOST) not in {n.address for n in every}


def test_conflists_parse_as_fan_configs() -> None:
    for encap, fanmap in (("ipip", "bpf"), ("vxlan", "routes"), ("vxlan", "bpf")):
        _check_conflists(LabSpec(prefix="tl0a1-", nodes=2, encap=encap, fanmap=fanmap, overlay="250.0.0.0/8"))


def _check_conflists(spec: LabSpec) -> None:
    for node in spec.all_nodes:
        conflist = spec.conflist(node)
        assert conflist["cniVersion"] == "1.0.0"
        assert conflist["cniVersions"] == ["1.0.0", "1.1.0"]
        assert conflist["name"] == "fan"
        assert [p["type"] for p in conflist["plugins"]] == ["fan"]
        json.loads(json.dumps(conflist))
        cfg = FanConfig.from_dict(topology.runtime_config(conflist))
        assert (cfg.encap, cfg.fanmap_mode, cfg.metrics_port) == (spec.encap, spec.fanmap, 9475)
        assert str(cfg.fanmap.overlay) == "250.0.0.0/8"
        assert cfg.fanmap.slice_for(node.address) == netaddr.IPNetwork(f"250.{node.index}.{10 + node.index}.0/24")
        assert cfg.params.data_dir == f"/run/cni-fan-lab/tl0a1-/n{node.index}/state"
        assert cfg.params.agent_socket == f"/run/cni-fan-lab/tl0a1-/n{node.index}/plugin.sock"
        assert node.conflist_path == f"/run/cni-fan-lab/tl0a1-/n{node.index}/10-fan.conflist"


def test_runtime_config_is_the_entry_plus_name_and_version() -> None:
    spec = LabSpec()
    conflist = spec.conflist(spec.node(1))
    rc = topology.runtime_config(conflist)
    assert rc == {**conflist["plugins"][0], "name": "fan", "cniVersion": "1.0.0"}
    assert "cniVersion" not in conflist["plugins"][0]  # the conflist is left alone
    env = topology.cni_env("ADD", spec.node(1).pods[0], spec.bin_dir)
    assert env == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "fanlab-n1p1", "CNI_NETNS": "/run/netns/fanlab-n1p1",
                   "CNI_IFNAME": "eth0", "CNI_PATH": "/run/cni-fan-lab/fanlab-/bin"}


def test_spec_round_trips_and_refuses_bad_input() -> None:
    spec = LabSpec(prefix="x-", nodes=4, pods_per_node=3, encap="ipip", fanmap="bpf")
    assert LabSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad in (dict(prefix=""), dict(prefix="-x"), dict(prefix="a/b"), dict(prefix="x" * 25),
                dict(nodes=0), dict(nodes=topology.MAX_NODES + 1), dict(nodes=True), dict(pods_per_node=-1),
                dict(encap="gre"), dict(fanmap="magic"), dict(overlay="241.0.0.0/16"),
                dict(overlay="198.0.0.0/8"), dict(underlay="10.0.0.0/16")):
        with pytest.raises(TopologyError):
            LabSpec(**bad)


def test_the_lab_refuses_what_the_fan_config_refuses() -> None:
    from cni_fan.cni.errors import CniError

    entry = {"name": "fan", "cniVersion": "1.0.0", "type": "fan", "overlay": "241.0.0.0/8",
             "underlay": "198.18.0.0/16"}
    for encap in topology.ENCAPS:
        for fanmap in topology.FANMAPS:
            try:
                FanConfig.from_dict({**entry, "encap": encap, "fanmap": fanmap})
                accepted = True
            except CniError:
                accepted = False
            if accepted:
                LabSpec(encap=encap, fanmap=fanmap)
            else:
                with pytest.raises(TopologyError, match="would be refused"):
                    LabSpec(encap=encap, fanmap=fanmap)


def test_cli_refuses_bad_input_with_exit_2(capsys) -> None:
    from cni_fan.cli import build_parser

    for argv in (["lab", "up", "--nodes", "0"], ["lab", "up", "--prefix", "bad/prefix"],
                 ["lab", "check", "--prefix=-x"], ["lab", "down", "--prefix", ""]):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("cni-fan lab: ") and "\n" not in err.rstrip("\n")


# -- the whole lab, end to end -----------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
s.settimeout(20)
data, peer = s.recvfrom(2048)
s.sendto(peer[0].encode(), peer)
print(data.decode(), peer[0], flush=True)
"""

UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(20):
    s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(2048).decode())
        break
    except socket.timeout:
        pass
"""


def _in(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def _pings(ns: str, address: str) -> bool:
    # Up to 5 s, a request every 0.2 s, done at the first reply (the first may wait for ARP).
    return _in(ns, *ping_argv(address, wait=None, interval=0.2, deadline=5)).returncode == 0


def _json_first(ns: str, *argv: str, tool: str = "ip") -> list[dict]:
    """`ip -j` output; the first of duplicate keys wins (`dst` of an `encap ip` route)."""
    out = subprocess.run([tool, "-j", "-n", ns, *argv], capture_output=True, text=True, check=True).stdout
    keep_first = lambda pairs: {k: v for k, v in reversed(pairs)}  # noqa: E731
    return json.loads(out, object_pairs_hook=keep_first) if out.strip() else []


def _lab_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


@pytest.mark.kernel
@needs_root
def test_lab_end_to_end(request) -> None:
    prefix = f"tl{secrets.token_hex(2)}-"
    root = Path(topology.LAB_ROOT) / prefix
    request.addfinalizer(lambda: _lab("down", "--prefix", prefix))
    spec = LabSpec(prefix=prefix, nodes=3, pods_per_node=2)

    _lab("up", "--nodes", "3", "--pods-per-node", "2", "--prefix", prefix, check=True)
    again = _lab("up", "--nodes", "1", "--pods-per-node", "1", "--prefix", prefix)
    assert again.returncode == 1 and "already exists" in again.stderr

    checked = _lab("check", "--prefix", prefix, "--json")
    report = json.loads(checked.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert report["ok"] and all(report["checks"].values())

    # Explicit checks, with other tools than `lab check` uses.
    state = json.loads((root / "lab.json").read_text())
    nodes = spec.all_nodes
    pods = {p.netns: state["pods"][p.netns] for p in spec.all_pods}
    for name, pod in pods.items():
        node = spec.node(int(pod["node"][1:]))
        assert netaddr.IPAddress(pod["address"]) in node.slice
        assert netaddr.IPAddress(pod["address"]) != node.gateway
    n1p1, n2p1, n3p2 = (pods[f"{prefix}n1p1"], pods[f"{prefix}n2p1"], pods[f"{prefix}n3p2"])
    # pod <-> pod across nodes
    assert _pings(n1p1["netns"], n2p1["address"]) and _pings(n2p1["netns"], n1p1["address"])
    assert _pings(n3p2["netns"], n1p1["address"])
    # node -> remote pod; pod -> its node and a remote node's gateway
    assert _pings(nodes[0].netns, n3p2["address"]) and _pings(nodes[2].netns, n2p1["address"])
    assert _pings(n1p1["netns"], str(nodes[0].gateway)) and _pings(n1p1["netns"], str(nodes[1].gateway))
    # pod -> ext, and ext sees the node's underlay address (the masquerade)
    for pod in (n1p1, n3p2):
        assert _pings(pod["netns"], topology.EXT_ADDRESS)
        server = subprocess.Popen(["ip", "netns", "exec", spec.ext_netns, sys.executable, "-c", UDP_SERVER,
                                   topology.EXT_ADDRESS], stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            client = _in(pod["netns"], sys.executable, "-c", UDP_CLIENT, topology.EXT_ADDRESS, port)
            seen = server.stdout.readline().split()
        finally:
            server.kill()
            server.wait()
        node = spec.node(int(pod["node"][1:]))
        assert seen == ["hello", str(node.address)]
        assert client.stdout.strip() == str(node.address)
    # ext is outside the overlay: it has no route into it
    assert not [r for r in _json_first(spec.ext_netns, "-4", "route", "show")
                if r["dst"] != "default" and netaddr.IPNetwork(r["dst"]) in spec.fan.overlay]
    # No per-peer state on any node.
    for node in nodes:
        remotes = [n for n in nodes if n.index != node.index]
        for route in _json_first(node.netns, "-4", "route", "show", "table", "all"):
            if route["dst"] in ("default",):
                continue
            dst = netaddr.IPNetwork(route["dst"])
            assert not any(dst.prefixlen >= r.slice.prefixlen and dst in r.slice for r in remotes), route
            assert route.get("gateway") not in {str(r.address) for r in remotes}, route
        for neigh in _json_first(node.netns, "neigh", "show", "nud", "all"):
            if neigh["dev"] == topology.NODE_UNDERLAY_IF or ":" in neigh["dst"]:
                continue
            dst = netaddr.IPAddress(neigh["dst"])
            assert not any(dst == r.address or dst in r.slice for r in remotes), neigh
        for fdb in _json_first(node.netns, "fdb", "show", tool="bridge"):
            assert fdb.get("dst") not in {str(r.address) for r in remotes}, fdb
        assert report["peer_state"][node.short]["ok"]

    down = _lab("down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert _lab_namespaces(prefix) == []
    assert not root.exists()
    assert _lab("down", "--prefix", prefix).returncode == 0  # already gone: still fine


@pytest.mark.kernel
@needs_root
def test_dual_stack_lab_end_to_end(request) -> None:
    """`lab up --overlay6`: every pod has an address of each family, `lab
    check` passes both (pings, NAT66 to ext, per-peer state), and other
    tools agree: ping over IPv6, ext sees the node's IPv6 address, no node
    routes a remote IPv6 slice, and a node's IPv6 routes are as many in a
    3-node lab as in a 1-node one."""
    prefix, small = f"tl{secrets.token_hex(2)}-", f"tl{secrets.token_hex(2)}-"
    request.addfinalizer(lambda: _lab("down", "--prefix", prefix))
    request.addfinalizer(lambda: _lab("down", "--prefix", small))
    overlay6 = "fd00:50::/48"
    spec = LabSpec(prefix=prefix, nodes=3, pods_per_node=2, overlay6=overlay6)
    _lab("up", "--nodes", "3", "--pods-per-node", "2", "--prefix", prefix, "--overlay6", overlay6, check=True)
    state = json.loads((Path(topology.LAB_ROOT) / prefix / "lab.json").read_text())
    assert state["spec"]["overlay6"] == overlay6
    pods = {p.netns: state["pods"][p.netns] for p in spec.all_pods}
    without = [f"{name}: {pod['cidr']}" for name, pod in pods.items() if not pod.get("address6")]
    if without:
        pytest.skip(f"pods have no IPv6 address: plugin without dual-stack (ADD with overlay6 gave only "
                    f"{', '.join(without[:2])}{' ...' if len(without) > 2 else ''})")
    for node in spec.all_nodes:
        if not any(r["dst"] == overlay6 for r in _json_first(node.netns, "-6", "route", "show", "table", "all")):
            pytest.skip(f"nodes have no IPv6 overlay route: node agent without dual-stack (the agent on "
                        f"{node.netns} installed no route for {overlay6})")

    checked = _lab("check", "--prefix", prefix, "--json")
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], checked.stdout[-6000:] + checked.stderr
    assert {"pings", "pings6", "nat", "nat6", "no_per_peer_state"} <= set(report["checks"])
    assert len(report["matrix6"]) == 3 * 2 + 3 and all(
        v in ("ok", "self") for row in report["matrix6"].values() for v in row.values())

    nodes = spec.all_nodes
    for name, pod in pods.items():
        node = spec.node(int(pod["node"][1:]))
        assert netaddr.IPAddress(pod["address6"]) in node.slice6 and pod["address6"] != str(node.gateway6)
        # the same container index in both families
        assert int(netaddr.IPAddress(pod["address6"])) - int(node.slice6.network) == \
            int(netaddr.IPAddress(pod["address"])) - int(node.slice.network)
    n1p1, n2p1, n3p2 = (pods[f"{prefix}n1p1"], pods[f"{prefix}n2p1"], pods[f"{prefix}n3p2"])
    assert _pings(n1p1["netns"], n2p1["address6"]) and _pings(n3p2["netns"], n1p1["address6"])
    assert _pings(nodes[0].netns, n3p2["address6"]) and _pings(n1p1["netns"], str(nodes[1].gateway6))
    for pod in (n1p1, n3p2):  # NAT66: ext sees the node's IPv6 underlay address
        node = spec.node(int(pod["node"][1:]))
        server = subprocess.Popen(["ip", "netns", "exec", spec.ext_netns, sys.executable, "-c",
                                   UDP_SERVER.replace("AF_INET", "AF_INET6"), topology.EXT_ADDRESS6],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            _in(pod["netns"], sys.executable, "-c", UDP_CLIENT.replace("AF_INET", "AF_INET6"),
                topology.EXT_ADDRESS6, port)
            seen = server.stdout.readline().split()
        finally:
            server.kill()
            server.wait()
        assert seen == ["hello", str(node.address6)]
    assert not [r for r in _json_first(spec.ext_netns, "-6", "route", "show")
                if r["dst"] != "default" and netaddr.IPNetwork(r["dst"]) in spec.fan6.overlay]
    routes6 = {}
    for node in nodes:
        remotes = [n for n in nodes if n.index != node.index]
        routes = _json_first(node.netns, "-6", "route", "show", "table", "all")
        routes6[node.index] = len(_global(routes))
        for route in routes:
            if route["dst"] in ("default",):
                continue
            dst = netaddr.IPNetwork(route["dst"])
            assert not any(dst.prefixlen >= r.slice6.prefixlen and dst in r.slice6 for r in remotes), route
        assert report["peer_state"][node.short]["ok"]
    assert len(set(routes6.values())) == 1, routes6

    _lab("up", "--nodes", "1", "--pods-per-node", "2", "--prefix", small, "--overlay6", overlay6, check=True)
    alone = _json_first(LabSpec(prefix=small, nodes=1, overlay6=overlay6).node(1).netns,
                        "-6", "route", "show", "table", "all")
    assert len(_global(alone)) == routes6[1], "a node's IPv6 routes grew with the number of nodes"


def _global(routes: list[dict]) -> list[dict]:
    """Routes but the link-local and multicast ones (the kernel adds those as
    link-local addresses come up, at its own pace: they name no peer)."""
    return [r for r in routes if not r["dst"].lower().startswith(("fe80:", "ff"))]


# -- a dual-stack lab's topology and CLI (pure) ----------------------------------------

def test_dual_stack_spec_conflist_and_refusals() -> None:
    spec = LabSpec(prefix="tl0a1-", nodes=2, overlay6="fd00:50::/48")
    assert LabSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert LabSpec.from_dict({k: v for k, v in LabSpec().to_dict().items() if k != "overlay6"}).overlay6 is None
    for node in spec.all_nodes:
        cfg = FanConfig.from_dict(topology.runtime_config(spec.conflist(node)))
        assert str(cfg.params.fanmap6.overlay) == "fd00:50::/48"
        assert cfg.params.fanmap6.slice_for(node.address) == node.slice6
        assert node.gateway6 == node.slice6.network + 1 and node.address6 in netaddr.IPNetwork(topology.UNDERLAY6)
    assert "overlay6" not in LabSpec().conflist(LabSpec().node(1))["plugins"][0]
    assert LabSpec().node(1).address6 is None
    for bad, why in (("fd00:198::/32", "overlaps"), ("241.0.0.0/8", "IPv6 prefix"), ("fd00:50::/120", "slices"),
                     ("ff00::/8", "multicast"), ("bogus", "overlay6")):
        with pytest.raises(TopologyError, match=why):
            LabSpec(overlay6=bad)
    with pytest.raises(TopologyError, match="vxlan"):
        LabSpec(overlay6="fd00:50::/48", encap="ipip")


def test_the_cli_has_overlay6(capsys) -> None:
    """(--ipv6-only: tests/test_lab_ipv6_only.py.)"""
    from cni_fan.cli import build_parser

    args = build_parser().parse_args(["lab", "up", "--overlay6", "fd00:50::/48"])
    assert args.overlay6 == "fd00:50::/48"
    assert build_parser().parse_args(["lab", "up"]).overlay6 is None
    args = build_parser().parse_args(["lab", "up", "--overlay6", "fd00:198::/32"])
    assert args.func(args) == 2
    assert "overlaps" in capsys.readouterr().err
