"""The fan bridge with hundreds of pods on one node (real kernel, `cni-fan serve`).

- 200 pods: one pod resolves and pings every other pod; no other pod gets a
  single broadcast (the bridge answers ARP on the requester's port).
- 1,000 pods on a /18 slice (overlay 241.0.0.0/8 over underlay
  198.18.0.0/22): ADD all in parallel batches, check a sample, DEL all,
  nothing left behind (no veth, no neighbour or FDB entry, no tc filter,
  no allocation record). Marked slow, and in the default run: on the
  2-core test machine it takes 80 to 140 s when the machine is otherwise
  quiet (ADD of 1,000 pods 50 to 67 s, DEL 35 to 52 s), 5.5 minutes when
  other test runs share the cores. `CNI_FAN_SCALE=0` skips it,
  `CNI_FAN_SCALE_PODS=N` changes its size.

Namespaces are named `tpg-<hex>-...` and always removed.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from cni_fan.net import rtnl_links
from cni_fan.net.rtnl import Rtnl
from harness.podlab import Lab, Pod
from harness.system import inside, run

SCALE_PODS = int(os.environ.get("CNI_FAN_SCALE_PODS", "1000"))
PARALLEL = 8


def _ping_each(lab: Lab, asker: Pod, targets: list[Pod]) -> list[str]:
    """Ping every target once from `asker` (one shell in the pod); returns the failures."""
    script = "for ip in " + " ".join(p.ip for p in targets) + \
        "; do ping -n -q -c 1 -W 2 $ip >/dev/null 2>&1 || echo $ip; done"
    return lab.in_pod(asker, "sh", "-c", script, timeout=600).stdout.split()


@pytest.mark.kernel
def test_200_pods_one_resolves_all_others_see_no_broadcast(tmp_path: Path):
    lab = Lab(tmp_path)
    captures: list[subprocess.Popen] = []
    try:
        pods = lab.add_pods(200, parallel=PARALLEL)
        asker, others = pods[0], pods[1:]
        run(["ip", "-n", asker.name, "neigh", "flush", "dev", "eth0"])
        watched = random.Random(5).sample(others, 4)
        for pod in watched:  # broadcast frames the node delivers to these pods
            captures.append(subprocess.Popen(
                ["nsenter", f"--net={lab.node_path}", "tcpdump", "-n", "--immediate-mode", "-Q", "out", "-i", pod.veth, "-U", "-w",
                 str(tmp_path / f"{pod.veth}.pcap"), "ether", "broadcast", "or", "ether", "multicast"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for proc in captures:  # until each tcpdump is capturing
            line = b""
            while b"listening on" not in line:
                assert proc.poll() is None, proc.stderr.read()
                line = proc.stderr.readline()
        before = lab.veth_tx(p.veth for p in others)
        failures = _ping_each(lab, asker, others)
        after = lab.veth_tx(p.veth for p in others)
        # The captures' positive control: a broadcast the node itself sends reaches every pod.
        lab.in_node("ping", "-b", "-c", "1", "-W", "1", "241.1.10.255", check=False)
        time.sleep(0.5)
        for proc in captures:
            proc.terminate()
            proc.wait(timeout=10)
        assert not failures, f"{len(failures)} pods did not answer: {failures[:10]}"
        delivered = {p.veth: after[p.veth] - before[p.veth] for p in others}
        # Each pod gets the echo request and the bridge's answer to its own ARP
        # request for the asker: 2 frames. Flooding would add ~198 per pod.
        assert max(delivered.values()) <= 2, sorted(delivered.values())[-10:]
        assert sum(delivered.values()) <= 2 * len(others)
        for pod in watched:
            seen = run(["tcpdump", "-n", "-r", str(tmp_path / f"{pod.veth}.pcap")], check=False).stdout.splitlines()
            assert len(seen) == 1 and "241.1.10.255" in seen[0], f"{pod.veth} received:\n" + "\n".join(seen[:10])
        lab.del_pods(pods, parallel=PARALLEL)
        assert not lab.host_veths() and not lab.our_neighbours() and not lab.records()
    finally:
        for proc in captures:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lab.close()


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CNI_FAN_SCALE") == "0", reason="CNI_FAN_SCALE=0")
def test_1000_pods_add_check_del_nothing_left(tmp_path: Path):
    lab = Lab(tmp_path, underlay_address="198.18.1.10/22", underlay="198.18.0.0/22")
    timings = {}
    try:
        started = time.monotonic()
        pods = lab.add_pods(SCALE_PODS, parallel=PARALLEL)
        timings["add"] = time.monotonic() - started
        assert len({p.ip for p in pods}) == SCALE_PODS
        assert len(lab.host_veths()) == SCALE_PODS
        neighbours = lab.our_neighbours()
        assert {p.ip: p.mac for p in pods} == neighbours
        fdb = lab.static_fdb()
        assert all(fdb.get(p.mac) == p.veth for p in pods)
        rng = random.Random(7)
        sample = rng.sample(pods, 12)
        for pod in sample:
            filters = run(["tc", "-n", lab.node, "filter", "show", "dev", pod.veth, "ingress"]).stdout
            assert "cni-fan-guard" in filters, filters
        gateway = run(["ip", "-j", "-n", lab.node, "-4", "addr", "show", lab.bridge_name()]).stdout
        gateway_ip = json.loads(gateway)[0]["addr_info"][0]["local"]
        for pod in sample[:6]:
            failures = _ping_each(lab, pod, rng.sample(pods, 5))
            assert not failures, (pod.name, failures)
            assert lab.ping(pod, gateway_ip)
        assert lab.ping(None, sample[-1].ip)
        started = time.monotonic()
        lab.del_pods(pods, parallel=PARALLEL)
        timings["del"] = time.monotonic() - started
        assert not lab.host_veths(), "host veths left"
        assert not lab.our_neighbours(), "neighbour entries left on the bridge"
        assert not lab.static_fdb(), "static FDB entries left"
        assert not lab.records(), "allocation records left"
        with inside(lab.node_path), Rtnl() as rtnl:
            index = rtnl_links.get_link(rtnl, lab.bridge_name()).index
            assert not rtnl_links.port_links(rtnl, index), "ports left on the bridge"
        assert lab.server_alive()
        print(f"\n{SCALE_PODS} pods: ADD {timings['add']:.1f} s, DEL {timings['del']:.1f} s "
              f"({PARALLEL} calls at a time through the plugin server)")
    finally:
        lab.close()
