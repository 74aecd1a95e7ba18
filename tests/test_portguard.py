"""Neighbour suppression and anti-spoofing on the fan bridge (cni_fan/net/portguard.py).

Real kernel: a node namespace with `cni-fan serve` in it, pods added by the
real `fan` executable, frames crafted with AF_PACKET sockets. Everything
lives in namespaces named `tpg-<hex>-...` and is removed at the end, also
when a test fails.

The lab helpers at the top are shared with tests/test_scale.py and
tests/test_fuzz_plugins.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from cni_fan.bpf import guardprog
from cni_fan.net import portguard, rtnl_links
from cni_fan.net.rtnl import Rtnl

REPO = Path(__file__).resolve().parent.parent
CNI_BIN = REPO / ".cache" / "cni-bin"
CNI_FAN = REPO / ".venv" / "bin" / "cni-fan"
NETNS_DIR = Path("/var/run/netns")
PREFIX = f"tpg-{secrets.token_hex(3)}-"
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# == lab helpers =====================================================================

def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces)")
    for tool in (CNI_BIN / "fan", CNI_BIN / "fan-ipam", CNI_FAN):
        if not tool.exists():
            pytest.fail(f"{tool} is missing: run tools/setup.sh")


def setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside(netns_path: str) -> Iterator[None]:
    """This thread in the namespace at `netns_path`, and always back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns_fd(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


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
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout) if self.stdout.strip() else None

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout[:3000]}\nstderr: {self.stderr[-3000:]}"


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
        need_root()
        self.prefix = f"{PREFIX}{secrets.token_hex(2)}-"
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.node = self.prefix + "node"
        self.node_path = str(NETNS_DIR / self.node)
        self.data = self.tmp / "data"
        self.socket = self.tmp / "plugin.sock"
        self.overlay, self.underlay = overlay, underlay
        self.conf_extra = conf_extra
        self.server: subprocess.Popen | None = None
        self.pods: dict[str, Pod] = {}
        self._seq = 0
        try:
            run(["ip", "netns", "add", self.node])
            ip_batch(["link set lo up", "link add u0 type veth peer name u0p",
                      f"addr add {underlay_address} dev u0", "link set u0 up", "link set u0p up"], netns=self.node)
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
        setns_fd(fd)
        os.close(fd)

    def start_server(self) -> None:
        log = open(self.tmp / "serve.log", "ab")
        self.server = subprocess.Popen([str(CNI_FAN), "serve", "--socket", str(self.socket), "--log-level", "info"],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=self._enter_node)
        log.close()
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cni-fan serve did not start: {(self.tmp / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def server_alive(self) -> bool:
        return self.server is not None and self.server.poll() is None

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
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), address]
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


# == frames ===============================================================================

ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q = 0x0003, 0x0800, 0x0806, 0x86DD, 0x8100
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def eth(dst: str, src: str, ethertype: int) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, payload: bytes, dport: int = 9) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_bytes(sha), socket.inet_aton(spa),
                       mac_bytes(tha), socket.inet_aton(tpa))


def packet_socket(netns_path: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` of that namespace (sees every frame in and out)."""
    with inside(netns_path):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


PACKET_OUTGOING = 4


def drain(sock: socket.socket, seconds: float = 0.0) -> list[bytes]:
    """Frames the socket's interface received (not the ones it sent), for `seconds`."""
    frames = []
    deadline = time.monotonic() + seconds
    while True:
        try:
            frame, address = sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING:
                frames.append(frame)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return frames
            time.sleep(0.02)


# == pure ===================================================================================

def test_gateway_mac_is_locally_administered_unicast_and_derived_from_the_gateway():
    mac = portguard.gateway_mac("241.1.10.1")
    assert mac == "02:fc:f1:01:0a:01"
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_alias_round_trip_and_foreign_aliases():
    assert portguard.parse_alias(portguard.port_alias("241.1.10.7", "AA:BB:CC:DD:EE:0F")) == \
        ("241.1.10.7", "aa:bb:cc:dd:ee:0f")
    for foreign in (None, "", "uplink", "cni-fan", "cni-fan 241.1.10.7", "cni-fan x y", "cni-fan 1.2.3.4 zz"):
        assert portguard.parse_alias(foreign) is None


# == the program, run by the kernel on crafted frames ===========================================

PASS, DROP = guardprog.TC_ACT_UNSPEC & 0xFFFFFFFF, guardprog.TC_ACT_SHOT
POD_MAC, POD_IP = "0a:00:00:00:00:05", "241.1.10.5"
OTHER_MAC, OTHER_IP = "0a:00:00:00:00:06", "241.1.10.6"
GW_MAC, GW_IP = "02:fc:f1:01:0a:01", "241.1.10.1"


@pytest.fixture(scope="module")
def guard_fd():
    need_root()
    from cni_fan.bpf.syscall import load_sched_cls

    fd = load_sched_cls(guardprog.guard_program(POD_MAC, POD_IP), name="tpg_guard")
    yield fd
    os.close(fd)


CASES = {
    "honest IPv4": (eth(GW_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(POD_IP, "8.8.8.8", b"x"), PASS),
    "honest IPv4 to a pod": (eth(OTHER_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(POD_IP, OTHER_IP, b"x"), PASS),
    "honest ARP request": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD_IP, "00:00:00:00:00:00", OTHER_IP), PASS),
    "honest ARP reply": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, POD_MAC, POD_IP, GW_MAC, GW_IP), PASS),
    "IPv4 from another pod's address": (eth(GW_MAC, POD_MAC, ETH_P_IP) + ipv4_udp(OTHER_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 from another pod's MAC": (eth(GW_MAC, OTHER_MAC, ETH_P_IP) + ipv4_udp(POD_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 as another pod": (eth(GW_MAC, OTHER_MAC, ETH_P_IP) + ipv4_udp(OTHER_IP, "8.8.8.8", b"x"), DROP),
    "IPv4 from 0.0.0.0 (DHCP)": (eth(BROADCAST, POD_MAC, ETH_P_IP) + ipv4_udp("0.0.0.0", "255.255.255.255", b"x", 67), DROP),
    "ARP reply claiming another pod's address": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, POD_MAC, OTHER_IP, GW_MAC, GW_IP), DROP),
    "gratuitous ARP for another pod's address": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, OTHER_IP, BROADCAST, OTHER_IP), DROP),
    "ARP with another sender MAC": (eth(GW_MAC, POD_MAC, ETH_P_ARP) + arp(2, OTHER_MAC, POD_IP, GW_MAC, GW_IP), DROP),
    "ARP from another Ethernet source": (eth(GW_MAC, OTHER_MAC, ETH_P_ARP) + arp(2, POD_MAC, POD_IP, GW_MAC, GW_IP), DROP),
    "ARP probe (sender 0.0.0.0)": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, "0.0.0.0", "00:00:00:00:00:00", POD_IP), DROP),
    "non-Ethernet ARP": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + b"\x00\x06" + arp(1, POD_MAC, POD_IP, BROADCAST, OTHER_IP)[2:], DROP),
    "IPv6": (eth("33:33:00:00:00:02", POD_MAC, ETH_P_IPV6) + bytes(40), DROP),
    "VLAN tag": (eth(GW_MAC, POD_MAC, ETH_P_8021Q) + b"\x00\x05\x08\x00" + ipv4_udp(POD_IP, "8.8.8.8", b"x"), DROP),
    "truncated ARP": (eth(BROADCAST, POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD_IP, BROADCAST, OTHER_IP)[:20], DROP),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES))
def test_guard_program_verdict(guard_fd, case):
    from cni_fan.bpf.syscall import test_run

    frame, want = CASES[case]  # (the test-run refuses IPv4 frames shorter than an IPv4 header)
    assert test_run(guard_fd, frame).retval == want


# == a node with pods ========================================================================

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


lab = module_lab("portguard")


@pytest.fixture(scope="module")
def pods(lab: Lab) -> list[Pod]:
    return lab.add_pods(5)


@pytest.mark.kernel
def test_add_installs_the_guard(lab: Lab, pods: list[Pod]):
    bridge = lab.bridge_name()
    links = {link["ifname"]: link for link in lab.ip_json("-d", "link", "show")}
    assert links[bridge]["address"] == portguard.gateway_mac("241.1.10.1")
    neighbours = lab.our_neighbours()
    fdb = lab.static_fdb()
    for pod in pods:
        port = links[pod.veth]["linkinfo"]["info_slave_data"]
        assert (port["learning"], port["flood"], port["mcast_flood"], port["bcast_flood"]) == (False,) * 4, port
        assert port["proxy_arp_wifi"] and port["hairpin"] and not port["neigh_suppress"], port
        assert links[pod.veth]["ifalias"] == f"cni-fan {pod.ip} {pod.mac}"
        assert neighbours[pod.ip] == pod.mac
        assert fdb[pod.mac] == pod.veth
        filters = run(["tc", "-n", lab.node, "filter", "show", "dev", pod.veth, "ingress"]).stdout
        assert "cni-fan-guard" in filters and "direct-action" in filters, filters
        inside_pod = run(["ip", "-j", "-n", pod.name, "neigh", "show", "dev", "eth0"]).stdout
        gateway = [n for n in json.loads(inside_pod) if n["dst"] == "241.1.10.1"]
        assert gateway and gateway[0]["lladdr"] == portguard.gateway_mac("241.1.10.1")
        assert "PERMANENT" in gateway[0]["state"]


@pytest.mark.kernel
def test_pods_reach_each_other_the_gateway_and_the_node(lab: Lab, pods: list[Pod]):
    a, b = pods[0], pods[1]
    for pod in pods:
        run(["ip", "-n", pod.name, "neigh", "flush", "dev", "eth0"])  # drops dynamic entries only
    assert lab.ping(a, b.ip), "pod to pod"
    assert lab.ping(b, a.ip), "pod to pod, back"
    assert lab.ping(a, "241.1.10.1"), "pod to gateway"
    assert lab.ping(None, a.ip), "node to pod"
    run(["ip", "-n", a.name, "link", "set", "lo", "up"])  # a runtime's loopback plugin does this
    assert lab.ping(a, a.ip), "pod to itself"


@pytest.mark.kernel
def test_hairpin_through_a_service_address(lab: Lab, pods: list[Pod]):
    """A pod reaches itself through a DNAT'ed service address, as kube-proxy sets it up."""
    a = pods[2]
    service = "10.96.0.10"
    ruleset = f"""table ip tpg-svc {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept; ip daddr {service} dnat to {a.ip}; }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept; ip saddr {a.ip} ip daddr {a.ip} masquerade; }}
}}
"""
    lab.in_node("sysctl", "-qw", "net.ipv4.ip_forward=1")
    lab.in_node("nft", "-f", "-", input=ruleset)
    try:
        assert lab.ping(a, service, count=2), "hairpin through the service address"
        assert lab.ping(pods[3], service), "another pod through the service address"
    finally:
        lab.in_node("nft", "delete", "table", "ip", "tpg-svc", check=False)


@pytest.mark.kernel
def test_resolving_every_pod_floods_no_other_pod(lab: Lab, pods: list[Pod]):
    """Each ARP request is answered by the bridge on the requester's port: no
    other pod sees it, and each target only gets the ping itself."""
    asker, others = pods[0], pods[1:]
    run(["ip", "-n", asker.name, "neigh", "flush", "dev", "eth0"])
    before = lab.veth_tx(p.veth for p in others)
    for pod in others:
        assert lab.ping(asker, pod.ip)
    after = lab.veth_tx(p.veth for p in others)
    neighbours = json.loads(run(["ip", "-j", "-n", asker.name, "neigh", "show", "dev", "eth0"]).stdout)
    learned = {n["dst"]: n["lladdr"] for n in neighbours}
    for pod in others:
        assert learned[pod.ip] == pod.mac  # the proxy's answer is the pod's real MAC
        # The echo request, plus at most a unicast ARP probe of the target later on.
        assert after[pod.veth] - before[pod.veth] <= 2, (pod.name, before[pod.veth], after[pod.veth])


def _spoof_suite(lab: Lab, sender: Pod, victim: Pod, target: Pod) -> dict[str, tuple[int, int]]:
    """Send forged and honest frames from `sender`; count what reaches `target` and the node.

    Returns {case: (frames seen by the target pod, frames seen by the node's bridge device)}.
    """
    bridge = lab.bridge_name()
    gw_mac, gw_ip = portguard.gateway_mac("241.1.10.1"), "241.1.10.1"
    out = packet_socket(sender.path, "eth0")
    at_target = packet_socket(target.path, "eth0")
    at_node = packet_socket(lab.node_path, bridge)
    s, v, t = sender, victim, target
    cases = {
        "honest to pod": lambda m: eth(t.mac, s.mac, ETH_P_IP) + ipv4_udp(s.ip, t.ip, m),
        "honest to node": lambda m: eth(gw_mac, s.mac, ETH_P_IP) + ipv4_udp(s.ip, gw_ip, m),
        "honest ARP reply to node": lambda m: eth(gw_mac, s.mac, ETH_P_ARP) + arp(2, s.mac, s.ip, gw_mac, gw_ip) + m,
        "victim's address to pod": lambda m: eth(t.mac, s.mac, ETH_P_IP) + ipv4_udp(v.ip, t.ip, m),
        "victim's MAC to pod": lambda m: eth(t.mac, v.mac, ETH_P_IP) + ipv4_udp(s.ip, t.ip, m),
        "victim's MAC and address to pod": lambda m: eth(t.mac, v.mac, ETH_P_IP) + ipv4_udp(v.ip, t.ip, m),
        "victim's address to node": lambda m: eth(gw_mac, s.mac, ETH_P_IP) + ipv4_udp(v.ip, gw_ip, m),
        "ARP reply for the victim to node": lambda m: eth(gw_mac, s.mac, ETH_P_ARP) + arp(2, s.mac, v.ip, gw_mac, gw_ip) + m,
        "ARP reply for the victim to pod": lambda m: eth(t.mac, s.mac, ETH_P_ARP) + arp(2, s.mac, v.ip, t.mac, t.ip) + m,
        "gratuitous ARP for the victim": lambda m: eth(BROADCAST, s.mac, ETH_P_ARP) + arp(1, s.mac, v.ip, BROADCAST, v.ip) + m,
        "IPv6 to node": lambda m: eth(gw_mac, s.mac, ETH_P_IPV6) + struct.pack("!IHBB", 6 << 28, len(m), 59, 64) + bytes(32) + m,
        "VLAN-tagged to pod": lambda m: eth(t.mac, s.mac, ETH_P_8021Q) + b"\x00\x05\x08\x00" + ipv4_udp(s.ip, t.ip, m),
    }
    markers = {case: f"tpg-{secrets.token_hex(6)}".encode() for case in cases}
    try:
        drain(at_target)
        drain(at_node)
        for case, build in cases.items():
            frame = build(markers[case])
            out.send(frame + bytes(max(0, 60 - len(frame))))
        time.sleep(0.3)
        seen_target = drain(at_target, 0.5)
        seen_node = drain(at_node, 0.2)
    finally:
        for sock in (out, at_target, at_node):
            sock.close()
    return {case: (sum(markers[case] in f for f in seen_target), sum(markers[case] in f for f in seen_node))
            for case in cases}


@pytest.mark.kernel
def test_a_pod_cannot_impersonate_another_honest_frames_pass(lab: Lab, pods: list[Pod]):
    sender, victim, target = pods[0], pods[1], pods[2]
    before = lab.our_neighbours()
    seen = _spoof_suite(lab, sender, victim, target)
    assert seen["honest to pod"][0] == 1, seen
    assert seen["honest to node"][1] == 1, seen
    assert seen["honest ARP reply to node"][1] == 1, seen
    forged = {case: counts for case, counts in seen.items() if not case.startswith("honest")}
    assert all(counts == (0, 0) for counts in forged.values()), forged
    assert lab.our_neighbours() == before
    drops = run(["tc", "-s", "-n", lab.node, "qdisc", "show", "dev", sender.veth, "ingress"]).stdout
    assert " dropped 0," not in drops, drops


@pytest.mark.kernel
def test_without_anti_spoofing_forged_frames_get_through(lab: Lab, pods: list[Pod]):
    """The control of the test above: the same frames from a pod added with `antiSpoof: false`."""
    [open_pod] = lab.add_pods(1, lab.conf(antiSpoof=False))
    try:
        assert "bpf" not in run(["tc", "-n", lab.node, "filter", "show", "dev", open_pod.veth, "ingress"]).stdout
        seen = _spoof_suite(lab, open_pod, pods[1], pods[2])
        assert seen["victim's address to pod"][0] == 1, seen
        assert seen["victim's MAC and address to pod"][0] == 1, seen
        assert seen["ARP reply for the victim to node"][1] == 1, seen
    finally:
        lab.del_pods([open_pod], lab.conf(antiSpoof=False))


@pytest.mark.kernel
def test_guard_hands_honest_frames_on_to_later_filters(lab: Lab, pods: list[Pod]):
    """The guard passes with TC_ACT_UNSPEC, so a filter behind it (here one that
    drops everything, at prio 2) still sees the frames; after it is gone, they flow."""
    from cni_fan.bpf.insn import R0, Assembler
    from cni_fan.net import tc
    from cni_fan.bpf.syscall import load_sched_cls

    asm = Assembler()
    asm.mov64_imm(R0, guardprog.TC_ACT_SHOT)
    asm.exit()
    fd = load_sched_cls(asm.assemble(), name="tpg_drop_all")
    a = pods[3]
    sock = Rtnl.in_netns(lab.node_path)
    try:
        index = lab.ip_json("link", "show", a.veth)[0]["ifindex"]
        tc.attach(sock, index, fd, "ingress", name="tpg-drop-all", prio=2, handle=1)
        run(["ip", "-n", a.name, "neigh", "flush", "dev", "eth0"])
        assert not lab.ping(a, pods[0].ip, wait=1)
        tc.detach(sock, index, "ingress", prio=2, handle=1)
        assert lab.ping(a, pods[0].ip)
    finally:
        sock.close()
        os.close(fd)


@pytest.mark.kernel
def test_switches_off(lab: Lab, pods: list[Pod]):
    conf = lab.conf(neighSuppress=False, antiSpoof=False)
    [plain] = lab.add_pods(1, conf)
    try:
        link = {link["ifname"]: link for link in lab.ip_json("-d", "link", "show")}[plain.veth]
        port = link["linkinfo"]["info_slave_data"]
        assert port["learning"] and port["flood"] and port["bcast_flood"] and not port["proxy_arp_wifi"]
        assert "ifalias" not in link
        assert plain.ip not in lab.our_neighbours()
        assert plain.mac not in lab.static_fdb()
        assert "bpf" not in run(["tc", "-n", lab.node, "filter", "show", "dev", plain.veth, "ingress"]).stdout
        gateway = json.loads(run(["ip", "-j", "-n", plain.name, "neigh", "show", "241.1.10.1"]).stdout)
        assert not gateway or "PERMANENT" not in gateway[0]["state"]
        assert lab.ping(plain, pods[0].ip) and lab.ping(pods[0], plain.ip) and lab.ping(plain, "241.1.10.1")
    finally:
        lab.del_pods([plain], conf)
    assert plain.ip not in lab.our_neighbours()


@pytest.mark.kernel
def test_del_leaves_nothing_and_repeats(lab: Lab):
    [pod] = lab.add_pods(1)
    assert pod.ip in lab.our_neighbours()
    lab.del_pods([pod], delete_netns=False)
    assert pod.ip not in lab.our_neighbours()
    assert pod.mac not in lab.static_fdb()
    assert pod.veth not in lab.host_veths()
    again = lab.call("DEL", pod.cid, pod.path)
    assert again.code == 0, again
    lab.delete_netns([pod])


@pytest.mark.kernel
def test_del_after_the_pod_namespace_is_gone(lab: Lab):
    """The veth (and its alias) went with the namespace: DEL finds the address in the IPAM record."""
    [pod] = lab.add_pods(1)
    run(["ip", "netns", "del", pod.name])
    deadline = time.monotonic() + 5
    while pod.veth in lab.host_veths() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pod.ip in lab.our_neighbours()
    outcome = lab.call("DEL", pod.cid, pod.path)
    assert outcome.code == 0, outcome
    assert pod.ip not in lab.our_neighbours()
    assert pod.ip not in lab.records()
    lab.pods.pop(pod.name, None)


@pytest.mark.kernel
def test_gc_removes_what_ports_that_are_gone_left(lab: Lab, pods: list[Pod]):
    [doomed] = lab.add_pods(1)
    lab.ip("link", "del", doomed.veth)  # as if the pod vanished without a DEL
    # An entry of ours that no port claims, and one that is not ours: GC takes only the first.
    lab.ip("neigh", "replace", "241.1.10.250", "lladdr", "0a:00:00:00:00:fa", "dev", lab.bridge_name(),
           "nud", "permanent", "proto", str(portguard.NEIGH_PROTOCOL))
    lab.ip("neigh", "replace", "241.1.10.251", "lladdr", "0a:00:00:00:00:fb", "dev", lab.bridge_name(),
           "nud", "permanent")
    conf = lab.conf(cniVersion="1.1.0")
    conf["cni.dev/valid-attachments"] = [{"containerID": p.cid, "ifname": "eth0"} for p in pods]
    outcome = lab.call("GC", conf=conf)
    assert outcome.code == 0, outcome
    left = lab.our_neighbours()
    assert doomed.ip not in left and "241.1.10.250" not in left
    assert {p.ip for p in pods} <= set(left)
    plain = json.loads(run(["ip", "-j", "-n", lab.node, "neigh", "show", "241.1.10.251"]).stdout)
    assert plain, "GC deleted a neighbour entry that is not ours"
    lab.ip("neigh", "del", "241.1.10.251", "dev", lab.bridge_name())
    assert doomed.ip not in lab.records()
    lab.delete_netns([doomed])


@pytest.mark.kernel
def test_install_again_changes_nothing(lab: Lab, pods: list[Pod]):
    """install is idempotent: run it twice more on a pod's port, one filter and one entry remain."""
    from cni_fan.config import FanConfig

    pod = pods[4]
    before = (lab.our_neighbours(), lab.static_fdb())
    with inside(lab.node_path), Rtnl() as rtnl:
        bridge_index = rtnl_links.get_link(rtnl, lab.bridge_name()).index
    veth_index = lab.ip_json("link", "show", pod.veth)[0]["ifindex"]
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        for _ in range(2):
            with inside(lab.node_path):
                portguard.install(FanConfig.from_dict(lab.conf()), bridge_index=bridge_index, veth_index=veth_index,
                                  pod_netns_fd=fd, pod_ifname="eth0", pod_ip=f"{pod.ip}/24", pod_mac=pod.mac,
                                  gateway="241.1.10.1")
    finally:
        os.close(fd)
    assert (lab.our_neighbours(), lab.static_fdb()) == before
    filters = run(["tc", "-n", lab.node, "filter", "show", "dev", pod.veth, "ingress"]).stdout
    assert filters.count("cni-fan-guard") == 1, filters
    assert lab.ping(pod, pods[0].ip)


@pytest.mark.kernel
def test_install_failing_half_way_leaves_no_neighbour_entry(lab: Lab, pods: list[Pod]):
    """The host side succeeds, the pod side fails (no such interface): the bridge entry is taken back."""
    from cni_fan.config import FanConfig
    from cni_fan.net.errors import GuardError

    [pod] = lab.new_pods(1)
    with inside(lab.node_path), Rtnl() as rtnl:
        bridge_index = rtnl_links.get_link(rtnl, lab.bridge_name()).index
    veth = "tpgfail0"
    lab.ip("link", "add", veth, "master", lab.bridge_name(), "type", "veth", "peer", "name", "eth9", "netns", pod.name)
    veth_index = lab.ip_json("link", "show", veth)[0]["ifindex"]
    cfg = FanConfig.from_dict(lab.conf())
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        with inside(lab.node_path), pytest.raises(GuardError, match="in the pod"):
            portguard.install(cfg, bridge_index=bridge_index, veth_index=veth_index, pod_netns_fd=fd,
                              pod_ifname="eth0", pod_ip="241.1.10.249/24", pod_mac="0a:00:00:00:00:f9",
                              gateway="241.1.10.1")
    finally:
        os.close(fd)
    assert "241.1.10.249" not in lab.our_neighbours()
    with inside(lab.node_path):
        assert portguard.remove(veth) is None  # the alias is there, the entry is already gone
    lab.ip("link", "del", veth)
    lab.delete_netns([pod])


def _flood_count(lab: Lab, asker: Pod, others: list[Pod]) -> int:
    """Frames the other pods received while `asker` resolved and pinged each once, minus the pings."""
    run(["ip", "-n", asker.name, "neigh", "flush", "dev", "eth0"])
    before = lab.veth_tx(p.veth for p in others)
    for pod in others:
        assert lab.ping(asker, pod.ip)
    after = lab.veth_tx(p.veth for p in others)
    return sum(after[v] - before[v] for v in after) - len(others)


@pytest.mark.kernel
def test_without_neighbour_suppression_every_pod_sees_every_request(tmp_path: Path):
    """The control of the flood count: with `neighSuppress: false` the bridge floods."""
    lab = Lab(tmp_path, neighSuppress=False)
    try:
        pods = lab.add_pods(4)
        assert _flood_count(lab, pods[0], pods[1:]) >= 3 * 2  # each request reached the two bystanders
        lab.del_pods(pods)
    finally:
        lab.close()


@pytest.mark.kernel
def test_kernel_neigh_suppress_on_pod_ports_would_flood(lab: Lab, pods: list[Pod]):
    """Why the guard uses proxyarp_wifi and not neigh_suppress (EVPN's knob):
    the bridge does not answer requests arriving on a neigh_suppress port and
    floods them (shown with bcast_flood on, which the guard turns off)."""
    asker, others = pods[0], pods[1:]
    try:
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "bcast_flood", "on")
        assert _flood_count(lab, asker, others) == 0  # answered by the bridge, not flooded
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "neigh_suppress", "on")
        assert _flood_count(lab, asker, others) >= len(others) * (len(others) - 1)  # flooded
    finally:
        for pod in pods:
            lab.ip("link", "set", "dev", pod.veth, "type", "bridge_slave", "neigh_suppress", "off",
                   "bcast_flood", "off")
