"""One node with `cni-fan serve` in it and many pods, driven by raw plugin
calls: the lab of the port guard, CHECK, scale and fuzz tests.

    <prefix>node    the node: veth `u0` (198.18.1.10/16 by default, its peer
                    `u0p` stays inside), IPv6 off so frame counters count
                    only what a test sends
    <prefix>p<k>    pods, made in batches (`ip -batch`), added by the real
                    `fan` launcher through the plugin server or standalone

The prefix is `tpg-<hex>-<hex>-`; `Lab.close()` (the `module_lab` fixture
calls it whatever happened) stops the server and removes every namespace
with the prefix.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from cni_fan.net import portguard, rtnl_links
from cni_fan.net.rtnl import Rtnl
from cni_fan.net.nsenter import setns
from harness.netlab import Netns, Outcome, PluginServer, add_underlay
from harness.ping import ping_argv
from harness.system import BASE_ENV, CNI_BIN, inside, require_kernel_lab, run

NETNS_DIR = Path("/var/run/netns")
PREFIX = f"tpg-{secrets.token_hex(3)}-"


def ip_batch(lines: Iterable[str], check: bool = True, netns: str | None = None) -> None:
    text = "".join(line + "\n" for line in lines)
    if text:
        argv = ["ip"] + (["-n", netns] if netns else []) + ["-force", "-batch", "-"]
        proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ip -batch failed: {proc.stderr.strip()[:2000]}")


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


@dataclass
class Pod:
    name: str
    cid: str
    ip: str = ""
    mac: str = ""
    veth: str = ""

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)


class Lab:
    """A fake node (namespace with underlay veth `u0`), `cni-fan serve` in it, and pods.

    Calls run the real launchers in .cache/cni-bin from inside the node
    namespace, through the plugin server (`server=True`) or standalone.
    """

    def __init__(self, tmp: Path, underlay_address: str = "198.18.1.10/16", overlay: str = "241.0.0.0/8",
                 underlay: str = "198.18.0.0/16", server: bool = True, **conf_extra) -> None:
        require_kernel_lab()
        self.prefix = f"{PREFIX}{secrets.token_hex(2)}-"
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.node = self.prefix + "node"
        self.node_path = str(NETNS_DIR / self.node)
        self.node_ns: Netns | None = None
        self.data = self.tmp / "data"
        self.socket = self.tmp / "plugin.sock"
        self.overlay, self.underlay = overlay, underlay
        self.conf_extra = conf_extra
        self.server: PluginServer | None = None
        self.pods: dict[str, Pod] = {}
        self._seq = 0
        try:
            self.node_ns = Netns.named(self.node)
            add_underlay(self.node_ns, [("u0", underlay_address)])
            # No IPv6 on the fake node: frame counters then count only what a test sends.
            self.in_node("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            if server:
                self.start_server()
        except BaseException:
            self.close()
            raise

    # -- processes ----------------------------------------------------------------

    def _enter_node(self) -> None:  # preexec_fn: the child runs in the node namespace
        fd = os.open(self.node_path, os.O_RDONLY)
        setns(fd)
        os.close(fd)

    def start_server(self) -> None:
        assert self.node_ns is not None
        self.server = PluginServer(self.node_ns, self.socket, self.tmp / "serve.log", "--log-level", "info",
                                   start_timeout=60)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None

    def server_alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def conf(self, **extra) -> dict:
        return {"cniVersion": "1.0.0", "name": "fan", "type": "fan", "overlay": self.overlay,
                "underlay": self.underlay, "dataDir": str(self.data), "logLevel": "warning",
                **self.conf_extra, **extra}

    def env(self, verb: str, cid: str = "", netns: str = "", ifname: str = "eth0", args: str = "",
            server: bool | None = None, **extra: str) -> dict[str, str]:
        env = dict(BASE_ENV, CNI_COMMAND=verb, CNI_PATH=str(CNI_BIN))
        use_server = self.server is not None if server is None else server
        env["CNI_FAN_AGENT_SOCKET"] = str(self.socket) if use_server else "none"
        for key, value in (("CNI_CONTAINERID", cid), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname),
                           ("CNI_ARGS", args)):
            if value:
                env[key] = value
        env.update(extra)
        return env

    def spawn(self, env: dict[str, str], stdin: bytes, plugin: str = "fan") -> subprocess.Popen:
        proc = subprocess.Popen([str(CNI_BIN / plugin)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=self._enter_node)
        proc._tpg_stdin = stdin  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 300) -> Outcome:
        out, err = proc.communicate(proc._tpg_stdin, timeout=timeout)  # type: ignore[attr-defined]
        return Outcome(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    def call(self, verb: str, cid: str = "", netns: str = "", conf: dict | bytes | None = None,
             plugin: str = "fan", timeout: float = 300, **env_kw) -> Outcome:
        data = conf if isinstance(conf, bytes) else json.dumps(self.conf() if conf is None else conf).encode()
        return self.finish(self.spawn(self.env(verb, cid, netns, **env_kw), data, plugin), timeout)

    def calls(self, jobs: list[tuple[str, str, str, dict]], parallel: int = 8) -> list[Outcome]:
        """[(verb, container id, netns path, conf)], `parallel` at a time."""
        def one(job):
            verb, cid, netns, conf = job
            return self.call(verb, cid, netns, conf)
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(one, jobs))

    # -- pods -----------------------------------------------------------------------

    def new_pods(self, count: int) -> list[Pod]:
        pods = []
        for _ in range(count):
            self._seq += 1
            pods.append(Pod(name=f"{self.prefix}p{self._seq}", cid=f"{self.prefix}c{self._seq}"))
        ip_batch(f"netns add {p.name}" for p in pods)
        for pod in pods:
            self.pods[pod.name] = pod
        return pods

    def add_pods(self, count: int, conf: dict | None = None, parallel: int = 8) -> list[Pod]:
        pods = self.new_pods(count)
        conf = self.conf() if conf is None else conf
        outcomes = self.calls([("ADD", p.cid, p.path, conf) for p in pods], parallel)
        for pod, outcome in zip(pods, outcomes):
            assert outcome.code == 0, f"ADD {pod.name}: {outcome}"
            result = outcome.json
            pod.veth = result["interfaces"][0]["name"]
            pod.mac = result["interfaces"][1]["mac"].lower()
            pod.ip = result["ips"][0]["address"].split("/")[0]
        return pods

    def del_pods(self, pods: list[Pod], conf: dict | None = None, parallel: int = 8,
                 delete_netns: bool = True) -> None:
        conf = self.conf() if conf is None else conf
        outcomes = self.calls([("DEL", p.cid, p.path, conf) for p in pods], parallel)
        for pod, outcome in zip(pods, outcomes):
            assert outcome.code == 0, f"DEL {pod.name}: {outcome}"
        if delete_netns:
            self.delete_netns(pods)

    def delete_netns(self, pods: list[Pod]) -> None:
        ip_batch((f"netns del {p.name}" for p in pods), check=False)
        for pod in pods:
            self.pods.pop(pod.name, None)

    # -- observing --------------------------------------------------------------------

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.node, *args], check=check)

    def ip_json(self, *args: str) -> list[dict]:
        out = run(["ip", "-j", "-n", self.node, *args]).stdout
        return json.loads(out) if out.strip() else []

    def in_node(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--net={self.node_path}", *argv], check=check, **kw)

    def in_pod(self, pod: Pod, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--net={pod.path}", *argv], check=check, **kw)

    def ping(self, pod: Pod | None, address: str, count: int = 1, wait: int = 2) -> bool:
        argv = ping_argv(address, count, wait)
        proc = self.in_pod(pod, *argv, check=False) if pod else self.in_node(*argv, check=False)
        return proc.returncode == 0

    def bridge_name(self) -> str:
        names = [link["ifname"] for link in self.ip_json("-d", "link", "show", "type", "bridge")]
        assert len(names) == 1, names
        return names[0]

    def link_stats(self) -> dict[str, dict]:
        return {link["ifname"]: link for link in self.ip_json("-s", "link", "show")}

    def veth_tx(self, veths: Iterable[str]) -> dict[str, int]:
        """Frames the node delivered to each pod (tx of the host end)."""
        stats = self.link_stats()
        return {v: stats[v]["stats64"]["tx"]["packets"] for v in veths}

    def host_veths(self) -> set[str]:
        return {link["ifname"] for link in self.ip_json("link", "show") if link["ifname"].startswith("fanv")}

    def our_neighbours(self) -> dict[str, str]:
        """address -> MAC of the permanent entries the guard keeps on the bridge."""
        with inside(self.node_path), Rtnl() as rtnl:
            index = rtnl_links.get_link(rtnl, self.bridge_name()).index
            return {n.ip: n.mac for n in rtnl_links.bridge_neighbours(rtnl, index)
                    if n.protocol == portguard.NEIGH_PROTOCOL}

    def static_fdb(self) -> dict[str, str]:
        """MAC -> port of the static (not local) FDB entries on the bridge."""
        out = run(["bridge", "-n", self.node, "-j", "fdb", "show", "br", self.bridge_name()]).stdout
        entries = json.loads(out) if out.strip() else []
        return {e["mac"]: e.get("ifname", "") for e in entries
                if e.get("state") == "static" and "self" not in e.get("flags", [])}

    def records(self) -> list[str]:
        root = self.data / "networks" / "fan"
        return sorted(p.name for p in root.iterdir() if p.name[0].isdigit()) if root.exists() else []

    def close(self) -> None:
        self.stop_server()
        ip_batch((f"netns del {n}" for n in list_netns(self.prefix)), check=False)
        self.pods.clear()


def module_lab(name: str, pods: int = 0):
    """A module-scoped `lab` fixture: a Lab (with `pods` pods), closed afterwards; its server must survive."""

    @pytest.fixture(scope="module")
    def lab(tmp_path_factory) -> Iterator[Lab]:
        made = Lab(tmp_path_factory.mktemp(name))
        try:
            if pods:
                made.add_pods(pods)
            yield made
            assert made.server_alive(), (made.tmp / "serve.log").read_text()[-3000:]
        finally:
            made.close()

    return lab


# -- what a failed call must not change ------------------------------------------------

def json_of(argv: list[str]):
    """What `argv` (an `ip -j`, `bridge -j`) prints, parsed; [] when it prints nothing."""
    out = run(argv).stdout
    return json.loads(out) if out.strip() else []


def _route(route: dict) -> str:
    """"linkdown" follows the bridge's carrier (its ports coming and going), not what a call configured."""
    route["flags"] = [f for f in route.get("flags", []) if f != "linkdown"]
    return json.dumps(route, sort_keys=True)


def node_state(lab: Lab) -> dict:
    bridge = lab.bridge_name()
    return {
        "links": sorted((l["ifname"], l.get("master", ""), l.get("ifalias", "")) for l in lab.ip_json("-d", "link", "show")),
        "addrs": sorted((a["ifname"], json.dumps(a.get("addr_info"), sort_keys=True))
                        for a in lab.ip_json("-4", "addr", "show")),
        "routes": sorted(_route(r) for r in lab.ip_json("-4", "route", "show", "table", "all")),
        "neigh": sorted(json.dumps(n, sort_keys=True) for n in lab.ip_json("-4", "neigh", "show", "nud", "permanent")),
        "fdb": lab.static_fdb(),
        "tc": {v: run(["tc", "-n", lab.node, "filter", "show", "dev", v, "ingress"]).stdout for v in lab.host_veths()},
        "bridge": bridge,
        "files": {str(p.relative_to(lab.data)): p.read_bytes() for p in sorted(Path(lab.data).rglob("*"))
                  if p.is_file()},
    }


def pod_state(pod: Pod) -> dict:
    return {
        "links": sorted((l["ifname"], l.get("address", ""), l.get("mtu")) for l in json_of(["ip", "-j", "-n", pod.name, "link", "show"])),
        "addrs": sorted(json.dumps(a.get("addr_info"), sort_keys=True) for a in
                        json_of(["ip", "-j", "-n", pod.name, "-4", "addr", "show"])),
        "routes": sorted(json.dumps(r, sort_keys=True) for r in
                         json_of(["ip", "-j", "-n", pod.name, "-4", "route", "show", "table", "all"])),
        "neigh": sorted(json.dumps(n, sort_keys=True) for n in
                        json_of(["ip", "-j", "-n", pod.name, "-4", "neigh", "show", "nud", "permanent"])),
    }
