"""A failed call leaves no socket or descriptor open in the process that ran it.

The plugin server's children run call after call, so a netlink socket left
open by a failed ADD would pile up; in a standalone `fan-ipam` an IPRoute
left to the garbage collector printed an asyncio traceback at exit.
"""
from __future__ import annotations

import json
import os

import pytest

from cni_fan.cni.call import CallContext
from cni_fan.net.netns import entered
from cni_fan.runner import run_local
from harness.netlab import Netns
from harness.system import require_kernel_lab

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("restore_cni_fan_logging")]


@pytest.fixture
def bare_node():
    """A namespace with no underlay address at all: ADD fails after opening its sockets."""
    require_kernel_lab(plugins=False)
    node, pod = Netns("leak-node"), Netns("leak-pod")
    fd = os.open(node.path, os.O_RDONLY)
    try:
        yield fd, pod.path
    finally:
        os.close(fd)
        pod.delete()
        node.delete()




def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("plugin", ["fan", "fan-ipam"])
def test_failed_add_closes_everything(bare_node, plugin: str, tmp_path) -> None:
    node_fd, pod_path = bare_node
    conf = {"cniVersion": "1.0.0", "name": "leak", "type": plugin, "overlay": "241.0.0.0/8",
            "underlay": "198.18.0.0/16", "dataDir": str(tmp_path)}
    if plugin == "fan-ipam":
        conf = {"cniVersion": "1.0.0", "name": "leak", "type": "bridge", "ipam": dict(conf, type="fan-ipam")}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "leak-1", "CNI_NETNS": pod_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent"}
    with entered(node_fd):
        run_local(plugin, env, json.dumps(conf).encode(), CallContext.standalone())  # warm: imports, caches
        before = _open_fds()
        for _ in range(5):
            out, code = run_local(plugin, env, json.dumps(conf).encode(), CallContext.standalone())
            assert code == 1 and json.loads(out)["code"] == 11, out  # no underlay address yet: try again later
        assert _open_fds() == before
