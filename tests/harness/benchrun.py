"""Running one benchmark for real through `bench.run`, for the benchmarks' smoke tests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.system import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_benchmark(tmp_path: Path, name: str, *args: str) -> tuple[dict, str]:
    """`bench.run --only NAME ARGS` into `tmp_path`: its one result and the page rendered from it."""
    from bench import run as bench_run

    results, doc = tmp_path / "results", tmp_path / "benchmarks.md"
    assert bench_run.main(["--only", name, *args, "--results-dir", str(results), "--doc", str(doc)]) == 0
    files = sorted(results.glob(f"{name}-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == name
    return data, doc.read_text()


def assert_run_left_nothing(data: dict) -> None:
    """No namespace and no temporary directory of the run survives it."""
    from bench.common import list_netns

    assert not [n for n in list_netns() if n.startswith(f"bfan-{data['run_id']}-")]
    assert not list(Path("/tmp").glob(f"bfan-{data['run_id']}-*"))
