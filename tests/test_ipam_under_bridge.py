"""`fan-ipam` as the IPAM of the reference `bridge` plugin, through cnitool.

The bridge plugin wires the pod; fan-ipam hands out an address of this
node's slice and the routes, keeps the record, checks it on CHECK and
releases it on DEL. Both modes (local and plugin server).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from harness.netlab import (Mode, Netns, Shim, assert_ran_in, cnitool, cnitool_container_id, conflist,
                            libcni_cache_entries, write_conflist)
from harness.state import records

pytestmark = pytest.mark.kernel

NET = "fanbr"
BRIDGE = "fanbr0"
SLICE = IPNetwork("242.1.10.0/24")  # 198.18.1.10 in 198.18.0.0/16 -> 242.0.0.0/8
GATEWAY = "242.1.10.1"


def bridge_conflist(version: str, data: Path, socket: str) -> dict:
    ipam = {"type": "fan-ipam", "overlay": "242.0.0.0/8", "underlay": "198.18.0.0/16",
            "dataDir": str(data), "agentSocket": socket}
    return conflist(NET, version, {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipam": ipam})


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_bridge_with_fan_ipam(version: str, fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    node, data, conf_dir = fan_node, tmp_path / "data", tmp_path / "net.d"
    write_conflist(conf_dir, bridge_conflist(version, data, plugin_mode.socket))
    shim = Shim(tmp_path / "shim", plugins=("fan-ipam",))
    pod1, pod2 = pods.new(), pods.new()

    addresses = {}
    for pod in (pod1, pod2):
        out = cnitool(node, "add", NET, pod.path, conf_dir, path=shim.path)
        assert out.code == 0, str(out)
        assert_ran_in(plugin_mode, out, shim.pids())
        result = out.json
        assert result["cniVersion"] == version
        (ip,) = result["ips"]
        address = IPNetwork(ip["address"])
        assert address.prefixlen == SLICE.prefixlen and address.ip in SLICE
        assert address.ip not in (SLICE.network, SLICE.broadcast, IPAddress(GATEWAY))
        assert ip["gateway"] == GATEWAY
        assert pod.ipv4_addrs("eth0") == {ip["address"]}
        assert pod.default_gateway("eth0") == GATEWAY  # fan-ipam's route, installed by bridge
        held = records(data, NET)
        assert held[str(address.ip)]["containerID"] == cnitool_container_id(pod.path)
        addresses[pod.name] = str(address.ip)
    assert len(set(addresses.values())) == 2
    assert f"{GATEWAY}/24" in node.ipv4_addrs(BRIDGE)
    assert len(node.ports_of(BRIDGE)) == 2

    assert pod1.ping(GATEWAY), "pod cannot reach the bridge gateway"
    assert pod1.ping(addresses[pod2.name])

    for pod in (pod1, pod2):
        out = cnitool(node, "check", NET, pod.path, conf_dir)
        assert out.code == 0, str(out)

    # fan-ipam's CHECK really looks at its reservation.
    (data / "networks" / NET / addresses[pod2.name]).unlink()
    out = cnitool(node, "check", NET, pod2.path, conf_dir)
    assert out.code != 0 and "no address is reserved" in out.stderr, str(out)

    for pod in (pod1, pod2):
        out = cnitool(node, "del", NET, pod.path, conf_dir, path=shim.path)
        assert out.code == 0, str(out)
        assert pod.link("eth0") is None
        assert not libcni_cache_entries(cnitool_container_id(pod.path))
    assert records(data, NET) == {}
    assert node.ports_of(BRIDGE) == set()
    out = cnitool(node, "del", NET, pod1.path, conf_dir)
    assert out.code == 0, str(out)


def test_bridge_with_dual_stack_fan_ipam(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    """With `overlay6` the reference bridge gets both addresses and both default routes from fan-ipam."""
    node, data, conf_dir = fan_node, tmp_path / "data", tmp_path / "net.d"
    conf = bridge_conflist("1.0.0", data, plugin_mode.socket)
    conf["plugins"][0]["ipam"]["overlay6"] = "fd00:242::/48"
    write_conflist(conf_dir, conf)
    pod1, pod2 = pods.new(), pods.new()
    sixes = []
    for pod in (pod1, pod2):
        out = cnitool(node, "add", NET, pod.path, conf_dir)
        assert out.code == 0, str(out)
        v4, v6 = (ip["address"] for ip in out.json["ips"])
        assert IPNetwork(v4).ip in SLICE and IPNetwork(v6).ip in IPNetwork("fd00:242:0:10a::/64")
        assert int(IPNetwork(v6).ip) & 0xFF == int(IPNetwork(v4).ip) & 0xFF, "not the same container index"
        assert {"dst": "::/0", "gw": "fd00:242:0:10a::1"} in out.json["routes"]
        sixes.append(IPNetwork(v6).ip)
    # bridge waits for DAD on the pod side itself; the IPv6 path then works.
    assert pod1.ping(str(sixes[1]), count=1) or pod1.ping(str(sixes[1]), count=3)
    for pod in (pod1, pod2):
        assert cnitool(node, "check", NET, pod.path, conf_dir).code == 0
        assert cnitool(node, "del", NET, pod.path, conf_dir).code == 0
    assert records(data, NET) == {}
