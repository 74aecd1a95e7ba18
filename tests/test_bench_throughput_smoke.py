"""The throughput benchmark's harness works end to end (tiny sizes, no thresholds on the numbers)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.benchrun import assert_run_left_nothing, run_benchmark

VARIANTS = ("underlay", "underlay6", "fan_direct", "fan", "fan6", "flannel", "hostgw")


@pytest.mark.kernel
def test_throughput_benchmark_runs_and_writes_results(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if not shutil.which("iperf3"):
        pytest.skip("iperf3 is not installed")
    data, text = run_benchmark(tmp_path, "throughput", "--tp-seconds", "1", "--tp-rounds", "1", "--tp-sizes", "2,3",
                               "--tp-node-up", "1")
    for key in ("kernel", "cpu_model", "cores", "python", "loadavg_1min_at_start"):
        assert key in data["machine"]
    assert data["method"]["rounds"] == 1 and data["method"]["seconds_per_run"] == 1

    tp = data["throughput"]
    for variant in VARIANTS:
        assert len(tp["runs"][variant]) == 1
        run = tp["runs"][variant][0]
        assert run["gbps"] > 0 and run["bytes"] > 0 and run["seconds"] > 0
        assert tp["median_gbps"][variant] > 0
    for key in ("fan_over_flannel", "fan_over_underlay", "flannel_over_underlay", "fan6_over_fan",
                "underlay6_over_underlay", "fan_direct_over_underlay", "fan_direct_over_hostgw",
                "hostgw_over_underlay"):
        assert tp["ratios"][key] > 0
    assert len(tp["ratios"]["fan_over_flannel_per_round"]) == 1 and len(tp["ratios"]["fan6_over_fan_per_round"]) == 1
    assert ":" in tp["paths"]["fan6"]["to"] and ":" in tp["paths"]["underlay6"]["to"], "IPv6 addresses"
    # The bytes went through each datapath's own tunnel device (IPv6 through the fan's).
    assert all(share >= 0.9 for v in ("fan", "fan6", "flannel") for share in tp["tunnel_rx_share"][v])
    # Fan direct and host-gw-style: on the receiving node's underlay interface (and not on a tunnel).
    assert all(share >= 0.9 for v in ("fan_direct", "hostgw") for share in tp["tunnel_rx_share"][v])
    assert len(tp["ratios"]["fan_direct_over_hostgw_per_round"]) == 1

    rows = {r["nodes"]: r for r in data["entries"]["rows"]}
    assert sorted(rows) == [2, 3]
    for n, row in rows.items():
        assert row["fan"]["node1"]["total"] > 0
        assert row["fan"]["min_total"] == row["fan"]["max_total"]
        assert set(row["fan_per_peer_entries_lab_check"].values()) == {0}
        # flannel-style: one route, one neighbour, one FDB entry per peer, plus the cni0 route.
        fl = row["flannel"]["node1"]
        assert (fl["routes"], fl["neighbours"], fl["fdb"]) == (n, n - 1, n - 1)
        # host-gw-style: one route per peer, plus the bridge's; fan direct: constant, no per-peer entries.
        assert (row["hostgw"]["node1"]["routes"], row["hostgw"]["node1"]["total"]) == (n, n)
        assert row["fan_direct"]["min_total"] == row["fan_direct"]["max_total"]
        assert set(row["fan_direct_per_peer_entries_lab_check"].values()) == {0}
    assert rows[2]["fan"]["node1"] == rows[3]["fan"]["node1"]
    assert rows[2]["fan_direct"]["node1"] == rows[3]["fan_direct"]["node1"]
    assert data["entries"]["fan_constant"] is True
    assert data["entries"]["flannel_entries_per_added_node"] == 3

    for mode in ("fresh", "again"):
        assert data["node_up"][mode]["wall_ms"]["n"] == 1
        assert data["node_up"][mode]["wall_ms"]["median"] > 0
    assert data["node_up"]["reported_as"] == {"fresh": ["set up"], "again": ["already up"]}
    assert isinstance(data["verdict"]["throughput_met"], bool)
    assert isinstance(data["verdict"]["direct_underlay_met"], bool)
    assert isinstance(data["verdict"]["direct_hostgw_met"], bool)

    assert "## Throughput, per-node state" in text
    assert data["machine"]["kernel"] in text
    assert "| 3 |" in text

    # Everything the run created is gone: namespaces, labs, processes.
    assert_run_left_nothing(data)
    assert not list(Path("/run/cni-fan-lab").glob(f"bfan-{data['run_id']}-*"))
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"bfan-{data['run_id']}-" in text:
            leftovers.append(text)
    assert not leftovers
