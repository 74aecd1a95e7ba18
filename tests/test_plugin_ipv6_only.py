"""`fan` on an IPv6-only node (an IPv6 underlay): pods get one IPv6 address and nothing of IPv4.

Through the real cnitool for every CNI version that carries IPv6 (1.1.0 run
directly), in-process and served: ADD returns only the IPv6 address of the
node's IPv6 slice with an IPv6 default route, usable at once (no DAD);
the port guard's IPv6 part is in place and its program drops IPv4 and ARP;
pods reach their gateway and each other; CHECK passes and catches a lost
record; a static IPv4 address is refused; DEL and GC leave nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from netaddr import IPNetwork

from cni_fan.cni.errors import CHECK_FAILED, INVALID_ENVIRONMENT
from cni_fan.net import portguard
from harness.ipv6only import GATEWAY6, OVERLAY6, SLICE6, UNDERLAY6, global_ipv6, held6
from harness.netlab import ALL_VERSIONS, Mode, Netns, cni_env, netconf, run_plugin, serving
from harness.ping import ping_argv
from harness.runtime import Runtime

pytestmark = pytest.mark.kernel

NET = "fan6net"
BRIDGE = "fan6-500000000a"


@pytest.fixture(scope="module", params=["local", "server"])
def mode6(request, node6: Netns, tmp_path_factory) -> Iterator[Mode]:
    with serving(request.param, node6, tmp_path_factory.mktemp(f"mode6-{request.param}")) as mode:
        yield mode


def conf6(data: Path, mode: Mode) -> dict:
    return {"type": "fan", "overlay6": OVERLAY6, "underlay": UNDERLAY6, "dataDir": str(data),
            "agentSocket": mode.socket}


def held(data: Path) -> dict[str, str]:
    return held6(data, NET)


def reaches(pod: Netns, dst: str) -> bool:
    return pod.run(*ping_argv(dst, count=1, deadline=5, interval=0.2), check=False, timeout=30).returncode == 0


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_ipv6_only_add_check_del(version: str, node6: Netns, mode6: Mode, pods, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rt = Runtime(node6, version, conf6(data, mode6), tmp_path, network=NET)
    pod1, pod2 = pods.new(), pods.new()
    results, addresses = {}, {}
    for pod in (pod1, pod2):
        out = rt.call("add", pod)
        assert out.code == 0, str(out)
        result = results[pod.name] = rt.raw_add_output(out)
        (ip,) = result["ips"]
        address = IPNetwork(ip["address"])
        assert address.ip in SLICE6 and address.prefixlen == 64 and ip["gateway"] == GATEWAY6
        assert ip.get("version", "6") == "6"
        assert result["routes"] == [{"dst": "::/0", "gw": GATEWAY6}]
        assert pod.ipv4_addrs("eth0") == set()
        flags = global_ipv6(pod, "eth0")
        assert list(flags) == [str(address)] and "tentative" not in flags[str(address)], flags
        addresses[pod.name] = str(address.ip)
    assert held(data) == {addresses[p.name]: rt.container_id(p) for p in (pod1, pod2)}
    veth_alias = next(link.get("ifalias") for link in node6.ip_json("link", "show", "master", BRIDGE))
    assert portguard.parse_alias(veth_alias)[0] is None and portguard.alias_ip6(veth_alias) in addresses.values()
    assert reaches(pod1, GATEWAY6), "pod cannot reach its gateway"
    assert reaches(pod1, addresses[pod2.name]) and reaches(pod2, addresses[pod1.name])

    if version >= "0.4.0":
        for pod in (pod1, pod2):
            out = rt.call("check", pod, prev=results[pod.name])
            assert out.code == 0, str(out)
        wrong = dict(results[pod1.name], ips=[dict(results[pod1.name]["ips"][0],
                                                    address=addresses[pod2.name] + "/64")])
        out = run_plugin(node6, cni_env("CHECK", rt.container_id(pod1), pod1.path), dict(rt.netconf, prevResult=wrong))
        assert out.code != 0 and out.json["code"] == CHECK_FAILED, str(out)

    for pod in (pod1, pod2):
        out = rt.call("del", pod, prev=results[pod.name])
        assert out.code == 0, str(out)
        node6.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
        assert pod.link("eth0") is None
    assert held(data) == {}
    assert node6.ports_of(BRIDGE) == set()


def test_a_static_ipv4_address_is_refused_and_changes_nothing(node6: Netns, mode6: Mode, pods,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = dict(netconf(NET, "1.1.0", conf6(data, mode6)), runtimeConfig={"ips": ["250.0.10.7"]},
                capabilities={"ips": True})
    pod = pods.new()
    out = run_plugin(node6, cni_env("ADD", "static4", pod.path), conf)
    assert out.code != 0 and out.json["code"] == INVALID_ENVIRONMENT and "IPv6-only" in out.json["msg"], str(out)
    assert pod.link("eth0") is None and held(data) == {}


def test_gc_releases_what_the_runtime_no_longer_knows(node6: Netns, mode6: Mode, pods, tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = netconf(NET, "1.1.0", conf6(data, mode6))
    pod = pods.new()
    assert run_plugin(node6, cni_env("ADD", "gone", pod.path), conf).code == 0
    assert list(held(data).values()) == ["gone"]
    out = run_plugin(node6, cni_env("GC", "", ""), dict(conf, **{"cni.dev/valid-attachments": []}))
    assert out.code == 0, str(out)
    assert held(data) == {} and node6.ports_of(BRIDGE) == set()
