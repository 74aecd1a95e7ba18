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
from pathlib import Path

import netaddr
import pytest

from cni_fan.config import FanConfig
from cni_fan.lab import topology
from cni_fan.lab.topology import LabSpec, TopologyError

REPO = Path(__file__).resolve().parent.parent
CNI_FAN = REPO / ".venv" / "bin" / "cni-fan"

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
    spec = LabSpec(prefix="tl0a1-", nodes=2, encap="ipip", fanmap="routes", overlay="250.0.0.0/8")
    for node in spec.all_nodes:
        conflist = spec.conflist(node)
        assert conflist["cniVersion"] == "1.0.0"
        assert conflist["cniVersions"] == ["1.0.0", "1.1.0"]
        assert conflist["name"] == "fan"
        assert [p["type"] for p in conflist["plugins"]] == ["fan"]
        json.loads(json.dumps(conflist))
        cfg = FanConfig.from_dict(topology.runtime_config(conflist))
        assert cfg.encap == "ipip" and cfg.fanmap_mode == "routes" and cfg.metrics_port == 9475
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
    spec = LabSpec(prefix="x-", nodes=4, pods_per_node=3, encap="ipip", fanmap="routes")
    assert LabSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad in (dict(prefix=""), dict(prefix="-x"), dict(prefix="a/b"), dict(prefix="x" * 25),
                dict(nodes=0), dict(nodes=topology.MAX_NODES + 1), dict(nodes=True), dict(pods_per_node=-1),
                dict(encap="gre"), dict(fanmap="magic"), dict(overlay="241.0.0.0/16"),
                dict(overlay="198.0.0.0/8"), dict(underlay="10.0.0.0/16")):
        with pytest.raises(TopologyError):
            LabSpec(**bad)
