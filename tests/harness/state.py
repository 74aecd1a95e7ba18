"""What a test compares before and after: the leak and state diffs.

`state_diff` turns two snapshots (nested dicts and sets, as the labs'
`snapshot()` make them) into readable lines; the rest reads the plugin's
state on disk (dataDir), where a failed call must leave nothing behind.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def state_diff(before: Any, after: Any, where: str = "") -> list[str]:
    """Human-readable differences between two snapshots (nested dicts/sets)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            if key not in after:
                out.append(f"{where}/{key}: gone (was {before[key]!r})")
            elif key not in before:
                out.append(f"{where}/{key}: new ({after[key]!r})")
            else:
                out += state_diff(before[key], after[key], f"{where}/{key}")
        return out
    if isinstance(before, set) and isinstance(after, set):
        return [f"{where}: gone {x}" for x in sorted(before - after)] + \
               [f"{where}: new {x}" for x in sorted(after - before)]
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


RECORD_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def data_files(data_dir: Path) -> dict[str, bytes]:
    """Every file under dataDir and its content (relative path -> bytes)."""
    out = {}
    if not data_dir.exists():
        return out
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(data_dir))] = path.read_bytes()
    return out


def records(data_dir: Path, network: str) -> dict[str, dict]:
    """Allocation records of `network`: address -> its JSON."""
    root = data_dir / "networks" / network
    if not root.exists():
        return {}
    return {p.name: json.loads(p.read_text()) for p in root.iterdir() if RECORD_RE.match(p.name)}


def temp_files(data_dir: Path) -> list[str]:
    return [str(p) for p in data_dir.rglob(".tmp-*")]
