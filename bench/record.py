"""What a benchmark records: the machine, summary statistics, result files, markdown tables.

Pure or file-only (no namespaces, no processes of the lab): `bench.run`
renders docs/benchmarks.md with these without running anything.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from bench.common import REPO, RESULTS_DIR


# -- machine ------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _deb_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    """What the numbers were measured on."""
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus_usable = os.cpu_count() or 0
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    return {
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cores_usable": cpus_usable,
        "python": platform.python_version(),
        "pyroute2": _package_version("pyroute2"),
        "cni_fan": _package_version("cni-fan"),
        "git_commit": _git_commit(),
        "reference_plugins": "containernetworking-plugins " + _deb_version("containernetworking-plugins"),
        "loadavg_1min_at_start": round(load, 2),
    }


def machine_line(m: Mapping) -> str:
    return (f"kernel {m.get('kernel', '?')}, {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
            f"Python {m.get('python', '?')}, pyroute2 {m.get('pyroute2', '?')}")


def machine_brief(m: Mapping) -> str:
    """The machine in a figure's footer: kernel, CPU, cores and the load when the run started."""
    return (f"kernel {m.get('kernel', '?')}, {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
            f"load {m.get('loadavg_1min_at_start', '?')} at start")


def when(data: Mapping) -> str:
    """A result's date as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    return str(data.get("date", "?")).replace("T", " ").rstrip("Z")


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- statistics -----------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values_ms: Sequence[float]) -> dict:
    """median, p90 and friends of a list of milliseconds (rounded to 0.01 ms)."""
    if not values_ms:
        return {"n": 0}
    r = lambda v: round(v, 2)  # noqa: E731
    return {"n": len(values_ms), "median": r(percentile(values_ms, 50)), "p90": r(percentile(values_ms, 90)),
            "mean": r(sum(values_ms) / len(values_ms)), "min": r(min(values_ms)), "max": r(max(values_ms))}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b and b > 0 else None


# -- results --------------------------------------------------------------------

def envelope(name: str, title: str, started: datetime, run_id: str, machine_desc: Mapping) -> dict:
    """The fields every result starts with (its `run()` adds the rest); call it last, it times the run."""
    return {"benchmark": name, "schema": 1, "title": title, "date": iso(started),
            "duration_s": round((utc_now() - started).total_seconds()), "run_id": run_id, "machine": machine_desc}


def write_result(name: str, data: Mapping, results_dir: Path | str = RESULTS_DIR) -> Path:
    """bench/results/<name>-<UTC date>.json (a later run the same day replaces it)."""
    directory = Path(results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    date = str(data.get("date", iso(utc_now())))[:10]
    path = directory / f"{name}-{date}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_results(results_dir: Path | str = RESULTS_DIR) -> dict[str, list[dict]]:
    """{benchmark name: [results, newest first]} of every readable JSON file."""
    found: dict[str, list[dict]] = {}
    directory = Path(results_dir)
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"bench: skipping unreadable result {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        name = data.get("benchmark") or path.stem.rsplit("-", 3)[0]
        resolved = path.resolve()
        data["_file"] = str(resolved.relative_to(REPO)) if REPO in resolved.parents else str(path)
        found.setdefault(name, []).append(data)
    for runs in found.values():
        runs.sort(key=lambda d: str(d.get("date", "")), reverse=True)
    return found


# -- markdown -------------------------------------------------------------------

def yes_no(flag) -> str:
    return "yes" if flag else "no"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def history_table(runs: Sequence[Mapping], heading: str, header: Sequence[str], cells) -> str:
    """`render_history`'s section: `### heading` and one row per stored result, newest first, its date
    and machine before `cells(result)`; empty when there is only one result."""
    if len(runs) < 2:
        return ""
    rows = [[str(d.get("date", "?"))[:16].replace("T", " "), machine_line(d.get("machine", {})), *cells(d)]
            for d in runs]
    return f"### {heading}\n\n" + md_table(["date (UTC)", "machine", *header], rows) + "\n"
