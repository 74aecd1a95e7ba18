"""The lab's state file (lab.json): what `lab up` built, for `check` and `down`.

Written atomically (a temporary file, then rename) at the start of `up`
(phase "building") and at its end (phase "up", with the pods' addresses).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cni_fan.lab import netns
from cni_fan.lab.errors import LabError
from cni_fan.lab.topology import LAB_ROOT, LabSpec, check_prefix, lab_namespace_re


def lab_root(prefix: str) -> Path:
    """The directory of lab `prefix`: its binaries, node files and lab.json."""
    return Path(LAB_ROOT) / check_prefix(prefix)


def load_state(prefix: str) -> dict:
    """lab.json of lab `prefix`; a LabError that says how to start one if it is missing."""
    path = lab_root(prefix) / "lab.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab with prefix {prefix!r} ({path} is missing); start one with "
                       f"`cni-fan lab up --prefix {prefix}`") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {path}: {exc}") from None


def save_state(spec: LabSpec, phase: str, pods: dict[str, dict] | None = None) -> None:
    """Write lab.json: the spec, the phase, each node's facts and the pods added so far."""
    state = {"spec": spec.to_dict(), "phase": phase, "pods": pods or {},
             "nodes": {n.short: {"netns": n.netns, "address": str(n.address), "slice": str(n.slice),
                                 "gateway": str(n.gateway), "conflist": n.conflist_path, "log": n.log_path}
                       for n in spec.all_nodes}}
    path = Path(spec.state_file)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def existing_parts(prefix: str) -> list[str]:
    """What of a lab with `prefix` is present: namespaces and its directory."""
    pattern = lab_namespace_re(prefix)
    found = [n for n in netns.list_namespaces() if pattern.match(n)]
    if lab_root(prefix).exists():
        found.append(str(lab_root(prefix)))
    return found
