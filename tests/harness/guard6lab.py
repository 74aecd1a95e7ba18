"""A fan bridge with dual-stack pods and the real port guard, without the plugin.

The plugin does not give pods IPv6 yet, so this lab does what its ADD
will do for the guard's part: a node namespace with the fan bridge (the
gateway MAC, 241.1.10.1/24 and fd50:0:0:1c::1/64 without DAD), pods with
a veth pair, both addresses (IPv6 without DAD) and default routes, and
then `portguard.install` with `pod_ip6` and `gateway6`. Namespaces are
named `tg6-<hex>-...` and removed by `close`, also after a failure.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from cni_fan.net import portguard
from harness.podlab import NETNS_DIR, ip_batch, list_netns
from harness.system import inside, run

GATEWAY, GATEWAY6 = "241.1.10.1", "fd50:0:0:1c::1"
BRIDGE = "fanbr6"


@dataclass
class Pod6:
    name: str
    veth: str
    ip: str
    ip6: str
    mac: str = ""

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)


def guard_cfg(suppress: bool = True, spoof: bool = True) -> SimpleNamespace:
    """What `install` reads of a FanConfig."""
    return SimpleNamespace(neigh_suppress=suppress, anti_spoof=spoof)


def wait_for(check: Callable[[], bool], seconds: float) -> bool:
    """Poll `check` until true or `seconds` pass (setup waits, never asserted on as a time)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


class Guard6Lab:
    def __init__(self) -> None:
        self.prefix = f"tg6-{secrets.token_hex(3)}-"
        self.node = self.prefix + "node"
        self.node_path = str(NETNS_DIR / self.node)
        self.pods: list[Pod6] = []
        try:
            ip_batch([f"netns add {self.node}"])
            gw_mac = portguard.gateway_mac(GATEWAY)
            ip_batch(["link set lo up", f"link add {BRIDGE} address {gw_mac} type bridge",
                      f"addr add {GATEWAY}/24 dev {BRIDGE}", f"addr add {GATEWAY6}/64 dev {BRIDGE} nodad",
                      f"link set {BRIDGE} up"], netns=self.node)
        except BaseException:
            self.close()
            raise

    def bridge_index(self) -> int:
        return json.loads(self.ip("-j", "link", "show", BRIDGE).stdout)[0]["ifindex"]

    def ip(self, *args: str, check: bool = True):
        return run(["ip", "-n", self.node, *args], check=check)

    def add_pod(self, index: int, install: bool = True, ip6: bool = True) -> Pod6:
        pod = Pod6(name=f"{self.prefix}p{index}", veth=f"tg6v{index}", ip=f"241.1.10.{index}",
                   ip6=f"fd50:0:0:1c::{index:x}")
        ip_batch([f"netns add {pod.name}"])
        self.pods.append(pod)
        ip_batch([f"link add {pod.veth} type veth peer name eth0 netns {pod.name}",
                  f"link set {pod.veth} master {BRIDGE} up"], netns=self.node)
        ip_batch(["link set lo up", f"addr add {pod.ip}/24 dev eth0", f"addr add {pod.ip6}/64 dev eth0 nodad",
                  "link set eth0 up", f"route add default via {GATEWAY}", f"route add ::/0 via {GATEWAY6}"],
                 netns=pod.name)
        pod.mac = json.loads(run(["ip", "-j", "-n", pod.name, "link", "show", "eth0"]).stdout)[0]["address"]
        if install:
            self.install(pod, ip6=ip6)
        return pod

    def install(self, pod: Pod6, cfg: SimpleNamespace | None = None, ip6: bool = True) -> None:
        veth_index = json.loads(self.ip("-j", "link", "show", pod.veth).stdout)[0]["ifindex"]
        fd = os.open(pod.path, os.O_RDONLY)
        try:
            with inside(self.node_path):
                portguard.install(cfg or guard_cfg(), bridge_index=self.bridge_index(), veth_index=veth_index,
                                  pod_netns_fd=fd, pod_ifname="eth0", pod_ip=f"{pod.ip}/24", pod_mac=pod.mac,
                                  gateway=GATEWAY, pod_ip6=f"{pod.ip6}/64" if ip6 else None,
                                  gateway6=GATEWAY6 if ip6 else None)
        finally:
            os.close(fd)

    def ping(self, pod: Pod6, address: str, wait: int = 1) -> bool:
        argv = ["ip", "netns", "exec", pod.name, "ping", "-c1", f"-W{wait}", address]
        return run(argv, check=False).returncode == 0

    def neighbours6(self) -> dict[str, tuple[str, list[str], str]]:
        """IPv6 address -> (MAC, state, protocol) of the bridge's neighbour entries."""
        out = json.loads(self.ip("-j", "-6", "neigh", "show", "dev", BRIDGE).stdout or "[]")
        return {n["dst"]: (n.get("lladdr", ""), n.get("state", []), str(n.get("protocol", ""))) for n in out}

    def mdb(self) -> list[dict]:
        out = json.loads(run(["bridge", "-n", self.node, "-j", "mdb", "show", "dev", BRIDGE]).stdout or "[]")
        return [entry for block in out for entry in block.get("mdb", [])]

    def close(self) -> None:
        ip_batch((f"netns del {n}" for n in list_netns(self.prefix)), check=False)
        self.pods.clear()
