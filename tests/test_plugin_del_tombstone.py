"""DEL answers before the kernel has torn the veth down (cni_fan/net/tombstone.py).

The host veth is cut off (down, off the bridge) and renamed to a
tombstone, the address is released, the runtime gets its answer, and the
tombstone is deleted afterwards. These tests show that is safe, in both
call modes: the deletion does happen, the same attachment can be added
again at once (even while its tombstone is still there), a pod namespace
deleted right after DEL leaves nothing behind, and a tombstone that a
crash left is collected by GC or the next ADD.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cni_fan.net import tombstone
from cni_fan.net.rtnl import Rtnl
from harness.netlab import Mode, Netns, cni_env, fan_plugin_conf, netconf, run_plugin
from harness.state import records

pytestmark = pytest.mark.kernel

NET = "fannet"
BRIDGE = "fan-241-1-10"
GATEWAY = "241.1.10.1"


def _conf(data: Path, mode: Mode, version: str = "1.0.0") -> dict:
    return netconf(NET, version, fan_plugin_conf(data, mode.socket))


def _call(node: Netns, command: str, conf: dict, cid: str, pod: Netns | None) -> dict | None:
    out = run_plugin(node, cni_env(command, cid, pod.path if pod else "", ifname="eth0" if command != "GC" else ""),
                     conf)
    assert out.code == 0, str(out)
    return out.json


def _crash_after_bury(node: Netns, veth: str) -> str:
    """What a DEL that died between its answer and the deletion leaves: the tombstone."""
    with Rtnl.in_netns(node.path) as host:
        tomb = tombstone.bury(host, veth)
    assert tomb == tombstone.tombstone_name(veth)
    return tomb


def test_del_cuts_the_veth_off_answers_and_deletes_it(fan_node: Netns, plugin_mode: Mode, pods,
                                                      data_dir: Path) -> None:
    conf, pod = _conf(data_dir, plugin_mode), pods.new()
    veth = _call(fan_node, "ADD", conf, "tomb-del", pod)["interfaces"][0]["name"]
    _call(fan_node, "DEL", conf, "tomb-del", pod)
    # At the answer: the attachment's name is free, the address released, nothing on the bridge.
    assert fan_node.link(veth) is None and fan_node.ports_of(BRIDGE) == set()
    assert records(data_dir, NET) == {}
    for name in fan_node.tombstones():  # not deleted yet: cut off
        link = fan_node.link(name)
        assert name == tombstone.tombstone_name(veth) and "master" not in link and "UP" not in link["flags"], link
    fan_node.settle()
    assert fan_node.tombstones() == set(), "the tombstone was never deleted"
    assert pod.link("eth0") is None


def test_the_same_attachment_added_again_at_once_works(fan_node: Netns, plugin_mode: Mode, pods,
                                                       data_dir: Path) -> None:
    conf, pod = _conf(data_dir, plugin_mode), pods.new()
    _call(fan_node, "ADD", conf, "tomb-again", pod)
    _call(fan_node, "DEL", conf, "tomb-again", pod)
    again = _call(fan_node, "ADD", conf, "tomb-again", pod)  # as fast as the runtime can
    assert pod.ping(GATEWAY), "the pod added again right after its DEL cannot reach its gateway"
    assert fan_node.ports_of(BRIDGE) == {again["interfaces"][0]["name"]}
    _call(fan_node, "DEL", conf, "tomb-again", pod)
    fan_node.settle()
    assert fan_node.tombstones() == set() and records(data_dir, NET) == {}


def test_the_next_add_of_the_attachment_deletes_its_tombstone(fan_node: Netns, plugin_mode: Mode, pods,
                                                              data_dir: Path) -> None:
    """The tombstone's pod end still holds eth0 in the pod: the ADD must clear it, not fail with EEXIST."""
    conf, pod = _conf(data_dir, plugin_mode), pods.new()
    veth = _call(fan_node, "ADD", conf, "tomb-next", pod)["interfaces"][0]["name"]
    tomb = _crash_after_bury(fan_node, veth)
    _call(fan_node, "DEL", conf, "tomb-next", pod)  # the runtime's retry: releases the address
    assert tomb in fan_node.tombstones() and pod.link("eth0") is not None
    _call(fan_node, "ADD", conf, "tomb-next", pod)
    assert tomb not in fan_node.tombstones()
    assert pod.ping(GATEWAY)
    _call(fan_node, "DEL", conf, "tomb-next", pod)
    fan_node.settle()
    assert fan_node.tombstones() == set()


def test_gc_deletes_tombstones_a_crash_left(fan_node: Netns, plugin_mode: Mode, pods, data_dir: Path) -> None:
    conf, kept, dropped = _conf(data_dir, plugin_mode, "1.1.0"), pods.new(), pods.new()
    keep_veth = _call(fan_node, "ADD", conf, "tomb-keep", kept)["interfaces"][0]["name"]
    tomb = _crash_after_bury(fan_node, _call(fan_node, "ADD", conf, "tomb-gc", dropped)["interfaces"][0]["name"])
    valid = [{"containerID": "tomb-keep", "ifname": "eth0"}]
    _call(fan_node, "GC", dict(conf, **{"cni.dev/valid-attachments": valid}), "", None)
    assert tomb not in fan_node.tombstones() and dropped.link("eth0") is None
    assert fan_node.ports_of(BRIDGE) == {keep_veth} and kept.ping(GATEWAY)
    _call(fan_node, "DEL", conf, "tomb-keep", kept)
    fan_node.settle()
    assert fan_node.tombstones() == set() and records(data_dir, NET) == {}


@pytest.mark.parametrize("left", ["deleting", "crashed"])
def test_the_pod_namespace_deleted_right_after_del_leaves_nothing(left: str, fan_node: Netns, plugin_mode: Mode,
                                                                   pods, data_dir: Path) -> None:
    """Whether the DEL's own deletion is still running or never came (a crash): the kernel takes the veth
    with the pod's namespace."""
    conf, pod = _conf(data_dir, plugin_mode), pods.new()
    veth = _call(fan_node, "ADD", conf, f"tomb-ns-{left}", pod)["interfaces"][0]["name"]
    if left == "crashed":
        _crash_after_bury(fan_node, veth)
    _call(fan_node, "DEL", conf, f"tomb-ns-{left}", pod)
    pod.delete()
    fan_node.settle()
    assert fan_node.tombstones() == set() and fan_node.link(veth) is None
    assert not [name for name in fan_node.links() if name.startswith(("fanv", "fanz"))]
    assert records(data_dir, NET) == {}
