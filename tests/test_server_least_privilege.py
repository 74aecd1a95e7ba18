"""The plugin server with only the agent's capabilities: no SYS_ADMIN, so no setns(2).

`cni-fan serve` runs under setpriv with exactly the capabilities
deploy/daemonset.yaml adds to the agent's container (harness/system.py,
`capped_argv`), in a node namespace. The thin client opens a netlink socket
inside the pod and passes it; the server's child uses it, creates the veth
with its pod end directly in the pod's namespace (by descriptor: that needs
NET_ADMIN over the user namespace owning the pod's namespace, the initial
one, which the agent has) and never enters a namespace. A caller in another
namespace than the server's, or a client that passed no socket, is told to
run the call itself (FALLBACK). Then each capability is taken away in turn,
to show what it is for.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from cni_fan.net.links import host_veth_name
from cni_fan.server import not_served_here
from harness import netlab
from harness.netlab import Netns, PluginServer
from harness.system import CAP_BITS, REPO, capped_argv, effective_caps

pytestmark = pytest.mark.kernel

GATEWAY = "241.1.10.1"  # fan_node's slice of 241.0.0.0/8


def agent_caps() -> tuple[str, ...]:
    """What deploy/daemonset.yaml adds to the agent's container, in its order."""
    for doc in yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()):
        if doc and doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == "cni-fan":
            agent = next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
            return tuple(agent["securityContext"]["capabilities"]["add"])
    raise AssertionError("no DaemonSet cni-fan in deploy/daemonset.yaml")


# Exactly the agent's capabilities without SYS_ADMIN; the YAML is checked against the same set below.
SERVER_CAPS = ("NET_ADMIN", "NET_RAW", "BPF")


def start_server(node: Netns, tmp: Path, caps) -> PluginServer:
    return PluginServer(node, tmp / "plugin.sock", tmp / "serve.log", prefix=capped_argv(caps))


@pytest.fixture(scope="module")
def capped(fan_node: Netns, tmp_path_factory) -> Iterator[PluginServer]:
    server = start_server(fan_node, tmp_path_factory.mktemp("capped"), SERVER_CAPS)
    try:
        yield server
    finally:
        server.stop()


def conf_for(server: PluginServer, data_dir: Path, **extra) -> dict:
    return netlab.netconf("capped", "1.1.0", netlab.fan_plugin_conf(data_dir, str(server.socket), **extra))


def assert_served(out: netlab.Outcome) -> None:
    """The call's log lines come from the server's child, not from the client the runtime started."""
    assert out.log_pids() and out.pid not in out.log_pids(), f"the call did not go through the server:\n{out}"


def test_the_daemonset_grants_the_agent_exactly_these_capabilities() -> None:
    assert set(agent_caps()) == set(SERVER_CAPS)


def test_the_server_runs_without_sys_admin(capped: PluginServer) -> None:
    caps = effective_caps(capped.proc.pid)  # nsenter and setpriv exec: the same pid
    assert not caps & (1 << CAP_BITS["SYS_ADMIN"]), f"CapEff {caps:#x}"
    assert all(caps & (1 << CAP_BITS[c]) for c in SERVER_CAPS), f"CapEff {caps:#x}"


def test_add_check_del_through_a_server_without_sys_admin(fan_node: Netns, capped: PluginServer, pods,
                                                          data_dir: Path) -> None:
    pod = pods.new()
    conf = conf_for(capped, data_dir)
    added = netlab.run_plugin(fan_node, netlab.cni_env("ADD", "capped-1", pod.path), conf)
    assert added.code == 0, str(added)
    assert_served(added)
    address = added.json["ips"][0]["address"]
    assert address in pod.ipv4_addrs("eth0")
    # The port guard's pod side went through the client's socket too: the gateway's permanent entry.
    neighbours = pod.ip_json("neigh", "show", "dev", "eth0")
    assert any(n["dst"] == GATEWAY and "PERMANENT" in n.get("state", []) for n in neighbours), neighbours
    assert pod.ping(GATEWAY)
    fallbacks = capped.log_path.read_text().count("the client runs the call itself")
    check_env = netlab.cni_env("CHECK", "capped-1", pod.path)
    checked = netlab.run_plugin(fan_node, check_env, dict(conf, prevResult=added.json))
    assert checked.code == 0, str(checked)  # a CHECK that passes logs nothing: the server's log says it served it
    assert capped.log_path.read_text().count("the client runs the call itself") == fallbacks
    pod.ip("neigh", "del", GATEWAY, "dev", "eth0")  # what CHECK reads in the pod, through the client's socket
    broken = netlab.run_plugin(fan_node, check_env, dict(conf, prevResult=added.json))
    assert broken.code != 0 and GATEWAY in broken.json["msg"], str(broken)
    assert_served(broken)
    deleted = netlab.run_plugin(fan_node, netlab.cni_env("DEL", "capped-1", pod.path), conf)
    assert deleted.code == 0, str(deleted)
    assert_served(deleted)
    fan_node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
    assert "eth0" not in pod.links()
    assert host_veth_name("capped-1", "eth0") not in fan_node.links()
    assert capped.alive()


def test_a_caller_in_another_namespace_runs_the_call_itself(fan_node: Netns, capped: PluginServer, pods,
                                                            tmp_path: Path) -> None:
    other = netlab.make_node("node")  # the same underlay address, in a namespace of its own
    try:
        pod = pods.new()
        conf = conf_for(capped, tmp_path / "other-data")
        added = netlab.run_plugin(other, netlab.cni_env("ADD", "capped-other", pod.path), conf)
        assert added.code == 0, str(added)
        assert added.log_pids() == {added.pid}, f"not run by the client itself:\n{added}"
        veth = host_veth_name("capped-other", "eth0")
        assert veth in other.links() and veth not in fan_node.links()
        assert "the caller's network namespace is not the plugin server's" in capped.log_path.read_text()
        deleted = netlab.run_plugin(other, netlab.cni_env("DEL", "capped-other", pod.path), conf)
        assert deleted.code == 0, str(deleted)
        assert veth not in other.links()
    finally:
        other.delete()


# A client of the same version that passes no socket in the pod (as before this rule).
NO_SOCKET_CLIENT = ("import sys; sys.path.insert(0, sys.argv[1]); from cni_fan import entry; "
                    "entry._netlink_socket_in = lambda pod_fd, own_ns: None; entry.fan_main()")


def test_a_client_that_passes_no_pod_socket_runs_the_call_itself(fan_node: Netns, capped: PluginServer, pods,
                                                                 data_dir: Path) -> None:
    pod = pods.new()
    conf = conf_for(capped, data_dir)
    argv = fan_node.argv(sys.executable, "-c", NO_SOCKET_CLIENT, str(REPO))
    env = netlab.cni_env("ADD", "capped-nosock", pod.path)
    proc = subprocess.run(argv, env=env, input=json.dumps(conf).encode(), capture_output=True, timeout=60)
    added = netlab.Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert added.code == 0, str(added)
    assert "no netlink socket in the pod's namespace came with the call" in capped.log_path.read_text()
    assert netlab.run_plugin(fan_node, netlab.cni_env("DEL", "capped-nosock", pod.path), conf).code == 0


def test_which_calls_are_not_served_here(fan_node: Netns, pods) -> None:
    pod = pods.new()
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    node = os.open(fan_node.path, os.O_RDONLY | os.O_CLOEXEC)
    pod_fd = os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert not_served_here(own, "fan", "ADD", pod_fd, 99) is None
        assert not_served_here(own, "fan", "DEL", pod_fd, None) is None  # DEL works on the host only
        assert not_served_here(own, "fan-ipam", "ADD", pod_fd, None) is None
        assert not_served_here(own, "fan", "STATUS", None, None) is None
        assert "no netlink socket" in not_served_here(own, "fan", "ADD", pod_fd, None)
        assert "no netlink socket" in not_served_here(own, "fan", "CHECK", pod_fd, None)
        assert "not the plugin server's" in not_served_here(node, "fan", "DEL", None, None)
    finally:
        for fd in (own, node, pod_fd):
            os.close(fd)


# -- each capability, taken away -------------------------------------------------------

@pytest.mark.parametrize("missing, says", [
    ("NET_ADMIN", "Operation not permitted"),  # links, addresses, routes, tc
    ("BPF", "cannot load the anti-spoofing program"),
])
def test_the_server_without_one_capability_cannot_add(fan_node: Netns, pods, data_dir: Path, tmp_path: Path,
                                                      missing: str, says: str) -> None:
    server = start_server(fan_node, tmp_path, [c for c in SERVER_CAPS if c != missing])
    try:
        pod = pods.new()
        conf = conf_for(server, data_dir)
        added = netlab.run_plugin(fan_node, netlab.cni_env("ADD", f"capped-no-{missing}", pod.path), conf)
        assert added.code != 0, str(added)
        assert says in added.stdout, str(added)
        assert_served(added)
        assert "eth0" not in pod.links()  # rolled back, or never made
        assert host_veth_name(f"capped-no-{missing}", "eth0") not in fan_node.links()
    finally:
        server.stop()


@pytest.mark.parametrize("caps, works", [(SERVER_CAPS, True), (("NET_ADMIN", "BPF"), False)])
def test_iptables_legacy_needs_net_raw(caps, works: bool) -> None:
    """NET_RAW is for iptables-legacy alone (the agent's firewall on legacy nodes): it reads and writes
    its tables through a raw socket. The plugin server never uses it."""
    node = Netns("node")
    try:
        out = subprocess.run(node.argv(*capped_argv(caps), "iptables-legacy", "-w", "-t", "nat", "-S"),
                             capture_output=True, text=True, timeout=60)
    finally:
        node.delete()
    assert (out.returncode == 0) == works, out.stderr
