"""Every kind of bad input gets its error code, protocol JSON, and changes nothing.

The plugin is run directly (env + stdin) because cnitool does not show the
code. The node already carries one pod of the same network, so "changes
nothing" covers the bridge, that pod's veth and record, and the round-robin
state, not just an empty node. Both modes (local and plugin server); the
agent socket is given by CNI_FAN_AGENT_SOCKET so that even a config that is
not JSON reaches the server.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.netlab import ALL_VERSIONS, Mode, Netns, cni_env, fan_plugin_conf, make_node, netconf, run_plugin
from harness.state import data_files, records, state_diff

pytestmark = pytest.mark.kernel

NET = "fannet"
# u0 is the node's underlay address in 198.18.0.0/16; u1 is a second NIC in
# 198.19.0.0/16, so an underlay of 198.18.0.0/15 matches two addresses.
UNDERLAY_NICS = (("u0", "198.18.1.10/16"), ("u1", "198.19.1.10/16"))

INCOMPATIBLE_VERSION, UNKNOWN_CONTAINER, INVALID_ENVIRONMENT, DECODE_FAILURE, INVALID_CONFIG = 1, 3, 4, 6, 7
TRY_AGAIN_LATER, INTERFACE_EXISTS, ADDRESS_UNAVAILABLE = 11, 101, 103


@pytest.fixture(scope="module")
def fan_node() -> Iterator[Netns]:
    node = make_node("errnode", UNDERLAY_NICS)
    try:
        yield node
    finally:
        node.delete()


@dataclass
class Seeded:
    data_dir: Path
    pod: Netns
    address: str


@pytest.fixture(scope="module")
def seeded(fan_node: Netns, tmp_path_factory) -> Iterator[Seeded]:
    """One pod already on the node (added in local mode)."""
    data = tmp_path_factory.mktemp("errors") / "data"
    conf = netconf(NET, "1.0.0", fan_plugin_conf(data, "/nonexistent/agent.sock"))
    pod = Netns("seedpod")
    try:
        out = run_plugin(fan_node, cni_env("ADD", "seeded-pod", pod.path, CNI_FAN_AGENT_SOCKET="none"), conf)
        assert out.code == 0, str(out)
        yield Seeded(data, pod, out.json["ips"][0]["address"].split("/")[0])
        out = run_plugin(fan_node, cni_env("DEL", "seeded-pod", pod.path, CNI_FAN_AGENT_SOCKET="none"), conf)
        assert out.code == 0, str(out)
    finally:
        pod.delete()


@dataclass
class Case:
    """What to break: the config (a dict to edit, or raw stdin), the environment, the pod."""

    code: int
    conf: Callable[[dict], dict | bytes] = lambda c: c
    env: Callable[[dict], dict] = lambda e: e
    pod_has_eth0: bool = False


def _without(key: str) -> Callable[[dict], dict]:
    return lambda c: {k: v for k, v in c.items() if k != key}


def _with(**changes) -> Callable[[dict], dict]:
    return lambda c: dict(c, **changes)


def _env_with(**changes) -> Callable[[dict], dict]:
    return lambda e: {**e, **changes}


def _env_without(key: str) -> Callable[[dict], dict]:
    return lambda e: {k: v for k, v in e.items() if k != key}


CASES = {
    "missing-overlay": Case(INVALID_CONFIG, _without("overlay")),
    "missing-underlay": Case(INVALID_CONFIG, _without("underlay")),
    "overlay-bad-cidr": Case(INVALID_CONFIG, _with(overlay="241.0.0.0/33")),
    "overlay-not-cidr": Case(INVALID_CONFIG, _with(overlay="fan-overlay")),
    "underlay-bad-cidr": Case(INVALID_CONFIG, _with(underlay="198.18.0.300/16")),
    "overlay-overlaps-underlay": Case(INVALID_CONFIG, _with(overlay="198.0.0.0/8")),
    "slice-too-small": Case(INVALID_CONFIG, _with(overlay="241.1.0.0/16")),  # 16 + 32 - 16 = /32 slices
    "unsupported-cniVersion-old": Case(INCOMPATIBLE_VERSION, _with(cniVersion="0.2.0")),
    "unsupported-cniVersion-new": Case(INCOMPATIBLE_VERSION, _with(cniVersion="2.0.0")),
    "missing-cniVersion": Case(INCOMPATIBLE_VERSION, _without("cniVersion")),
    "invalid-json": Case(DECODE_FAILURE, lambda c: json.dumps(c).encode()[:-12]),
    "json-not-an-object": Case(DECODE_FAILURE, lambda c: b'["fan"]'),
    "containerid-leading-dash": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_CONTAINERID="-abc")),
    "containerid-slash": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_CONTAINERID="abc/../../etc")),
    "containerid-missing": Case(INVALID_ENVIRONMENT, env=_env_without("CNI_CONTAINERID")),
    "netns-missing-on-add": Case(INVALID_ENVIRONMENT, env=_env_without("CNI_NETNS")),
    "netns-does-not-exist": Case(UNKNOWN_CONTAINER, env=_env_with(CNI_NETNS="/var/run/netns/tfan-no-such-netns")),
    "ifname-too-long": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_IFNAME="eth0123456789abc")),
    "ifname-missing": Case(INVALID_ENVIRONMENT, env=_env_without("CNI_IFNAME")),
    "command-unknown": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_COMMAND="ATTACH")),
    "ifname-exists-in-pod": Case(INTERFACE_EXISTS, pod_has_eth0=True),
    "no-underlay-address": Case(TRY_AGAIN_LATER, _with(underlay="198.18.128.0/17")),
    "several-underlay-addresses": Case(INVALID_CONFIG, _with(underlay="198.18.0.0/15")),
    "requested-ip-other-slice": Case(ADDRESS_UNAVAILABLE, env=_env_with(CNI_ARGS="IP=241.1.11.5")),
    "requested-ip-gateway": Case(ADDRESS_UNAVAILABLE, env=_env_with(CNI_ARGS="IP=241.1.10.1")),
    "requested-ip-broadcast": Case(ADDRESS_UNAVAILABLE, env=_env_with(CNI_ARGS="IP=241.1.10.255")),
    "requested-ip-outside-overlay": Case(ADDRESS_UNAVAILABLE, env=_env_with(CNI_ARGS="IP=10.1.2.3")),
    # Taken exactly as written: netaddr alone would read past the newline or the zero.
    "requested-ip-trailing-newline": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_ARGS="IP=241.1.10.200\n")),
    "requested-ip-leading-zero": Case(INVALID_ENVIRONMENT, env=_env_with(CNI_ARGS="IP=241.1.10.020")),
    "requested-ip-runtimeconfig-blank": Case(INVALID_ENVIRONMENT, _with(runtimeConfig={"ips": ["241.1.10.200 "]})),
}


def host_state(node: Netns, pod: Netns, seeded: Seeded) -> dict:
    return {"node": node.snapshot(), "pod": pod.snapshot(), "seeded_pod": seeded.pod.snapshot(),
            "files": data_files(seeded.data_dir)}


def assert_protocol_error(out, code: int) -> dict:
    assert out.code != 0, f"exit 0 on an error:\n{out}"
    err = json.loads(out.stdout)  # stdout holds exactly one JSON object, nothing else
    assert isinstance(err, dict) and set(err) <= {"cniVersion", "code", "msg", "details"}, err
    assert err["cniVersion"] in ALL_VERSIONS
    assert err["code"] == code, f"expected code {code}, got:\n{out}"
    assert isinstance(err["msg"], str) and err["msg"].strip()
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, fan_node: Netns, plugin_mode: Mode, seeded: Seeded, pods) -> None:
    spec = CASES[case]
    pod = pods.new()
    if spec.pod_has_eth0:
        pod.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    conf = netconf(NET, "1.0.0", fan_plugin_conf(seeded.data_dir, plugin_mode.socket))
    env = cni_env("ADD", f"bad-{case}", pod.path, CNI_FAN_AGENT_SOCKET=plugin_mode.socket)
    before = host_state(fan_node, pod, seeded)

    out = run_plugin(fan_node, spec.env(env), spec.conf(conf))

    err = assert_protocol_error(out, spec.code)
    if case.startswith("unsupported-cniVersion"):
        assert "0.2.0" in err["msg"] or "2.0.0" in err["msg"]
    assert not state_diff(before, host_state(fan_node, pod, seeded)), f"{case} changed the host"
    assert list(records(seeded.data_dir, NET)) == [seeded.address]


def test_requested_ip_held_by_another_pod(fan_node: Netns, plugin_mode: Mode, seeded: Seeded, pods) -> None:
    pod = pods.new()
    conf = netconf(NET, "1.0.0", fan_plugin_conf(seeded.data_dir, plugin_mode.socket))
    before = host_state(fan_node, pod, seeded)
    out = run_plugin(fan_node, cni_env("ADD", "thief", pod.path, args=f"IP={seeded.address}"), conf)
    err = assert_protocol_error(out, ADDRESS_UNAVAILABLE)
    assert seeded.address in err["msg"]
    assert not state_diff(before, host_state(fan_node, pod, seeded))
    assert records(seeded.data_dir, NET)[seeded.address]["containerID"] == "seeded-pod"


def test_requested_ip_in_slice_is_granted(fan_node: Netns, plugin_mode: Mode, seeded: Seeded, pods) -> None:
    """The counterpart of the IP= errors: a free address of the slice is honoured."""
    pod = pods.new()
    conf = netconf(NET, "1.0.0", fan_plugin_conf(seeded.data_dir, plugin_mode.socket))
    env = cni_env("ADD", "static", pod.path, args="IP=241.1.10.200")
    out = run_plugin(fan_node, env, conf)
    assert out.code == 0, str(out)
    assert out.json["ips"][0]["address"] == "241.1.10.200/24"
    assert pod.ipv4_addrs("eth0") == {"241.1.10.200/24"}
    out = run_plugin(fan_node, dict(env, CNI_COMMAND="DEL"), conf)
    assert out.code == 0, str(out)
    assert list(records(seeded.data_dir, NET)) == [seeded.address]
