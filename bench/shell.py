"""Shell-outs of the benchmarks: `ip`, `bridge` and `tc` in a namespace, with errors as BenchError."""
from __future__ import annotations

import json
import subprocess

from bench.common import BenchError

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run_tool(argv: list[str], stdin: str | None = None, timeout: float = 120.0) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])}: {(proc.stderr.strip() or proc.stdout.strip())[-500:]}")
    return proc.stdout


def batch(tool: str, ns: str, lines: list[str]) -> None:
    if lines:
        run_tool([tool, "-n", ns, "-batch", "-"], stdin="".join(line + "\n" for line in lines))


def json_of(tool: str, ns: str, *args: str) -> list[dict]:
    out = run_tool([tool, "-j", "-n", ns, *args]).strip()
    if not out:
        return []
    data = json.loads(out)
    return data if isinstance(data, list) else []
