"""`fan-ipam` on an IPv6-only node (an IPv6 underlay), as the IPAM of the reference `bridge` plugin, through cnitool.

The node's only underlay address is IPv6 (`fd00:198:18::a/112`): fan-ipam
hands out an address of its IPv6 slice with an IPv6 default route and
nothing of IPv4, records it under the IPv6 address, checks it on CHECK and
releases it on DEL, in every CNI version that carries IPv6.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from harness.ipv6only import GATEWAY6 as GATEWAY, OVERLAY6, SLICE6 as SLICE, UNDERLAY6, held6
from harness.netlab import Netns, cnitool, cnitool_container_id, conflist, write_conflist
from harness.ping import ping_argv

pytestmark = pytest.mark.kernel

NET = "fan6br"
BRIDGE = "fan6br0"


def held(data: Path) -> dict[str, str]:
    return held6(data, NET)


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_bridge_with_fan_ipam_on_an_ipv6_only_node(version: str, node6: Netns, pods, tmp_path: Path) -> None:
    data, conf_dir = tmp_path / "data", tmp_path / "net.d"
    ipam = {"type": "fan-ipam", "overlay6": OVERLAY6, "underlay": UNDERLAY6,
            "dataDir": str(data), "agentSocket": str(tmp_path / "no-agent.sock")}
    write_conflist(conf_dir, conflist(NET, version, {"type": "bridge", "bridge": BRIDGE, "isGateway": True,
                                                     "ipam": ipam}))
    pod1, pod2 = pods.new(), pods.new()
    addresses = []
    for pod in (pod1, pod2):
        out = cnitool(node6, "add", NET, pod.path, conf_dir)
        assert out.code == 0, str(out)
        (ip,) = out.json["ips"]
        address = IPNetwork(ip["address"])
        assert address.prefixlen == 64 and address.ip in SLICE and address.ip != IPAddress(GATEWAY)
        assert ip["gateway"] == GATEWAY
        assert [r["dst"] for r in out.json["routes"]] == ["::/0"]
        assert pod.ipv4_addrs("eth0") == set()
        assert held(data)[str(address.ip)] == cnitool_container_id(pod.path)
        addresses.append(str(address.ip))
    assert len(set(addresses)) == 2
    proc = pod1.run(*ping_argv(addresses[1], count=1, deadline=10, interval=0.2), check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    if version != "0.3.1":  # CHECK is from 0.4.0
        for pod in (pod1, pod2):
            out = cnitool(node6, "check", NET, pod.path, conf_dir)
            assert out.code == 0, str(out)
        (data / "networks" / NET / addresses[1]).unlink()  # fan-ipam's CHECK really looks at its record
        out = cnitool(node6, "check", NET, pod2.path, conf_dir)
        assert out.code != 0 and "no address is reserved" in out.stderr, str(out)

    for pod in (pod1, pod2):
        out = cnitool(node6, "del", NET, pod.path, conf_dir)
        assert out.code == 0, str(out)
    assert held(data) == {}
