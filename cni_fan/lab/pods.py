"""Pods of the lab, added and asked about with the real `fan` plugin.

The plugin is called as a runtime calls it: the installed binary, in the
node's namespace, with the CNI environment and the runtime config (the
conflist's entry plus its name and version) on stdin.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cni_fan.lab import netns
from cni_fan.lab.errors import LabError
from cni_fan.lab.processes import in_netns, lab_env
from cni_fan.lab.topology import POD_IF, LabSpec, Node, Pod, cni_env, runtime_config

PLUGIN_TIMEOUT = 60.0


def run_plugin(spec: LabSpec, node: Node, pod: Pod, command: str = "ADD",
               timeout: float = PLUGIN_TIMEOUT) -> tuple[int, dict | None, str]:
    """Call the installed `fan` as a runtime does: in the node's namespace,
    with the CNI environment and the runtime config on stdin.
    Returns (exit code, decoded stdout or None, stderr)."""
    conflist = json.loads(Path(node.conflist_path).read_text())
    stdin = json.dumps(runtime_config(conflist)).encode()
    plugin = f"{spec.bin_dir}/{conflist['plugins'][0]['type']}"
    try:
        proc = subprocess.run(in_netns(node.netns, [plugin]), input=stdin, capture_output=True, timeout=timeout,
                              env=lab_env(cni_env(command, pod, spec.bin_dir)))
    except subprocess.TimeoutExpired:
        return 124, None, f"{command} took longer than {timeout:.0f} s"
    out = proc.stdout.decode(errors="replace")
    try:
        decoded = json.loads(out) if out.strip() else None
    except ValueError:
        decoded = {"raw": out}
    return proc.returncode, decoded, proc.stderr.decode(errors="replace")


def add_pod(spec: LabSpec, node: Node, pod: Pod) -> dict:
    """The pod's namespace, then `fan` ADD; what lab.json records of the pod."""
    netns.create(pod.netns)
    code, result, err = run_plugin(spec, node, pod, "ADD")
    if code != 0 or not isinstance(result, dict) or not result.get("ips"):
        raise LabError(f"`fan` ADD for {pod.netns} on {node.netns} failed (exit {code}): "
                       f"{json.dumps(result) if result is not None else ''} {err.strip()[-800:]}".rstrip())
    address = result["ips"][0]["address"]
    return {"node": node.short, "netns": pod.netns, "container_id": pod.container_id, "ifname": POD_IF,
            "address": address.split("/")[0], "cidr": address, "gateway": result["ips"][0].get("gateway")}
