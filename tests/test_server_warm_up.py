"""The plugin server's idle children warm up before they wait for a call (server.warm_up).

A forked child copies each page of the server's memory it writes to, and
CPython writes to every object it uses; warming up does that before the
call arrives. Counted in page faults of the same call (a DEL of an
attachment never added, in a namespace of its own), not in time: a cold
child and a warmed one, forked from the same preloaded process.
"""
from __future__ import annotations

import json
import sys

import pytest

from harness.netlab import Netns

pytestmark = pytest.mark.kernel

CHILD = r'''
import json, os, resource, sys
from cni_fan import server
from cni_fan.cni.call import CallContext
from cni_fan.runner import run_local

server.preload()
config = json.dumps({"cniVersion": "1.0.0", "name": "warm", "type": "fan", "overlay": "241.0.0.0/8",
                     "underlay": "198.18.0.0/16", "dataDir": sys.argv[1]}).encode()
env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "never-added", "CNI_IFNAME": "eth0", "CNI_PATH": "/nowhere"}
faults = {}
for warm in (False, True):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if warm:
                server.warm_up()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with open(os.devnull, "w") as sink:
                out, code = run_local("fan", env, config, CallContext(log_stream=sink))
            os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before).encode())
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the call failed in the {'warm' if warm else 'cold'} child"
    faults["warm" if warm else "cold"] = int(os.read(r, 64))
    os.close(r)
print(json.dumps(faults))
'''


def test_a_warmed_child_copies_far_fewer_pages_during_a_call(tmp_path) -> None:
    ns = Netns("warm")
    try:
        proc = ns.run(sys.executable, "-c", CHILD, str(tmp_path / "data"), check=False)
    finally:
        ns.delete()
    assert proc.returncode == 0, proc.stderr
    faults = json.loads(proc.stdout)
    assert faults["warm"] * 2 < faults["cold"], f"page faults during one DEL: {faults}"


def test_an_idle_child_skips_the_warm_up_when_a_call_already_waits(tmp_path) -> None:
    """In a burst (more calls at once than idle children) the waiting call goes first."""
    import socket

    from cni_fan.server import call_waiting

    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(path)
        listening.listen(4)
        assert not call_waiting(listening)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            assert call_waiting(listening)
            conn, _ = listening.accept()
            conn.close()
        assert not call_waiting(listening)
