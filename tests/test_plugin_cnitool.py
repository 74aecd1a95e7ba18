"""`fan` in network namespaces, driven the way runtimes drive it.

Acceptance tests of the core plugin (issue 2): ADD/CHECK/DEL for every
cniVersion through the real cnitool (Debian's libcni 1.1.x; for 1.1.0,
which that libcni does not know, and for GC and STATUS, the plugin is run
directly with the CNI environment and stdin), connectivity, hairpin, every
DEL idempotency case, GC, STATUS and CHECK's detection of broken pods.
Every test runs in both modes: in the `fan` process itself ("local") and
through a `cni-fan serve` started inside the node namespace ("server").
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from harness import netlab
from harness.netlab import (ALL_VERSIONS, Mode, Netns, assert_ran_in, cni_env, cnitool,
                            cnitool_container_id, conflist, fan_plugin_conf, libcni_cache_entries, netconf,
                            run_plugin, write_conflist)
from harness.runtime import Runtime
from harness.state import data_files, records
from harness.system import CNI_FAN

pytestmark = pytest.mark.kernel

NET = "fannet"
SLICE = IPNetwork("241.1.10.0/24")  # 198.18.1.10 in 198.18.0.0/16 -> 241.0.0.0/8
GATEWAY = "241.1.10.1"
BRIDGE = "fan-241-1-10"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def at_least(version: str, minimum: str) -> bool:
    return tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


# -- what a result must look like ----------------------------------------------

def assert_spec_result(result: dict, version: str) -> None:
    """The shape SPEC.md gives an ADD result of `version` (IPv4, one pod interface)."""
    assert result["cniVersion"] == version
    assert set(result) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}, result
    interfaces = result["interfaces"]
    assert isinstance(interfaces, list) and len(interfaces) == 2, interfaces
    allowed = {"name", "mac", "sandbox"} | ({"mtu", "socketPath", "pciID"} if at_least(version, "1.1.0") else set())
    for iface in interfaces:
        assert set(iface) <= allowed, f"{iface} has keys {version} does not define"
        assert isinstance(iface["name"], str) and 0 < len(iface["name"]) <= 15
        assert MAC_RE.match(iface["mac"]), iface
        if "mtu" in iface:
            assert isinstance(iface["mtu"], int) and iface["mtu"] >= 576
    assert isinstance(result["ips"], list) and len(result["ips"]) == 1
    ip = result["ips"][0]
    if at_least(version, "1.0.0"):
        assert "version" not in ip, "ips[].version was removed in 1.0.0"
    else:
        assert ip["version"] == "4"
    assert set(ip) <= {"version", "address", "gateway", "interface"}
    assert isinstance(ip["interface"], int) and 0 <= ip["interface"] < len(interfaces)
    assert interfaces[ip["interface"]].get("sandbox"), "ips[].interface must point at the pod's interface"
    assert IPNetwork(ip["address"]).prefixlen == SLICE.prefixlen
    for route in result.get("routes", []):
        assert set(route) <= {"dst", "gw"} | ({"mtu", "advmss", "priority", "table", "scope"}
                                             if at_least(version, "1.1.0") else set())
        IPNetwork(route["dst"])
    assert isinstance(result.get("dns", {}), dict)


def assert_pod_wired(node: Netns, pod: Netns, result: dict, data_dir: Path, container_id: str) -> str:
    """The kernel state and the records agree with the result; returns the pod address."""
    host_if, pod_if = result["interfaces"]
    assert "sandbox" not in host_if and pod_if["sandbox"] == pod.path and pod_if["name"] == "eth0"
    cidr = result["ips"][0]["address"]
    address = IPAddress(cidr.split("/")[0])
    assert address in SLICE and address not in (SLICE.network, SLICE.broadcast, IPAddress(GATEWAY)), cidr
    assert result["ips"][0]["gateway"] == GATEWAY
    assert {"dst": "0.0.0.0/0", "gw": GATEWAY} in result["routes"]
    # Pod side.
    eth0 = pod.link("eth0")
    assert eth0 is not None and eth0["address"] == pod_if["mac"] and "UP" in eth0["flags"]
    assert pod.ipv4_addrs("eth0") == {cidr}
    assert pod.default_gateway("eth0") == GATEWAY
    # Host side: the veth is a port of the slice's bridge, hairpin on.
    veth = node.link(host_if["name"])
    assert veth is not None, f"host veth {host_if['name']} missing"
    assert veth["address"] == host_if["mac"] and veth.get("master") == BRIDGE
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True, "hairpin mode is off on the pod's bridge port"
    assert veth["mtu"] == eth0["mtu"]
    if "mtu" in pod_if:
        assert pod_if["mtu"] == eth0["mtu"]
    assert f"{GATEWAY}/24" in node.ipv4_addrs(BRIDGE)
    # The allocation record names this attachment.
    held = {a: r for a, r in records(data_dir, NET).items() if r["containerID"] == container_id}
    assert list(held) == [str(address)] and held[str(address)]["ifname"] == "eth0"
    return str(address)


# -- ADD / CHECK / DEL for every version, both modes ---------------------------

@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_check_del(version: str, fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    node, data = fan_node, tmp_path / "data"
    rt = Runtime(node, version, fan_plugin_conf(data, plugin_mode.socket), tmp_path)
    pod1, pod2 = pods.new(), pods.new()

    results = {}
    for pod in (pod1, pod2):
        out = rt.call("add", pod)
        assert out.code == 0, str(out)
        assert_ran_in(plugin_mode, out, rt.launched)
        raw = rt.raw_add_output(out)
        assert_spec_result(raw, version)
        assert out.json["cniVersion"] == version
        results[pod.name] = raw
    addr1 = assert_pod_wired(node, pod1, results[pod1.name], data, rt.container_id(pod1))
    addr2 = assert_pod_wired(node, pod2, results[pod2.name], data, rt.container_id(pod2))
    assert addr1 != addr2
    assert node.ports_of(BRIDGE) == {r["interfaces"][0]["name"] for r in results.values()}

    assert pod1.ping(GATEWAY), "pod cannot reach its gateway"
    assert pod1.ping(addr2) and pod2.ping(addr1), "pods on one node cannot reach each other"

    for pod in (pod1, pod2):
        if at_least(version, "0.4.0"):
            out = rt.call("check", pod, prev=results[pod.name])
            assert out.code == 0, str(out)
        else:
            # CHECK does not exist before 0.4.0: the plugin refuses it (libcni would not even ask).
            conf = dict(rt.netconf, prevResult=results[pod.name])
            out = run_plugin(node, cni_env("CHECK", rt.container_id(pod), pod.path), conf)
            assert out.code != 0 and out.json["code"] == 1, str(out)
            assert out.json["cniVersion"] == version and out.json["msg"]

    for pod in (pod1, pod2):
        out = rt.call("del", pod, prev=results[pod.name])
        assert out.code == 0 and out.stdout.strip() == "", str(out)
        assert_ran_in(plugin_mode, out, rt.launched)
        node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
        assert pod.link("eth0") is None
        assert not libcni_cache_entries(rt.container_id(pod))
    assert records(data, NET) == {}
    assert node.ports_of(BRIDGE) == set()
    # DEL twice: still success, still nothing.
    out = rt.call("del", pod1, prev=results[pod1.name])
    assert out.code == 0 and out.stdout.strip() == "", str(out)
    assert records(data, NET) == {}


# -- DEL is idempotent ----------------------------------------------------------

def _direct_conf(data: Path, mode: Mode, version: str = "1.0.0") -> dict:
    return netconf(NET, version, fan_plugin_conf(data, mode.socket))


def _add(node: Netns, conf: dict, cid: str, pod: Netns) -> dict:
    out = run_plugin(node, cni_env("ADD", cid, pod.path), conf)
    assert out.code == 0, str(out)
    return out.json


def test_del_twice(fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf, pod = _direct_conf(data_dir, plugin_mode), pods.new()
    result = _add(fan_node, conf, "del-twice", pod)
    for _ in range(2):
        out = run_plugin(fan_node, cni_env("DEL", "del-twice", pod.path), dict(conf, prevResult=result))
        assert out.code == 0 and out.stdout.strip() == "", str(out)
        assert records(data_dir, NET) == {} and fan_node.ports_of(BRIDGE) == set()
        fan_node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
        assert pod.link("eth0") is None


def test_del_after_netns_is_gone(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    """Through cnitool, as a runtime does after the pod's namespace was torn down."""
    data, pod = tmp_path / "data", pods.new()
    conf_dir = tmp_path / "net.d"
    write_conflist(conf_dir, conflist(NET, "1.0.0", fan_plugin_conf(data, plugin_mode.socket)))
    out = cnitool(fan_node, "add", NET, pod.path, conf_dir)
    assert out.code == 0, str(out)
    assert len(records(data, NET)) == 1
    pod.delete()
    assert not pod.exists()
    out = cnitool(fan_node, "del", NET, pod.path, conf_dir)
    assert out.code == 0, str(out)
    assert records(data, NET) == {}
    assert fan_node.ports_of(BRIDGE) == set()
    assert not libcni_cache_entries(cnitool_container_id(pod.path))


def test_del_never_added(fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf, pod = _direct_conf(data_dir, plugin_mode), pods.new()
    existing = pods.new()
    _add(fan_node, conf, "someone-else", existing)  # DEL of a stranger must not touch it
    before = (fan_node.snapshot(), data_files(data_dir))
    for netns in (pod.path, ""):
        out = run_plugin(fan_node, cni_env("DEL", "never-added", netns), conf)
        assert out.code == 0 and out.stdout.strip() == "", str(out)
    assert (fan_node.snapshot(), data_files(data_dir)) == before
    assert existing.ping(GATEWAY)
    out = run_plugin(fan_node, cni_env("DEL", "someone-else", existing.path), conf)
    assert out.code == 0, str(out)


@pytest.mark.parametrize("netns", ["pod", "empty"], ids=["with-netns", "without-CNI_NETNS"])
def test_del_without_prev_result(netns: str, fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf, pod = _direct_conf(data_dir, plugin_mode), pods.new()
    _add(fan_node, conf, "no-prev", pod)
    assert "prevResult" not in conf
    out = run_plugin(fan_node, cni_env("DEL", "no-prev", pod.path if netns == "pod" else ""), conf)
    assert out.code == 0 and out.stdout.strip() == "", str(out)
    assert records(data_dir, NET) == {}
    assert fan_node.ports_of(BRIDGE) == set()
    fan_node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
    assert pod.link("eth0") is None


# -- GC and STATUS (cniVersion 1.1.0 only) --------------------------------------

def test_gc_releases_what_is_not_valid(fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf = _direct_conf(data_dir, plugin_mode, "1.1.0")
    keep, drop = pods.new(), pods.new()
    kept = _add(fan_node, conf, "gc-keep", keep)
    dropped = _add(fan_node, conf, "gc-drop", drop)
    keep_veth, drop_veth = kept["interfaces"][0]["name"], dropped["interfaces"][0]["name"]
    assert fan_node.ports_of(BRIDGE) == {keep_veth, drop_veth}

    valid = [{"containerID": "gc-keep", "ifname": "eth0"}]
    out = run_plugin(fan_node, cni_env("GC", ifname=""), dict(conf, **{"cni.dev/valid-attachments": valid}))
    assert out.code == 0 and out.stdout.strip() == "", str(out)
    held = records(data_dir, NET)
    assert [r["containerID"] for r in held.values()] == ["gc-keep"]
    assert list(held) == [kept["ips"][0]["address"].split("/")[0]]
    assert fan_node.ports_of(BRIDGE) == {keep_veth}
    assert drop.link("eth0") is None
    assert keep.ping(GATEWAY), "GC broke the pod it was told to keep"

    # GC below 1.1.0 does not exist.
    old = _direct_conf(data_dir, plugin_mode, "1.0.0")
    out = run_plugin(fan_node, cni_env("GC", ifname=""), dict(old, **{"cni.dev/valid-attachments": []}))
    assert out.code == 1 and out.json["code"] == 1, str(out)
    assert len(records(data_dir, NET)) == 1

    # Nothing valid: everything goes.
    out = run_plugin(fan_node, cni_env("GC", ifname=""), dict(conf, **{"cni.dev/valid-attachments": []}))
    assert out.code == 0, str(out)
    assert records(data_dir, NET) == {} and fan_node.ports_of(BRIDGE) == set()


def test_status(plugin_mode: Mode, tmp_path: Path) -> None:
    """Success once the node has its underlay address and the agent has its datapath up; 50 before."""
    data = tmp_path / "data"
    conf = _direct_conf(data, plugin_mode, "1.1.0")
    conf_dir = tmp_path / "net.d"
    path = write_conflist(conf_dir, conflist(NET, "1.1.0", fan_plugin_conf(data, plugin_mode.socket)))
    node = netlab.Netns("status")  # no underlay address yet
    try:
        out = run_plugin(node, cni_env("STATUS", ifname=""), conf)
        assert out.code != 0 and out.json["code"] == 50, str(out)
        assert out.json["cniVersion"] == "1.1.0"
        assert "198.18.0.0/16" in out.json["msg"] + out.json.get("details", ""), "does not say what is missing"

        node.ip("link", "add", "u0", "type", "veth", "peer", "name", "u0p")
        node.ip("addr", "add", "198.18.1.10/16", "dev", "u0")
        node.ip("link", "set", "u0", "up")
        node.ip("link", "set", "u0p", "up")
        # The address alone: pods could get addresses, but nothing crosses nodes yet.
        out = run_plugin(node, cni_env("STATUS", ifname=""), conf)
        assert out.code != 0 and out.json["code"] == 50, str(out)

        up = node.run(str(CNI_FAN), "node", "up", "--conflist", str(path), check=False)
        assert up.returncode == 0, up.stderr
        out = run_plugin(node, cni_env("STATUS", ifname=""), conf)
        assert out.code == 0 and out.stdout.strip() == "", str(out)

        # STATUS does not exist below 1.1.0.
        out = run_plugin(node, cni_env("STATUS", ifname=""), _direct_conf(data, plugin_mode, "1.0.0"))
        assert out.code != 0 and out.json["code"] == 1, str(out)
    finally:
        node.delete()


# -- CHECK notices what is off ----------------------------------------------------

BREAKAGES = {
    "pod-address": (lambda node, pod, r: pod.ip("addr", "del", r["ips"][0]["address"], "dev", "eth0"),
                    lambda r: r["ips"][0]["address"]),
    "pod-route": (lambda node, pod, r: pod.ip("route", "del", "default", "via", GATEWAY),
                  lambda r: "route to 0.0.0.0/0"),
    "host-veth": (lambda node, pod, r: node.ip("link", "del", r["interfaces"][0]["name"]),
                  lambda r: r["interfaces"][0]["name"]),
}


@pytest.mark.parametrize("broken", list(BREAKAGES))
def test_check_detects(broken: str, fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf, pod = _direct_conf(data_dir, plugin_mode), pods.new()
    result = _add(fan_node, conf, "checked", pod)
    check_conf = dict(conf, prevResult=result)
    out = run_plugin(fan_node, cni_env("CHECK", "checked", pod.path), check_conf)
    assert out.code == 0 and out.stdout.strip() == "", str(out)

    breaking, named = BREAKAGES[broken]
    breaking(fan_node, pod, result)
    out = run_plugin(fan_node, cni_env("CHECK", "checked", pod.path), check_conf)
    assert out.code != 0 and out.json["code"] == 104, str(out)
    assert named(result) in out.json["msg"], f"the message does not say what is off: {out.json['msg']}"

    out = run_plugin(fan_node, cni_env("DEL", "checked", pod.path), check_conf)
    assert out.code == 0, str(out)
    assert records(data_dir, NET) == {} and fan_node.ports_of(BRIDGE) == set()
