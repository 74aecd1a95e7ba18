"""Parallel ADDs and DELs, and ADDs killed half-way.

Runtimes run ADDs for different pods at once and kill plugins that take
too long; the plugin's shared state (allocation records, the bridge) must
come out right either way. Both modes: in the `fan` process itself and
through `cni-fan serve` (where the runtime can only kill the thin client:
the call it handed over finishes in the server's child, and DEL or GC
must still leave nothing behind).
"""
from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from harness.netlab import (Mode, Netns, cni_env, cnitool_argv, cnitool_container_id, cnitool_env, conflist,
                            fan_plugin_conf, finish, libcni_cache_entries, netconf, run_plugin, start_plugin,
                            write_conflist)
from harness.state import records, state_diff, temp_files

pytestmark = pytest.mark.kernel

NET = "fannet"
SLICE = IPNetwork("241.1.10.0/24")
GATEWAY = "241.1.10.1"
BRIDGE = "fan-241-1-10"
PARALLEL = 50
KILL_ITERATIONS = 20
MAX_DELAY = 0.3


def _all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        out.append((proc.returncode, stdout.decode(), stderr.decode()))
    return out


def test_parallel_adds_then_dels(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    """50 cnitool processes at once on a node without a bridge yet, then 50 DELs at once."""
    node, data, conf_dir = fan_node, tmp_path / "data", tmp_path / "net.d"
    node.ip("link", "del", BRIDGE, check=False)  # the first ADDs race to create it
    write_conflist(conf_dir, conflist(NET, "1.0.0", fan_plugin_conf(data, plugin_mode.socket)))
    netnses = [pods.new() for _ in range(PARALLEL)]
    env = cnitool_env(conf_dir)

    procs = [subprocess.Popen(cnitool_argv(node, "add", NET, pod.path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pod in netnses]
    outcomes = _all(procs)
    failed = [(pod.name, o) for pod, o in zip(netnses, outcomes) if o[0] != 0]
    assert not failed, f"{len(failed)} of {PARALLEL} parallel ADDs failed, first: {failed[0]}"

    results = [json.loads(stdout) for _, stdout, _ in outcomes]
    addresses = [r["ips"][0]["address"] for r in results]
    assert len(set(addresses)) == PARALLEL, "two pods got the same address"
    for cidr in addresses:
        ip = IPNetwork(cidr)
        assert ip.prefixlen == 24 and ip.ip in SLICE and ip.ip != IPAddress(GATEWAY)
    held = records(data, NET)
    assert len(held) == PARALLEL
    for pod, cidr in zip(netnses, addresses):
        assert held[cidr.split("/")[0]]["containerID"] == cnitool_container_id(pod.path)
        assert pod.ipv4_addrs("eth0") == {cidr}
    veths = {r["interfaces"][0]["name"] for r in results}
    assert len(veths) == PARALLEL and node.ports_of(BRIDGE) == veths
    assert [name for name, link in node.links().items() if link.get("linkinfo", {}).get("info_kind") == "bridge"] \
        == [BRIDGE], "parallel ADDs created more than one bridge"
    assert f"{GATEWAY}/24" in node.ipv4_addrs(BRIDGE)
    assert netnses[0].ping(addresses[-1].split("/")[0]) and netnses[-1].ping(GATEWAY)

    procs = [subprocess.Popen(cnitool_argv(node, "del", NET, pod.path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pod in netnses]
    outcomes = _all(procs)
    failed = [(pod.name, o) for pod, o in zip(netnses, outcomes) if o[0] != 0]
    assert not failed, f"{len(failed)} of {PARALLEL} parallel DELs failed, first: {failed[0]}"
    assert records(data, NET) == {}, "DELs left allocation records"
    assert node.ports_of(BRIDGE) == set(), "DELs left veths on the bridge"
    assert not [n for n in node.links() if n in veths]
    assert not temp_files(data)
    for pod in netnses:
        node.settle()  # DEL deletes the cut-off veth (and so eth0) after answering
        assert pod.link("eth0") is None
        assert not libcni_cache_entries(cnitool_container_id(pod.path))


def test_sigkill_during_add(fan_node: Netns, plugin_mode: Mode, pods, tmp_path: Path) -> None:
    """ADDs killed with SIGKILL at random moments, then DEL or GC: nothing is left behind.

    A pod that was there before ("survivor") must come through untouched.
    Half the delays are uniform over 0-300 ms; the other half fall just
    before the moment a whole ADD takes on this machine, where the kill
    lands in the netlink work rather than in the interpreter's start-up.
    """
    node, data = fan_node, tmp_path / "data"
    conf = netconf(NET, "1.1.0", fan_plugin_conf(data, plugin_mode.socket))  # 1.1.0: GC allowed
    survivor = pods.new()
    out = run_plugin(node, cni_env("ADD", "survivor", survivor.path), conf)
    assert out.code == 0, str(out)
    survivor_addr = out.json["ips"][0]["address"].split("/")[0]
    # How long a whole ADD takes here, once the bridge exists (best of two).
    add_time = MAX_DELAY
    for _ in range(2):
        calibration = pods.new()
        started = time.monotonic()
        out = run_plugin(node, cni_env("ADD", "calibration", calibration.path), conf)
        add_time = min(add_time, time.monotonic() - started)
        assert out.code == 0, str(out)
        assert run_plugin(node, cni_env("DEL", "calibration", calibration.path), conf).code == 0
        calibration.delete()
    valid = [{"containerID": "survivor", "ifname": "eth0"}]
    baseline = node.snapshot()

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    killed = 0
    for i in range(KILL_ITERATIONS):
        pod, cid = pods.new(), f"killed-{i}"
        if i % 2:
            delay = min(MAX_DELAY, max(0.0, rng.uniform(add_time - 0.08, add_time)))
        else:
            delay = rng.uniform(0, MAX_DELAY)
        proc = start_plugin(node, cni_env("ADD", cid, pod.path), conf)
        time.sleep(delay)
        proc.kill()
        # Wait for the process only, as a runtime does: in server mode the
        # server's child holds the client's stderr until the call it took
        # over ends, so reading stderr to its end would wait for that call.
        proc.wait()
        killed += proc.returncode == -9
        how = "DEL" if i % 3 != 2 else "GC"
        where = f"iteration {i} (seed {seed}, {plugin_mode.name}, kill after {delay * 1000:.0f} ms, " \
                f"exit {proc.returncode}, clean-up by {how})"
        if how == "DEL":
            out = run_plugin(node, cni_env("DEL", cid, pod.path), conf)  # no prevResult: ADD never answered
        else:
            out = run_plugin(node, cni_env("GC", ifname=""), dict(conf, **{"cni.dev/valid-attachments": valid}))
        assert out.code == 0, f"{where}: {out}"
        finish(proc)  # server mode: the call the server took over may still run; let it end, then look

        held = records(data, NET)
        assert list(held) == [survivor_addr], f"{where}: records left {held}"
        assert not (diff := state_diff(baseline, node.snapshot())), f"{where}: node changed: {diff}"
        assert set(pod.links()) == {"lo"}, f"{where}: the pod still has {set(pod.links())}"
        pod.delete()

    assert killed > 0, "no ADD was killed: the test exercised nothing"
    out = run_plugin(node, cni_env("GC", ifname=""), dict(conf, **{"cni.dev/valid-attachments": valid}))
    assert out.code == 0, str(out)
    assert not temp_files(data), "killed writers left temp files that GC did not sweep"
    assert survivor.ping(GATEWAY), "the survivor lost its connectivity"

    # The node still works: a new pod gets an address and reaches the survivor.
    late = pods.new()
    out = run_plugin(node, cni_env("ADD", "late", late.path), conf)
    assert out.code == 0, str(out)
    assert late.ping(survivor_addr)
    for cid, pod in (("late", late), ("survivor", survivor)):
        out = run_plugin(node, cni_env("DEL", cid, pod.path), conf)
        assert out.code == 0, str(out)
    assert records(data, NET) == {} and node.ports_of(BRIDGE) == set()
