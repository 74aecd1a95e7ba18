"""A pod namespace path only the runtime can see: the call uses the descriptor the client opened.

A runtime may name the pod's namespace by a path that exists only in its
own mount namespace; the plugin server's child, started by the agent, does
not see it. The thin client opens the path and passes the descriptor; the
server hands it to the verbs in the call context (`CallContext.netns_fds`).
Here the client runs in a private mount namespace whose tmpfs holds the
pod's namespace at a path that does not exist outside: ADD and CHECK work
in both call modes, as they would with a path everyone sees.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import netlab
from harness.netlab import Mode, Netns

pytestmark = pytest.mark.kernel

# $1 the tmpfs mount point, $2 the pod's namespace, $3 the node's, $4 the plugin.
PRIVATE_PATH = """set -e
mount -t tmpfs cni-fan-test "$1"
touch "$1/ns"
mount --bind "$2" "$1/ns"
exec nsenter --net="$3" "$4"
"""


def _call_from_a_private_mount_namespace(node: Netns, pod: Netns, mount_point: Path, env: dict[str, str],
                                         conf: dict) -> netlab.Outcome:
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_PATH, "private-path",
            str(mount_point), pod.path, node.path, str(netlab.CNI_BIN / "fan")]
    proc = subprocess.run(argv, env=env, input=json.dumps(conf).encode(), capture_output=True, timeout=60)
    return netlab.Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_add_and_check_of_a_pod_namespace_the_server_cannot_see(fan_node: Netns, plugin_mode: Mode, pods,
                                                                  data_dir: Path, tmp_path: Path) -> None:
    pod = pods.new()
    mount_point = tmp_path / "runtime-only"
    mount_point.mkdir()
    private_path = str(mount_point / "ns")
    assert not os.path.exists(private_path)  # nobody outside the client's mount namespace sees it
    conf = netlab.netconf("privns", "1.1.0", netlab.fan_plugin_conf(data_dir, plugin_mode.socket))
    env = netlab.cni_env("ADD", "privns-1", private_path)
    added = _call_from_a_private_mount_namespace(fan_node, pod, mount_point, env, conf)
    assert added.code == 0, str(added)
    address = added.json["ips"][0]["address"]
    assert address in pod.ipv4_addrs("eth0")
    checked = _call_from_a_private_mount_namespace(fan_node, pod, mount_point, netlab.cni_env(
        "CHECK", "privns-1", private_path), dict(conf, prevResult=added.json))
    assert checked.code == 0, str(checked)
    deleted = netlab.run_plugin(fan_node, netlab.cni_env("DEL", "privns-1", private_path), conf)
    assert deleted.code == 0, str(deleted)
    assert not os.path.exists(private_path)
