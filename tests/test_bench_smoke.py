"""The latency benchmark's harness works end to end (tiny sizes, no timing thresholds)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("reference", "fan-server", "fan-standalone")


@pytest.mark.kernel
def test_latency_benchmark_runs_and_writes_results(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    from bench import run as bench_run
    from bench.common import list_netns

    results, doc = tmp_path / "results", tmp_path / "benchmarks.md"
    code = bench_run.main(["--only", "latency", "--pods", "3", "--concurrent", "3", "--rounds", "1",
                           "--warmup", "1", "--results-dir", str(results), "--doc", str(doc)])
    assert code == 0

    files = sorted(results.glob("latency-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == "latency"
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
        for variant in ("fan-server", "fan-standalone"):
            for key in ("add", "del", "add_del"):
                assert data["ratios"][variant][mode][key] > 0
    for variant in VARIANTS:
        assert data["concurrent"][variant]["add_batch_wall"]["median"] > 0
    assert data["checks"]["server_fallbacks"] == 0
    assert data["checks"]["leftover_host_veths"] == 0

    text = doc.read_text()
    assert "| fan, plugin server running | sequential |" in text
    assert data["machine"]["kernel"] in text

    # Everything the run created is gone.
    assert not [n for n in list_netns() if n.startswith(f"bfan-{data['run_id']}-")]
    assert not list(Path("/tmp").glob(f"bfan-{data['run_id']}-*"))


def test_render_works_without_results(tmp_path):
    from bench import run as bench_run

    doc = tmp_path / "benchmarks.md"
    assert bench_run.main(["--render-only", "--results-dir", str(tmp_path / "none"), "--doc", str(doc)]) == 0
    assert "No results yet" in doc.read_text()
