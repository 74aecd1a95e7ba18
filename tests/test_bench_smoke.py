"""The latency benchmark's harness works end to end (tiny sizes, no timing thresholds)."""
from __future__ import annotations

import os

import pytest

from harness.benchrun import assert_run_left_nothing, run_benchmark

VARIANTS = ("reference", "fan-server", "fan-standalone", "fan-dual-stack")


@pytest.mark.kernel
def test_latency_benchmark_runs_and_writes_results(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    data, text = run_benchmark(tmp_path, "latency", "--pods", "3", "--concurrent", "3", "--rounds", "1",
                               "--warmup", "1")
    for key in ("kernel", "cpu_model", "cores", "python", "pyroute2"):
        assert data["machine"][key]
    assert data["method"]["pods_sequential"] == 3 and data["method"]["concurrent"] == 3
    for mode in ("sequential", "concurrent"):
        for variant in VARIANTS:
            stats = data[mode][variant]
            for verb in ("add", "del"):
                assert stats[verb]["n"] == 3
                assert 0 < stats[verb]["median"] <= stats[verb]["p90"] <= stats[verb]["max"]
            assert stats["add_del_median_sum"] > 0
        for variant in ("fan-server", "fan-standalone", "fan-dual-stack"):
            for key in ("add", "del", "add_del"):
                assert data["ratios"][variant][mode][key] > 0
        for key in ("add", "del", "add_del"):
            assert data["ratios"]["dual_stack_vs_ipv4"][mode][key] > 0
    for variant in VARIANTS:
        assert data["concurrent"][variant]["add_batch_wall"]["median"] > 0
    assert data["checks"]["server_fallbacks"] == 0
    assert data["checks"]["leftover_host_veths"] == 0

    assert "| fan, plugin server running | sequential |" in text
    assert "Dual-stack against IPv4-only" in text
    assert data["machine"]["kernel"] in text

    assert_run_left_nothing(data)


def test_render_works_without_results(tmp_path):
    from bench import run as bench_run

    doc = tmp_path / "benchmarks.md"
    assert bench_run.main(["--render-only", "--results-dir", str(tmp_path / "none"), "--doc", str(doc)]) == 0
    assert "No results yet" in doc.read_text()
