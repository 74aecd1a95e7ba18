"""A second fan interface in a pod (CNI_IFNAME=net1, as Multus adds one).

The pod already has eth0 from fan, and with it the default route. A second
ADD with the same config asks for the default route again: the kernel says
EEXIST. That must be a clear error, not "internal error": the message names
the route the pod already has and the way out (`"routes": []` for the
second network), and nothing changes, on the node (no veth, no neighbour or
FDB entry, no allocation record, round-robin state untouched) or in the pod
(eth0, its address and its route as they were). With `"routes": []` the
second interface is added.

Real kernel: harness/podlab.py's Lab (a node namespace with `cni-fan
serve`, the real launchers).
"""
from __future__ import annotations

import json
from typing import Iterator

import pytest

from harness.podlab import Lab, Pod, json_of, module_lab, node_state, pod_state
from harness.system import inside

pytestmark = pytest.mark.kernel

ROUTE_EXISTS = 105


lab = module_lab("second-if")


@pytest.fixture
def pod(lab: Lab) -> Iterator[Pod]:
    [pod] = lab.add_pods(1)
    try:
        yield pod
    finally:
        for ifname in ("net1", "eth0"):
            lab.call("DEL", pod.cid, pod.path, ifname=ifname)
        lab.delete_netns([pod])


@pytest.mark.parametrize("server", [False, True], ids=["standalone", "server"])
def test_second_interface_asking_for_the_default_route_again_is_a_clear_error(lab: Lab, pod: Pod,
                                                                             server: bool) -> None:
    node_before, pod_before = node_state(lab), pod_state(pod)

    outcome = lab.call("ADD", pod.cid, pod.path, ifname="net1", server=server)

    assert outcome.code != 0, outcome
    err = json.loads(outcome.stdout)  # one JSON object, nothing else
    assert err["code"] == ROUTE_EXISTS, outcome
    msg = err["msg"]
    assert "0.0.0.0/0" in msg and "eth0" in msg and "241.1.10.1" in msg, msg  # which route, and whose
    assert "net1" in msg and '"routes": []' in msg, msg                      # what was refused, the way out
    assert "internal error" not in msg and "Traceback" not in outcome.stderr
    assert node_state(lab) == node_before
    assert pod_state(pod) == pod_before
    assert lab.records() == [pod.ip]
    assert lab.ping(pod, "241.1.10.1"), "eth0 lost its way to the gateway"


def test_a_failed_route_after_the_veth_is_made_rolls_back_completely(lab: Lab, pod: Pod, monkeypatch) -> None:
    """The check before any change can lose a race (the route appears between check and add):
    the kernel's EEXIST then gives the same error, and the rollback leaves nothing behind."""
    from cni_fan import plugin
    from cni_fan.cni.call import CallContext
    from cni_fan.cni.errors import CniError
    from cni_fan.cni.request import parse_request
    from cni_fan.net.links import host_veth_name

    monkeypatch.setattr(plugin, "_refuse_existing_routes", lambda *_args: None)  # the race: the check saw nothing
    node_before, pod_before = node_state(lab), pod_state(pod)
    env = lab.env("ADD", pod.cid, pod.path, ifname="net1", server=False)
    req = parse_request(env, json.dumps(lab.conf()).encode())
    with inside(lab.node_path), pytest.raises(CniError) as info:
        plugin.cmd_add(req, plugin.PLUGIN.parse_config(req.config), CallContext.standalone())
    assert info.value.code == ROUTE_EXISTS, info.value
    assert "0.0.0.0/0" in info.value.msg and "eth0" in info.value.msg, info.value
    assert host_veth_name(pod.cid, "net1") not in lab.host_veths()
    after = node_state(lab)
    # Round-robin state may have moved on (an address was taken and given back); nothing else did.
    assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in node_before.items() if k != "files"}
    assert lab.records() == [pod.ip]
    assert pod_state(pod) == pod_before


def test_second_interface_without_routes_is_added_and_removed(lab: Lab, pod: Pod) -> None:
    conf = lab.conf(routes=[])
    eth0_routes = pod_state(pod)["routes"]

    outcome = lab.call("ADD", pod.cid, pod.path, conf, ifname="net1")

    assert outcome.code == 0, outcome
    result = outcome.json
    net1 = result["ips"][0]["address"]
    assert result.get("routes", []) == []
    addrs = json_of(["ip", "-j", "-n", pod.name, "-4", "addr", "show", "dev", "net1"])
    assert [f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]] == [net1]
    routes = json_of(["ip", "-j", "-n", pod.name, "-4", "route", "show", "default"])
    assert [(r["dev"], r["gateway"]) for r in routes] == [("eth0", "241.1.10.1")]
    assert set(lab.records()) == {pod.ip, net1.split("/")[0]}
    check = lab.call("CHECK", pod.cid, pod.path, dict(conf, prevResult=result), ifname="net1")
    assert check.code == 0, check

    out = lab.call("DEL", pod.cid, pod.path, conf, ifname="net1")
    assert out.code == 0, out
    assert lab.records() == [pod.ip]
    lab.node_ns.settle()  # DEL deletes the cut-off veth (and so net1 and its routes) after answering
    assert pod_state(pod)["routes"] == eth0_routes


@pytest.mark.parametrize("server", [False, True], ids=["standalone", "server"])
def test_a_route_gateway_outside_the_pod_subnet_is_a_config_error_and_rolls_back(lab: Lab, server: bool) -> None:
    """The kernel refuses the route after the veth exists (ENETUNREACH): code 7, and the ADD is undone."""
    [pod] = lab.new_pods(1)
    try:
        conf = lab.conf(routes=[{"dst": "10.0.0.0/8", "gw": "241.2.0.1"}])
        node_before = node_state(lab)
        records = lab.records()
        outcome = lab.call("ADD", pod.cid, pod.path, conf, server=server)
        assert outcome.code != 0, outcome
        err = json.loads(outcome.stdout)
        assert err["code"] == 7, outcome
        assert "routes" in err["msg"] and "241.2.0.1" in err["msg"] and "eth0" in err["msg"], err
        after = node_state(lab)
        assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in node_before.items() if k != "files"}
        assert lab.records() == records
        assert [l["ifname"] for l in json_of(["ip", "-j", "-n", pod.name, "link", "show"])] == ["lo"]
    finally:
        lab.delete_netns([pod])
