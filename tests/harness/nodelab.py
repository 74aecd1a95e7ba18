"""A small Fan cluster in network namespaces, for the node datapath and agent tests.

    <prefix>-u      the underlay "switch": bridge br0, one port n<i> per node
    <prefix>-n<i>   node i: veth eth0 (to br0) with its underlay address
    <prefix>-p<k>   a pod, added with cnitool and the real `fan` plugin
    <prefix>-r<k>   (`add_outside()`) a router on the underlay, its last host
                    address (198.18.255.254 on 198.18.0.0/16),
                    the nodes' default gateway, towards
    <prefix>-x<k>   a host outside the cluster, 198.19.0.2 ("the internet",
                    and the client of NodePorts)

Each test module picks its own prefix (`new_prefix("nd")` -> `tnd3fa1`), so
modules never collide with each other or with other test runs, and a
namespace name tells whose it is. Interface names are short and fixed
(they live in their own namespaces). Addresses: underlay in
198.18.0.0/15, overlay in 240.0.0.0/4; nothing runs in the host's own
namespace except the test process itself, so the host's interfaces,
routes, sysctls and firewall are never touched.

`FanLab.close()` removes everything the lab made (agents it started first,
by their own process group, then pods and the libcni cache entries of
cnitool, nodes, the underlay), also after a failure: `lab_fixture()` makes
a module's `lab` fixture that does it.

What is the same as for the plugin tests (the namespace class, paths,
cnitool's container IDs) comes from harness/netlab.py and harness/system.py;
state diffs from harness/state.py, pingers from harness/ping.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import netaddr
from harness import netlab
from harness.netlab import cnitool_container_id
from harness.ping import ping_argv
from harness.state import state_diff  # noqa: F401  (nodelab.state_diff, as before the move)
from harness.system import BASE_ENV, CNI_BIN, CNI_FAN, CNITOOL, in_netns, require_kernel_lab, run
# The Services and policy tests' servers and clients, under the names they had here.


# /run, not netlab's /var/run: cnitool derives a pod's container ID from this path as written.
NETNS_DIR = Path("/run/netns")
OVERLAY = "241.0.0.0/8"
NETWORK = "fan"
METRICS_PORT = 9475


def new_prefix(tag: str) -> str:
    """`t<tag><4 hex>`: short, unique per module and run."""
    return f"t{tag}{secrets.token_hex(2)}"


class Netns(netlab.Netns):
    """A namespace named by its lab (`Netns(f"{prefix}-n1")`), under /run/netns.
    The rest is netlab's."""

    netns_dir = NETNS_DIR

    def __init__(self, name: str) -> None:
        self._create(name)

    def sysctl(self, key: str) -> str | None:
        try:
            return in_netns(self.path, lambda: Path("/proc/sys", key.replace(".", "/")).read_text().strip())
        except FileNotFoundError:
            return None

    def set_sysctl(self, key: str, value: str) -> None:
        in_netns(self.path, lambda: Path("/proc/sys", key.replace(".", "/")).write_text(value + "\n"))

    def snapshot(self, sysctls: tuple[str, ...] = (), ipv6: bool = False) -> dict[str, Any]:
        """Links, addresses, routes, neighbours, FDB, qdiscs/filters, nftables
        and sysctls: what `node down` must leave as `node up` found it.
        Neighbours learnt by ARP come and go with traffic: only permanent
        and no-ARP IPv4 entries count. `ipv6`: the IPv6 addresses, routes
        (every table) and permanent neighbours as well (harness/dualstack.py)."""
        links = {}
        for name, link in self.links().items():
            kind = (link.get("linkinfo") or {}).get("info_kind", "")
            links[name] = (kind, link.get("master", ""), link.get("mtu"), link.get("address"),
                           "UP" in link.get("flags", []))
        addrs = self.ipv4_addrs()
        routes = self.ipv4_routes()
        neigh = {json.dumps(n, sort_keys=True) for n in self.ip_json("-4", "neigh", "show", "nud", "all")
                 if set(n.get("state", [])) & {"PERMANENT", "NOARP"}}
        # Multicast entries follow group memberships (IPv6 joins them over time), not configuration.
        fdb = {json.dumps(f, sort_keys=True)
               for f in json.loads(run(["bridge", "-n", self.name, "-j", "fdb", "show"]).stdout or "[]")
               if not int(f["mac"].split(":")[0], 16) & 1}
        tc = {}
        for name in links:
            tc[name] = (run(["tc", "-n", self.name, "qdisc", "show", "dev", name]).stdout,
                        run(["tc", "-n", self.name, "filter", "show", "dev", name, "egress"], check=False).stdout,
                        run(["tc", "-n", self.name, "filter", "show", "dev", name, "ingress"], check=False).stdout)
        # Stateless (counters follow traffic), with handles (a re-created table gets a new one).
        nft = self.run("nft", "-a", "-s", "list", "ruleset").stdout
        out = {"links": links, "addrs": addrs, "routes": routes, "neigh": neigh, "fdb": fdb, "tc": tc,
               "nft": nft, "sysctls": {k: self.sysctl(k) for k in sysctls}}
        if ipv6:
            from harness.dualstack import ipv6_state
            out |= ipv6_state(self)
        return out


@dataclass
class Pod:
    ns: Netns
    node: "Node"
    address: str          # without prefix length
    result: dict

    @property
    def container_id(self) -> str:
        return cnitool_container_id(self.ns.path)

    @property
    def mtu(self) -> int:
        return int(self.ns.link("eth0")["mtu"])

    def ping(self, dst: str, count: int = 1, size: int | None = None, dont_fragment: bool = False,
             wait: float = 2.0) -> subprocess.CompletedProcess:
        argv = ping_argv(dst, count, wait, size, dont_fragment, interval=0.05 if count > 1 else None)
        return self.ns.run(*argv, check=False, timeout=30 + count)

    def reaches(self, dst: str, **kw) -> bool:
        return self.ping(dst, **kw).returncode == 0


class Agent:
    """`cni-fan node run` inside a node namespace, in its own process group."""

    def __init__(self, node: "Node", *args: Any) -> None:
        self.node = node
        self.log_path = node.dir / f"agent-{secrets.token_hex(2)}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(node.ns.argv(CNI_FAN, "node", "run", "--conflist", node.conflist, *args),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=BASE_ENV,
                                     start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def http(self, path: str, timeout: float = 2) -> tuple[int, str]:
        """(status, body) of GET path on 127.0.0.1:9475 in the node; (0, error) when nothing answers."""
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)
        return in_netns(self.node.ns.path, get)

    def wait_health(self, code: int = 200, timeout: float = 20) -> float:
        started = time.monotonic()
        deadline = started + timeout
        last: tuple[int, str] = (0, "")
        while time.monotonic() < deadline:
            assert self.alive(), f"agent exited with {self.proc.returncode}:\n{self.log[-3000:]}"
            last = self.http("/healthz")
            if last[0] == code:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"/healthz never answered {code} (last: {last}):\n{self.log[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """The agent and everything it started (its plugin server)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        else:
            try:  # a plugin server left behind by a dead agent
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@dataclass
class Node:
    lab: "FanLab"
    index: int
    ns: Netns
    cidr: str | None
    dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        assert self.cidr is not None
        return self.cidr.split("/")[0]

    @property
    def conf_dir(self) -> Path:
        return self.dir / "net.d"

    @property
    def conflist(self) -> Path:
        return self.conf_dir / "10-fan.conflist"

    def conflist_data(self, **extra: Any) -> dict:
        plugin = {"type": "fan", **({"overlay": self.lab.overlay} if self.lab.overlay else {}), "underlay": self.lab.underlay,
                  "dataDir": str(self.dir / "state"), "agentSocket": str(self.dir / "plugin.sock"),
                  **({"overlay6": self.lab.overlay6} if self.lab.overlay6 else {}), **self.extra, **extra}
        return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [plugin]}

    def write_conflist(self, **extra: Any) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.conflist.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.conflist_data(**extra), indent=1))
        os.replace(tmp, self.conflist)

    def cni_fan(self, *args: Any, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.ns.run(CNI_FAN, *args, check=check, timeout=timeout)

    def up(self, check: bool = True) -> subprocess.CompletedProcess:
        return self.cni_fan("node", "up", "--conflist", self.conflist, check=check)

    def down(self, check: bool = True) -> subprocess.CompletedProcess:
        return self.cni_fan("node", "down", "--conflist", self.conflist, check=check)

    def show(self) -> dict:
        return json.loads(self.cni_fan("node", "show", "--json", "--conflist", self.conflist).stdout)

    def add_pod(self) -> Pod:
        ns = self.lab.new_netns("p")
        self.lab.pods.append(ns)
        env = dict(BASE_ENV, NETCONFPATH=str(self.conf_dir), CNI_PATH=str(CNI_BIN))
        out = run(self.ns.argv(CNITOOL, "add", NETWORK, ns.path), env=env)
        result = json.loads(out.stdout)
        return Pod(ns, self, result["ips"][0]["address"].split("/")[0], result)

    def start_agent(self, *args: Any) -> Agent:
        agent = Agent(self, *args)
        self.lab.agents.append(agent)
        return agent

    def nft_drop_counter(self) -> int:
        text = self.ns.run("nft", "list", "chain", "ip", "cni-fan", "input").stdout
        m = re.search(r"counter packets (\d+) bytes \d+ drop", text)
        assert m, text
        return int(m.group(1))


OUTSIDE_NET = "198.19.0.0/24"
OUTSIDE_ROUTER = "198.19.0.1"
OUTSIDE_HOST = "198.19.0.2"


@dataclass
class Outside:
    """A router on the underlay switch and one host behind it, outside the
    cluster: what a NodePort client and a pod's egress traffic talk to."""
    router: Netns
    host: Netns
    address: str = OUTSIDE_HOST


class FanLab:
    def __init__(self, prefix: str, tmp: Path, underlay: str = "198.18.0.0/16", overlay: str | None = OVERLAY,
                 overlay6: str | None = None) -> None:
        """`overlay6`: a dual-stack lab (every node's conflist has it; harness/dualstack.py has its pods);
        with `overlay` None and an IPv6 `underlay`, an IPv6-only one."""
        self.prefix = prefix
        self.tmp = tmp
        self.underlay = underlay
        self.overlay = overlay
        self.overlay6 = overlay6
        self.namespaces: list[Netns] = []
        self.pods: list[Netns] = []
        self.agents: list[Agent] = []
        self.nodes: list[Node] = []
        self.outside: Outside | None = None
        self._count = 0
        try:
            self.under = self.new_netns("u")
            self.under.ip("link", "add", "br0", "type", "bridge")
            self.under.ip("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def new_netns(self, kind: str) -> Netns:
        self._count += 1
        ns = Netns(f"{self.prefix}-{kind}{self._count}")
        self.namespaces.append(ns)
        return ns

    def add_node(self, cidr: str | None, mtu: int = 1500, write_conflist: bool = True, **extra: Any) -> Node:
        """A node with veth eth0 on the underlay bridge; cidr None leaves eth0 without an address."""
        index = len(self.nodes) + 1
        ns = self.new_netns("n")
        port = f"n{index}"
        self.under.ip("link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
                      "netns", ns.name)
        self.under.ip("link", "set", port, "master", "br0", "up")
        if cidr is not None:
            ns.ip("addr", "add", cidr, "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        if self.outside is not None and cidr is not None:
            ns.ip("route", "replace", "default", "via", self.router_underlay)
        node = Node(self, index, ns, cidr, self.tmp / f"n{index}", dict(extra))
        node.dir.mkdir(parents=True, exist_ok=True)
        if write_conflist:
            node.write_conflist()
        self.nodes.append(node)
        return node

    @property
    def router_underlay(self) -> str:
        """The outside router's underlay address: the underlay's last host address."""
        return str(netaddr.IPNetwork(self.underlay)[-2])

    def add_outside(self) -> Outside:
        """The router (198.18.255.254 on a 198.18.0.0/16 underlay, 198.19.0.1 outside) and
        the outside host 198.19.0.2; every node made so far, and every later
        one, routes by default through the router, as a real node does
        (kube-proxy's ClusterIPs are reached through the default route)."""
        router, host = self.new_netns("r"), self.new_netns("x")
        self.under.ip("link", "add", "rtr", "type", "veth", "peer", "name", "eth0", "netns", router.name)
        self.under.ip("link", "set", "rtr", "master", "br0", "up")
        router.ip("addr", "add", f"{self.router_underlay}/{self.underlay.split('/')[1]}", "dev", "eth0")
        router.ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", host.name)
        router.ip("addr", "add", f"{OUTSIDE_ROUTER}/24", "dev", "eth1")
        host.ip("addr", "add", f"{OUTSIDE_HOST}/24", "dev", "eth0")
        for ns, dev in ((router, "eth0"), (router, "eth1"), (host, "eth0")):
            ns.ip("link", "set", dev, "up")
        host.ip("route", "add", "default", "via", OUTSIDE_ROUTER)
        router.set_sysctl("net.ipv4.ip_forward", "1")
        self.outside = Outside(router, host)
        for node in self.nodes:
            node.ns.ip("route", "replace", "default", "via", self.router_underlay)
        return self.outside

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        for pod in self.pods:
            netlab.forget_libcni_cache(cnitool_container_id(pod.path))
        for ns in reversed(self.namespaces):
            ns.delete()


def lab_fixture(prefix: str):
    """A test module's `lab` fixture (module scope): a FanLab with `prefix`, root
    and tools checked first, everything removed afterwards whatever happened.
    In the module: `lab = nodelab.lab_fixture(PREFIX)`."""
    import pytest

    @pytest.fixture(scope="module")
    def lab(tmp_path_factory) -> Iterator[FanLab]:
        """The module's own Fan lab (harness/nodelab.py), removed after the module."""
        require_root_and_tools()
        made = FanLab(prefix, tmp_path_factory.mktemp("nodes"))
        try:
            yield made
        finally:
            made.close()

    return lab


def two_nodes_up(lab: FanLab) -> tuple[Node, Node, Pod, Pod]:
    """Nodes 198.18.1.11 and 198.18.2.12 on 198.18.0.0/16, both up (`node up`), one pod on each."""
    n1 = lab.add_node("198.18.1.11/16")
    n2 = lab.add_node("198.18.2.12/16")
    n1.up()
    n2.up()
    return n1, n2, n1.add_pod(), n2.add_pod()


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def require_root_and_tools() -> None:
    """Skip without root; fail when a tool the node labs need is missing."""
    require_kernel_lab(("tc", "bridge", "nft", "stdbuf"))


def run_plugin(node: Node, command: str, config: dict, plugin: str = "fan") -> tuple[int, dict | None, str]:
    """The plugin run directly, as a runtime does (harness/netlab.py's
    run_plugin): (exit code, stdout JSON, stderr)."""
    out = netlab.run_plugin(node.ns, netlab.cni_env(command, ifname="", path=str(CNI_BIN)), config, plugin)
    return out.code, out.json, out.stderr
