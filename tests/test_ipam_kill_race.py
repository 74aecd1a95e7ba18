"""`fan-ipam` killed mid-ADD, then DEL: the address must not leak.

Under an outer plugin (the reference `bridge`), a runtime that times out
kills the outer plugin and with it the `fan-ipam` client; with the plugin
server the call itself goes on in the server's child. If the runtime's DEL
ran before that ADD reached its allocation, the ADD would reserve an
address nobody releases. ADD and DEL of one attachment are serialized and
an ADD whose client is gone gives up, so the DEL always wins or waits.

The interleaving is forced, not hoped for: the test holds the network's
allocation lock, finds the server child whose ADD waits for it (in
/proc/locks), stops it (SIGSTOP), kills the client, sends the DEL and lets
the lock go while the ADD is still stopped. Without serialization the DEL
ran there and then and the resumed ADD leaked its address.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.netlab import Mode, Netns, cni_env, finish, run_plugin, start_plugin
from harness.state import records

pytestmark = pytest.mark.kernel

NET = "ipamrace"
ROUNDS = 4


def _conf(data: Path, socket: str) -> dict:
    return {"cniVersion": "1.0.0", "name": NET, "type": "bridge",
            "ipam": {"type": "fan-ipam", "overlay": "242.0.0.0/8", "underlay": "198.18.0.0/16",
                     "dataDir": str(data), "agentSocket": socket}}


def test_del_after_a_killed_add_leaves_no_record(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    if plugin_mode.server is None:
        pytest.skip("without the plugin server, killing the client kills the call itself")
    node, data = fan_node, tmp_path / "data"
    conf = _conf(data, plugin_mode.socket)
    netns = pods.new().path  # fan-ipam never enters it, but ADD must name one
    warm = run_plugin(node, cni_env("ADD", "warm-up", netns), conf, plugin="fan-ipam")  # creates the store
    assert warm.code == 0, str(warm)
    lock_path = data / "networks" / NET / "lock"
    for i in range(ROUNDS):
        cid = f"killed-{i}"
        fd = os.open(lock_path, os.O_RDWR)
        stopped: int | None = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            add = start_plugin(node, cni_env("ADD", cid, netns), conf, plugin="fan-ipam")
            stopped = _waiter_on(lock_path, exclude=set())
            os.kill(stopped, signal.SIGSTOP)
            add.kill()
            add.wait()
            delete = start_plugin(node, cni_env("DEL", cid, netns), conf, plugin="fan-ipam")
            time.sleep(0.5)  # the DEL now waits: for the allocation lock, or (fixed) for the attachment
        finally:
            os.close(fd)  # the ADD is still stopped
        try:
            delete.wait(timeout=2)  # fixed: it waits for the ADD it must follow
        except subprocess.TimeoutExpired:
            pass
        finally:
            os.kill(stopped, signal.SIGCONT)
        out = finish(delete)
        assert out.code == 0, f"round {i}: {out}"
        finish(add)
        deadline = time.monotonic() + 10  # the killed ADD's call may still be ending in the server
        while time.monotonic() < deadline and _attachment_busy(data):
            time.sleep(0.1)
        left = {a: r for a, r in records(data, NET).items() if r["containerID"] == cid}
        assert not left, f"round {i}: the killed ADD's address leaked: {left}"
    assert [r["containerID"] for r in records(data, NET).values()] == ["warm-up"]
    assert run_plugin(node, cni_env("DEL", "warm-up", netns), conf, plugin="fan-ipam").code == 0
    assert records(data, NET) == {}


def _waiter_on(path: Path, exclude: set[int], timeout: float = 10) -> int:
    """The pid of a process blocked on a lock of `path` (from /proc/locks)."""
    inode = os.stat(path).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields:
                pid, where = int(fields[5]), fields[6]
                if int(where.split(":")[2]) == inode and pid not in exclude:
                    return pid
        time.sleep(0.02)
    raise AssertionError(f"no process waited for {path} within {timeout} s")


def _attachment_busy(data: Path) -> bool:
    """Whether any server child still holds an attachment lock of the network."""
    try:
        inode = os.stat(data / "networks" / NET / "attachments.lock").st_ino
    except FileNotFoundError:
        return False
    return any(line.split()[-3].split(":")[2] == str(inode)
               for line in Path("/proc/locks").read_text().splitlines() if "POSIX" in line)


def test_an_add_whose_client_died_while_it_waited_for_the_lock_changes_nothing(
        fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    """The call context's `client_alive`: the ADD gets its attachment's lock only after the runtime
    killed its client, so it gives up (the runtime's DEL has run or will run, and must find nothing)."""
    if plugin_mode.server is None:
        pytest.skip("without the plugin server, killing the client kills the call itself")
    from cni_fan.attach_lock import locked

    node, data = fan_node, tmp_path / "data"
    conf = _conf(data, plugin_mode.socket)
    netns = pods.new().path
    warm = run_plugin(node, cni_env("ADD", "warm-up", netns), conf, plugin="fan-ipam")  # creates the store
    assert warm.code == 0, str(warm)
    state_dir = data / "networks" / NET
    with locked(str(state_dir), None):  # as a GC holds it: every attachment waits
        add = start_plugin(node, cni_env("ADD", "gone-1", netns), conf, plugin="fan-ipam")
        child = _waiter_on(state_dir / "attachments.lock", exclude=set())
        add.kill()
        add.wait()
    deadline = time.monotonic() + 30  # the child now gets the lock, sees its client gone and ends
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and not _zombie(child):
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or _zombie(child), "the server's child did not end"
    assert [r["containerID"] for r in records(data, NET).values()] == ["warm-up"]
    assert run_plugin(node, cni_env("DEL", "warm-up", netns), conf, plugin="fan-ipam").code == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False
