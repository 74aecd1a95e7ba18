"""`fan` with `overlay6`: every pod gets an IPv4 and an IPv6 address (issue 11).

Through the real cnitool for every CNI version that carries IPv6 (all we
answer: 0.3.0 onwards; 1.1.0 run directly), in-process and served: ADD
returns IPv4 first, then IPv6 at the same container index, a default
route per family; the pod's IPv6 address is usable at once (no DAD:
never "tentative"); pods reach their gateway and each other over IPv6;
CHECK passes and catches a wrong IPv6 address; DEL leaves nothing.
Static addresses: one per family, and they must pair.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from cni_fan.cni.errors import ADDRESS_UNAVAILABLE, CHECK_FAILED, INVALID_ENVIRONMENT
from harness.netlab import (ALL_VERSIONS, Mode, Netns, assert_ran_in, cni_env, fan_plugin_conf, netconf,
                            run_plugin)
from harness.ipv6only import global_ipv6
from harness.runtime import Runtime
from harness.state import records

pytestmark = pytest.mark.kernel

NET = "fannet"
OVERLAY6 = "fd00:241::/48"
SLICE4 = IPNetwork("241.1.10.0/24")        # 198.18.1.10 in 198.18.0.0/16 -> 241.0.0.0/8
SLICE6 = IPNetwork("fd00:241:0:10a::/64")  # the same host bits (0x010a) under fd00:241::/48
GATEWAY4, GATEWAY6 = "241.1.10.1", "fd00:241:0:10a::1"
BRIDGE = "fan-241-1-10"


def dual_conf(data: Path, mode: Mode, **extra) -> dict:
    # The port guard on (its defaults), so the pods' IPv6 runs through its IPv6 part.
    return fan_plugin_conf(data, mode.socket, overlay6=OVERLAY6, **extra)


def ipv6_default_gateway(ns: Netns, ifname: str = "eth0") -> str | None:
    for r in ns.ip_json("-6", "route", "show", "default"):
        if r.get("dev") == ifname:
            return r.get("gateway")
    return None


def assert_dual_stack_result(result: dict, version: str) -> tuple[str, str]:
    ips = result["ips"]
    assert [IPNetwork(ip["address"]).version for ip in ips] == [4, 6], "IPv4 first, then IPv6"
    if version < "1.0.0":
        assert [ip["version"] for ip in ips] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in ips)
    v4, v6 = (IPNetwork(ip["address"]) for ip in ips)
    assert v4.ip in SLICE4 and v4.prefixlen == 24 and v6.ip in SLICE6 and v6.prefixlen == 64
    assert int(v6.ip) - SLICE6.first == int(v4.ip) - SLICE4.first, "not the same container index"
    assert [ip["gateway"] for ip in ips] == [GATEWAY4, GATEWAY6]
    assert all(result["interfaces"][ip["interface"]].get("sandbox") for ip in ips)
    assert {"dst": "0.0.0.0/0", "gw": GATEWAY4} in result["routes"]
    assert {"dst": "::/0", "gw": GATEWAY6} in result["routes"]
    return str(v4), str(v6)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_dual_stack_add_check_del(version: str, fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    node, data = fan_node, tmp_path / "data"
    rt = Runtime(node, version, dual_conf(data, plugin_mode), tmp_path, network=NET)
    pod1, pod2 = pods.new(), pods.new()
    results, v6 = {}, {}
    for pod in (pod1, pod2):
        out = rt.call("add", pod)
        assert out.code == 0, str(out)
        assert_ran_in(plugin_mode, out, rt.launched)
        results[pod.name] = rt.raw_add_output(out)
        v4cidr, v6cidr = assert_dual_stack_result(results[pod.name], version)
        assert pod.ipv4_addrs("eth0") == {v4cidr}
        flags = global_ipv6(pod, "eth0")
        assert list(flags) == [v6cidr], flags
        assert "tentative" not in flags[v6cidr], "the pod's IPv6 address waits for DAD"
        assert ipv6_default_gateway(pod) == GATEWAY6
        v6[pod.name] = v6cidr.split("/")[0]
    assert GATEWAY6 + "/64" in global_ipv6(node, BRIDGE)
    assert pod1.ping(GATEWAY6), "pod cannot reach its IPv6 gateway"
    assert pod1.ping(v6[pod2.name]) and pod2.ping(v6[pod1.name]), "pods on one node cannot reach each other over IPv6"
    assert pod1.ping(GATEWAY4), "IPv4 broke"

    if version >= "0.4.0":
        for pod in (pod1, pod2):
            out = rt.call("check", pod, prev=results[pod.name])
            assert out.code == 0, str(out)
        # A prevResult whose IPv6 address is not the partner of the reserved IPv4 one fails CHECK.
        wrong = dict(results[pod1.name], ips=[results[pod1.name]["ips"][0],
                                               dict(results[pod1.name]["ips"][1], address=v6[pod2.name] + "/64")])
        conf = dict(rt.netconf, prevResult=wrong)
        out = run_plugin(node, cni_env("CHECK", rt.container_id(pod1), pod1.path), conf)
        assert out.code != 0 and out.json["code"] == CHECK_FAILED and v6[pod2.name] in out.json["msg"], str(out)

    for pod in (pod1, pod2):
        out = rt.call("del", pod, prev=results[pod.name])
        assert out.code == 0, str(out)
        node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
        assert pod.link("eth0") is None
    assert records(data, NET) == {}
    assert node.ports_of(BRIDGE) == set()


def _add(node: Netns, conf: dict, pod: Netns, cid: str, **runtime) -> object:
    if runtime:
        conf = dict(conf, runtimeConfig=runtime, capabilities={"ips": True})
    return run_plugin(node, cni_env("ADD", cid, pod.path), conf)


@pytest.mark.parametrize("wanted, expected", [
    (["fd00:241:0:10a::7/64"], ("241.1.10.7/24", "fd00:241:0:10a::7/64")),
    (["241.1.10.8/24", "fd00:241:0:10a::8/64"], ("241.1.10.8/24", "fd00:241:0:10a::8/64")),
    (["241.1.10.9"], ("241.1.10.9/24", "fd00:241:0:10a::9/64")),
])
def test_static_addresses_pair_by_index(wanted, expected, fan_node: Netns, plugin_mode: Mode, pods,
                                        tmp_path: Path) -> None:
    conf = netconf(NET, "1.1.0", dual_conf(tmp_path / "data", plugin_mode))
    pod = pods.new()
    out = _add(fan_node, conf, pod, "static", ips=wanted)
    assert out.code == 0, str(out)
    assert tuple(ip["address"] for ip in out.json["ips"]) == expected
    assert run_plugin(fan_node, cni_env("DEL", "static", pod.path), conf).code == 0


@pytest.mark.parametrize("wanted, code, words", [
    (["241.1.10.8", "fd00:241:0:10a::9"], INVALID_ENVIRONMENT, "do not pair"),
    (["fd00:241:0:10a::8", "fd00:241:0:10a::9"], INVALID_ENVIRONMENT, "one requested IPv6 address"),
    (["fd00:241:0:10b::8"], ADDRESS_UNAVAILABLE, "not in this node's IPv6 slice"),
    (["fd00:241:0:10a::1"], ADDRESS_UNAVAILABLE, "reserved for the host"),
    (["fd00:241:0:10a::8\n"], INVALID_ENVIRONMENT, "is not an IPv4 address"),
])
def test_unusable_static_addresses_change_nothing(wanted, code, words, fan_node: Netns, plugin_mode: Mode, pods,
                                                  tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = netconf(NET, "1.1.0", dual_conf(data, plugin_mode))
    pod = pods.new()
    before = fan_node.snapshot()
    out = _add(fan_node, conf, pod, "bad-static", ips=wanted)
    assert out.code != 0 and out.json["code"] == code and words in out.json["msg"], str(out)
    assert records(data, NET) == {} and pod.link("eth0") is None
    assert fan_node.snapshot() == before


def test_ipv6_request_without_overlay6_is_refused(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    conf = netconf(NET, "1.1.0", fan_plugin_conf(tmp_path / "data", plugin_mode.socket))
    pod = pods.new()
    out = _add(fan_node, conf, pod, "no-overlay6", ips=["fd00:241:0:10a::7"])
    assert out.code != 0 and out.json["code"] == INVALID_ENVIRONMENT and "overlay6" in out.json["msg"], str(out)


def test_single_stack_pods_are_unchanged(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    conf = netconf(NET, "1.1.0", fan_plugin_conf(tmp_path / "data", plugin_mode.socket))
    pod = pods.new()
    out = _add(fan_node, conf, pod, "v4-only")
    assert out.code == 0, str(out)
    assert [IPAddress(ip["address"].split("/")[0]).version for ip in out.json["ips"]] == [4]
    assert global_ipv6(pod, "eth0") == {} and ipv6_default_gateway(pod) is None
    assert run_plugin(fan_node, cni_env("DEL", "v4-only", pod.path), conf).code == 0


def test_a_node_turned_dual_stack_gets_the_ipv6_gateway_on_its_bridge(fan_node: Netns, plugin_mode: Mode, pods,
                                                                     tmp_path: Path) -> None:
    """`overlay6` added to the config of a node whose bridge is already up (IPv4 only): the next ADD
    adds the IPv6 gateway, and the dual-stack pod reaches it (no node agent here to repair it)."""
    data = tmp_path / "data"
    v4 = netconf(NET, "1.1.0", fan_plugin_conf(data, plugin_mode.socket))
    fan_node.ip("link", "del", BRIDGE, check=False)  # an earlier test's dual-stack bridge (no pods left on it)
    first = pods.new()
    assert _add(fan_node, v4, first, "v4-first").code == 0
    assert global_ipv6(fan_node, BRIDGE) == {}
    dual = netconf(NET, "1.1.0", dual_conf(data, plugin_mode))
    pod = pods.new()
    out = _add(fan_node, dual, pod, "dual-later")
    assert out.code == 0, str(out)
    assert GATEWAY6 + "/64" in global_ipv6(fan_node, BRIDGE)
    assert pod.ping(GATEWAY6), "the dual-stack pod cannot reach its IPv6 gateway"
    assert run_plugin(fan_node, cni_env("DEL", "dual-later", pod.path), dual).code == 0
    assert run_plugin(fan_node, cni_env("DEL", "v4-first", first.path), v4).code == 0
