"""A runtime's view of one network: cnitool for the versions Debian's libcni
knows, the plugin run directly (CNI environment and stdin) for 1.1.0."""
from __future__ import annotations

import json
from pathlib import Path

from harness.netlab import (Netns, Outcome, Shim, cni_env, cnitool, cnitool_container_id, conflist, netconf,
                            run_plugin, write_conflist)


class Runtime:
    """ADD/CHECK/DEL of one network, by cnitool (< 1.1.0) or directly (1.1.0)."""

    def __init__(self, node: Netns, version: str, plugin: dict, tmp: Path, network: str = "fannet") -> None:
        self.node = node
        self.version = version
        self.network = network
        self.direct = version == "1.1.0"  # Debian's libcni knows no 1.1.0
        self.shim = Shim(tmp / "shim")
        self.netconf = netconf(network, version, plugin)
        self.conf_dir = tmp / "net.d"
        write_conflist(self.conf_dir, conflist(network, version, plugin))
        self.launched: set[int] = set()

    def container_id(self, pod: Netns) -> str:
        return cnitool_container_id(pod.path)

    def _direct(self, command: str, pod: Netns, prev: dict | None) -> Outcome:
        conf = dict(self.netconf)
        if prev is not None:
            conf["prevResult"] = prev
        out = run_plugin(self.node, cni_env(command, self.container_id(pod), pod.path), conf)
        self.launched.add(out.pid)
        return out

    def call(self, verb: str, pod: Netns, prev: dict | None = None) -> Outcome:
        if self.direct:
            return self._direct(verb.upper(), pod, prev)
        out = cnitool(self.node, verb, self.network, pod.path, self.conf_dir, path=self.shim.path)
        self.launched |= self.shim.pids()
        return out

    def raw_add_output(self, out: Outcome) -> dict:
        """What the plugin itself printed (cnitool prints libcni's re-encoding)."""
        if self.direct:
            return out.json
        (raw,) = [stdout for _, command, stdout in self.shim.calls()
                  if command == "ADD" and json.loads(stdout).get("ips") and
                  json.loads(stdout)["ips"][0]["address"] == out.json["ips"][0]["address"]]
        return json.loads(raw)
