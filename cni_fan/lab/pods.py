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
    return {"node": node.short, "netns": pod.netns, "container_id": pod.container_id, "ifname": POD_IF,
            **pod_addresses(result)}


def pod_addresses(result: dict) -> dict:
    """What lab.json records of an ADD result's `ips`: the IPv4 address (the
    first IPv4 entry), and the IPv6 one when there is one (`address6`, `cidr6`,
    `gateway6`; None when the plugin gave none)."""
    ips = [ip for ip in result.get("ips") or [] if isinstance(ip, dict) and ip.get("address")]
    first = next((ip for ip in ips if ":" not in ip["address"]), ips[0])
    six = next((ip for ip in ips if ":" in ip["address"]), None)
    return {"address": first["address"].split("/")[0], "cidr": first["address"], "gateway": first.get("gateway"),
            "address6": six["address"].split("/")[0] if six else None, "cidr6": six["address"] if six else None,
            "gateway6": six.get("gateway") if six else None}
