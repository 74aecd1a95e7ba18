"""`cni-fan lab up --ipv6-only`: an IPv6-only lab (an IPv6 underlay, `overlay6` alone) and its `lab check`.

The topology and the CLI are pure; the end-to-end test builds a lab with
the worktree's `cni-fan`, checks that `lab check` passes on IPv6 alone
(pings, NAT66 to ext, per-peer state), that nothing has an IPv4 address,
that the audit still catches a per-peer route, and that `lab down` leaves
nothing.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import netaddr
import pytest

from harness.labcli import lab as _lab

from cni_fan.config import FanConfig
from cni_fan.lab import topology
from cni_fan.lab.topology import LabSpec, TopologyError



def test_spec_nodes_and_conflists_are_ipv6_only() -> None:
    spec = LabSpec(prefix="tl6o-", nodes=3, ipv6_only=True, overlay6=topology.DEFAULT_OVERLAY6_ONLY)
    assert LabSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert not spec.dual_stack and spec.has_ipv6 and not spec.has_ipv4
    for node in spec.all_nodes:
        entry = spec.conflist(node)["plugins"][0]
        assert "overlay" not in entry and entry["underlay"] == topology.UNDERLAY6_ONLY
        cfg = FanConfig.from_dict(topology.runtime_config(spec.conflist(node)))
        assert cfg.params.ipv6_only and cfg.params.fanmap6.slice_for(node.address) == node.slice
        assert node.address.version == 6 and node.address in netaddr.IPNetwork(topology.UNDERLAY6_ONLY)
        assert (node.address6, node.slice6, node.gateway6) == (node.address, node.slice, node.gateway)
    assert str(spec.node(1).slice) == "fd00:50:1:b::/64"
    assert netaddr.IPAddress(topology.EXT_ADDRESS6) in netaddr.IPNetwork(topology.UNDERLAY6_ONLY)
    assert all(netaddr.IPAddress(topology.PHANTOM_HOST6) != n.address for n in spec.all_nodes)


def test_what_an_ipv6_only_cluster_cannot_do_is_refused() -> None:
    with pytest.raises(TopologyError, match="needs overlay6"):
        LabSpec(ipv6_only=True)
    for extra, why in (({"encap": "ipip"}, "vxlan"), ({"fanmap": "routes"}, "IPv6 underlay"),
                       ({"overlay6": "fd00:50::/100"}, "slices")):
        with pytest.raises(TopologyError, match=why):
            LabSpec(**{"ipv6_only": True, "overlay6": topology.DEFAULT_OVERLAY6_ONLY, **extra})


def test_the_cli_takes_ipv6_only_with_a_default_overlay6(capsys) -> None:
    from cni_fan.cli import build_parser

    args = build_parser().parse_args(["lab", "up", "--ipv6-only"])
    assert args.ipv6_only and args.overlay6 is None  # the command fills in DEFAULT_OVERLAY6_ONLY
    args = build_parser().parse_args(["lab", "up", "--ipv6-only", "--encap", "ipip"])
    assert args.func(args) == 2
    assert "vxlan" in capsys.readouterr().err


# -- end to end (kernel) ---------------------------------------------------------------------


def _ip(ns: str, *argv: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", "-n", ns, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_ipv6_only_lab_end_to_end(request) -> None:
    prefix = f"tl{secrets.token_hex(2)}-"
    request.addfinalizer(lambda: _lab("down", "--prefix", prefix))
    _lab("up", "--ipv6-only", "--nodes", "3", "--pods-per-node", "2", "--prefix", prefix, check=True)
    spec = LabSpec.from_dict(json.loads((Path(topology.LAB_ROOT) / prefix / "lab.json").read_text())["spec"])
    assert spec.ipv6_only

    checked = _lab("check", "--prefix", prefix, "--json")
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], checked.stdout[-6000:] + checked.stderr
    assert set(report["checks"]) == {"agents", "pings6", "nat6", "no_per_peer_state", "paths"}
    # Every pod pair across nodes seen on the wire, in VXLAN over IPv6 (no direct routing here).
    assert len(report["paths6"]) == 6 * 4 and not report["paths"]
    assert all(p["seen"] == ["encapsulated"] for p in report["paths6"].values())
    assert all(cell in ("ok", "self") for row in report["matrix6"].values() for cell in row.values())
    assert len(report["matrix6"]) == 3 * 2 + 3
    for namespace in [n.netns for n in spec.all_nodes] + [p.netns for p in spec.all_pods] + [spec.ext_netns]:
        four = [a["local"] for link in _ip(namespace, "-4", "addr", "show") for a in link.get("addr_info", [])
                if a.get("scope") != "host"]
        assert four == [], f"{namespace} has IPv4 addresses {four}"

    # The audit still sees per-peer state in an IPv6-only lab.
    node1, node2 = spec.node(1), spec.node(2)
    subprocess.run(["ip", "-n", node1.netns, "-6", "route", "add", str(node2.slice), "dev", "fan-vxlan"], check=True)
    checked = _lab("check", "--prefix", prefix, "--json")
    report = json.loads(checked.stdout)
    assert checked.returncode != 0 and not report["checks"]["no_per_peer_state"]
    assert any(str(node2.slice) in e for e in report["peer_state"]["n1"]["counted"]["routes6"])

    _lab("down", "--prefix", prefix, check=True)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in out.splitlines() if line.startswith(prefix)]
    assert not (Path(topology.LAB_ROOT) / prefix).exists()
