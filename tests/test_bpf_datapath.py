"""The Fan datapath in the real kernel: nodes and pods in network namespaces.

Topology (every name starts with ``tbpf-<random>-``; nothing of the host's
own is touched):

    underlay switch ns: bridge ``sw0``, 198.18.0.0/16, MTU 1500
      node n1 198.18.1.10   owns 241.1.10.0/24   pod p1 241.1.10.5
      node n2 198.18.2.20   owns 241.2.20.0/24   pod p2 241.2.20.5
      node n3 198.18.3.30   owns 241.3.30.0/24   pod p3 241.3.30.5

Each node: ``ul0`` (underlay), fan bridge ``fanbr`` (gateway .1), a plain
VXLAN device ``fanvx`` (VNI 241, port 4789, nolearning, the same MAC on every
node, no FDB entries) that only receives, one route 241.0.0.0/8 via an
on-link next hop with a permanent neighbour entry, and the generated program
on the tc egress of ``fanvx`` (all traffic the kernel routes into the
overlay) and, with ``attach_point="bridge"``, also on the tc ingress of
``fanbr`` (pods' traffic, skipping the kernel's forwarding). Pods have MTU
1500 - 50.

``Lab`` is also used by bench/datapath_probe.py (mode "flannel": the same
nodes with a classic VXLAN device and per-peer route, neighbour and FDB
entries instead of the program).
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import secrets
import socket
import struct
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

OVERLAY = ipaddress.IPv4Network("241.0.0.0/8")
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")
UNDERLAY_MTU = 1500
POD_MTU = UNDERLAY_MTU - 50
VNI = 241
TUNNEL_MAC = "02:fa:f1:00:00:01"      # shared by every node's fanvx
INNER_SRC_MAC = "02:fa:f1:00:00:02"   # the program's inner source MAC
NEXT_HOP = "241.0.0.1"                # in the slice of underlay .0.0: no host
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# -- namespaces and sockets ---------------------------------------------------

@contextmanager
def entered(ns: str):
    """Run the block in network namespace ``ns`` (this thread only);
    sockets created inside stay in that namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(target)
        os.close(home)


def sh(ns: str, *cmd: str, check: bool = True) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check,
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def ip_json(ns: str, *args: str) -> list:
    text = sh(ns, *args)
    return json.loads(text) if text.strip() else []


def _icmp_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class Icmp:
    """An ICMP message received in answer to (or as a copy of) our echo."""

    kind: str          # "reply", "request", "time-exceeded", "unreachable"
    src: str
    ttl: int
    code: int = 0
    mtu: int = 0
    size: int = 0


def icmp_socket(ns: str) -> socket.socket:
    with entered(ns):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW,
                             socket.IPPROTO_ICMP)


def _parse(data: bytes, ident: int, seq: int) -> Icmp | None:
    ihl = (data[0] & 15) * 4
    ttl, src = data[8], socket.inet_ntoa(data[12:16])
    typ, code = data[ihl], data[ihl + 1]
    if typ in (0, 8):
        i, s = struct.unpack_from("!HH", data, ihl + 4)
        if (i, s) == (ident, seq):
            return Icmp("reply" if typ == 0 else "request", src, ttl,
                        size=len(data))
    elif typ in (3, 11):
        inner = data[ihl + 8:]
        if len(inner) >= 28:
            iihl = (inner[0] & 15) * 4
            i, s = struct.unpack_from("!HH", inner, iihl + 4)
            if (i, s) == (ident, seq):
                mtu = struct.unpack_from("!H", data, ihl + 6)[0]
                return Icmp("time-exceeded" if typ == 11 else "unreachable",
                            src, ttl, code, mtu)
    return None


def ping(ns: str, dst: str, *, payload: int = 56, ttl: int = 64,
         timeout: float = 1.0, tries: int = 3,
         watch: socket.socket | None = None) -> tuple[Icmp | None,
                                                      Icmp | None]:
    """Echo request with DF set from namespace ``ns``.

    Returns (answer, copy seen by ``watch``): the answer is the echo reply or
    an ICMP error about our request; ``watch`` is a raw socket in the
    destination namespace that sees the request arrive (its TTL).
    Raises OSError (EMSGSIZE) when the local MTU refuses the packet.
    """
    ident = secrets.randbits(16)
    with icmp_socket(ns) as s:
        s.setsockopt(socket.SOL_IP, 10, 2)        # IP_MTU_DISCOVER = DO
        s.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
        for seq in range(1, tries + 1):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(payload)
            body = body[:2] + struct.pack("!H", _icmp_csum(body)) + body[4:]
            s.sendto(body, (dst, 0))
            deadline = time.monotonic() + timeout
            answer = None
            while answer is None and time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = s.recv(65535)
                except socket.timeout:
                    break
                answer = _parse(data, ident, seq)
            if answer is None:
                continue
            seen = None
            if watch is not None:
                watch.settimeout(0.5)
                try:
                    while seen is None:
                        seen = _parse(watch.recv(65535), ident, seq)
                        if seen and seen.kind != "request":
                            seen = None
                except socket.timeout:
                    pass
            return answer, seen
    return None, None


# -- the lab ----------------------------------------------------------------

@dataclass
class Node:
    name: str
    ns: str
    underlay: ipaddress.IPv4Address
    slice: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    ul_index: int = 0
    br_index: int = 0
    vx_index: int = 0
    vx_mac: str = ""
    map_fd: int | None = None
    prog_fds: dict = field(default_factory=dict)


@dataclass
class Pod:
    name: str
    ns: str
    node: Node
    address: ipaddress.IPv4Address


class Lab:
    """Nodes, pods and an underlay switch in fresh namespaces.

    ``mode``: "fan" (plain VXLAN receive device + generated program, no
    per-peer state) or "flannel" (classic VXLAN with per-peer route,
    neighbour and FDB entries, no program). Always call :meth:`close`.
    """

    def __init__(self, nodes: int = 3, mode: str = "fan",
                 onlink_underlay: bool = False, attach_point: str = "bridge",
                 counters: bool = True) -> None:
        if mode not in ("fan", "flannel"):
            raise ValueError(mode)
        if attach_point not in ("bridge", "veth", "none"):
            raise ValueError(attach_point)
        self.mode = mode
        self.onlink_underlay = onlink_underlay
        self.attach_point = attach_point
        self.with_counters = counters
        self.prefix = f"tbpf-{secrets.token_hex(3)}-"
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.switch = self._netns("sw")
        self._count = nodes

    # -- building ----------------------------------------------------------
    def _netns(self, role: str) -> str:
        from pyroute2 import netns
        name = self.prefix + role
        netns.create(name)
        self.namespaces.append(name)
        sh(name, "ip", "link", "set", "lo", "up")
        return name

    def build(self) -> "Lab":
        from pyroute2 import IPRoute
        with IPRoute(netns=self.switch) as ipr:
            ipr.link("add", ifname="sw0", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="sw0")[0],
                     state="up")
        for i in range(1, self._count + 1):
            self._add_node(i)
        if self.mode == "fan":
            for node in self.nodes:
                self._load_programs(node)
        else:
            for node in self.nodes:
                self._flannel_peers(node)
        for node in self.nodes:
            self.add_pod(node)
        return self

    def _add_node(self, i: int) -> None:
        from pyroute2 import IPRoute
        name = f"n{i}"
        ns = self._netns(name)
        underlay = ipaddress.IPv4Address(f"198.18.{i}.{i * 10}")
        host = int(underlay) & int(UNDERLAY.hostmask)
        cbits = 32 - (OVERLAY.prefixlen + 32 - UNDERLAY.prefixlen)
        slice_ = ipaddress.IPv4Network(
            (int(OVERLAY.network_address) | host << cbits, 32 - cbits))
        node = Node(name, ns, underlay, slice_, slice_.network_address + 1)
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname="ul0", kind="veth", peer=name)
            peer = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=peer, net_ns_fd=self.switch)
            node.ul_index = ipr.link_lookup(ifname="ul0")[0]
            ipr.link("set", index=node.ul_index, mtu=UNDERLAY_MTU, state="up")
            ipr.addr("add", index=node.ul_index, address=str(underlay),
                     prefixlen=UNDERLAY.prefixlen)
            # A fixed MAC: a bridge otherwise takes its lowest port's MAC,
            # which changes as pods come and go.
            ipr.link("add", ifname="fanbr", kind="bridge",
                     address="02:fc:00:00:%02x:%02x" % (i >> 8, i & 0xFF))
            node.br_index = ipr.link_lookup(ifname="fanbr")[0]
            ipr.link("set", index=node.br_index, mtu=POD_MTU, state="up")
            ipr.addr("add", index=node.br_index, address=str(node.gateway),
                     prefixlen=slice_.prefixlen)
            if self.mode == "fan":
                mac = TUNNEL_MAC
                ipr.link("add", ifname="fanvx", kind="vxlan", vxlan_id=VNI,
                         vxlan_port=4789, vxlan_learning=0, address=mac)
            else:
                mac = "02:fb:00:00:%02x:%02x" % (i >> 8, i & 0xFF)
                ipr.link("add", ifname="fanvx", kind="vxlan", vxlan_id=VNI,
                         vxlan_port=4789, vxlan_learning=0, address=mac,
                         vxlan_local=str(underlay), vxlan_link=node.ul_index)
            node.vx_index = ipr.link_lookup(ifname="fanvx")[0]
            node.vx_mac = mac
            ipr.link("set", index=node.vx_index, mtu=POD_MTU, state="up")
            if self.mode == "fan":
                ipr.neigh("add", dst=NEXT_HOP, lladdr=TUNNEL_MAC,
                          ifindex=node.vx_index, state=0x80)  # PERMANENT
                ipr.route("add", dst=str(OVERLAY), gateway=NEXT_HOP,
                          oif=node.vx_index, flags=4,         # RTNH_F_ONLINK
                          prefsrc=str(node.gateway))
        with IPRoute(netns=self.switch) as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx,
                     master=ipr.link_lookup(ifname="sw0")[0], state="up")
        sh(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1")
        self.nodes.append(node)

    def _flannel_peers(self, node: Node) -> None:
        """Classic VXLAN: per peer a route, a neighbour and an FDB entry."""
        from pyroute2 import IPRoute
        with IPRoute(netns=node.ns) as ipr:
            for peer in self.nodes:
                if peer is node:
                    continue
                vtep = str(peer.slice.network_address)
                ipr.neigh("add", dst=vtep, lladdr=peer.vx_mac,
                          ifindex=node.vx_index, state=0x80)
                ipr.fdb("add", ifindex=node.vx_index, lladdr=peer.vx_mac,
                        dst=str(peer.underlay))
                ipr.route("add", dst=str(peer.slice), gateway=vtep,
                          oif=node.vx_index, flags=4,
                          prefsrc=str(node.gateway))

    def params(self, node: Node, hook):
        from pyroute2 import IPRoute

        from cni_fan.bpf.fanprog import FanDatapathParams, Hook
        gateway_mac = None
        if hook is Hook.INGRESS and self.attach_point == "veth":
            with IPRoute(netns=node.ns) as ipr:
                gateway_mac = ipr.get_links(node.br_index)[0].get_attr(
                    "IFLA_ADDRESS")
        return FanDatapathParams(
            overlay=OVERLAY, underlay=UNDERLAY, local_underlay=node.underlay,
            underlay_ifindex=node.ul_index, vni=VNI, tunnel_mac=TUNNEL_MAC,
            inner_src_mac=INNER_SRC_MAC, hook=hook, overlay_mtu=POD_MTU,
            onlink_underlay=self.onlink_underlay, gateway_mac=gateway_mac)

    def _load_programs(self, node: Node) -> None:
        from cni_fan.bpf import syscall
        from cni_fan.net import tc
        from cni_fan.net.rtnl import Rtnl
        from cni_fan.bpf.fanprog import (COUNTER_SLOTS, Hook,
                                         build_encap_program)
        if self.with_counters:
            node.map_fd = syscall.create_percpu_array(8, COUNTER_SLOTS,
                                                      f"fan_{node.name}")
        for hook, index in ((Hook.INGRESS, node.br_index),
                            (Hook.EGRESS, node.vx_index)):
            code = build_encap_program(self.params(node, hook), node.map_fd)
            fd = syscall.load_sched_cls(code, f"fan_{node.name}_{hook.value}")
            node.prog_fds[hook] = fd
            if hook is Hook.INGRESS and self.attach_point != "bridge":
                continue   # on each pod's veth (add_pod), or nowhere
            with Rtnl.in_netns(node.ns) as sock:
                tc.attach(sock, index, fd, hook)

    def add_pod(self, node: Node, mtu: int = POD_MTU,
                index: int = 5) -> Pod:
        from pyroute2 import IPRoute
        name = f"p{node.name[1:]}{'' if index == 5 else index}"
        ns = self._netns(name)
        address = node.slice.network_address + index
        host_if = f"v{name}"
        with IPRoute(netns=node.ns) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer="eth0")
            peer = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=peer, net_ns_fd=ns)
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, mtu=mtu, master=node.br_index,
                     state="up")
            if self.mode == "fan" and self.attach_point == "veth":
                from cni_fan.bpf.fanprog import Hook
                from cni_fan.net import tc
                from cni_fan.net.rtnl import Rtnl
                with Rtnl.in_netns(node.ns) as sock:
                    tc.attach(sock, idx, node.prog_fds[Hook.INGRESS],
                              Hook.INGRESS)
        with IPRoute(netns=ns) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=idx, mtu=mtu, state="up")
            ipr.addr("add", index=idx, address=str(address),
                     prefixlen=node.slice.prefixlen)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(node.gateway))
        pod = Pod(name, ns, node, address)
        self.pods.append(pod)
        return pod

    # -- reading -------------------------------------------------------------
    def counters(self, node: Node) -> dict[tuple[str, str], int]:
        from cni_fan.bpf import syscall
        from cni_fan.bpf.fanprog import Counter, Hook, counter_key
        return {(h.value, c.name): sum(syscall.read_percpu_u64(
                    node.map_fd, counter_key(h, c)))
                for h in Hook for c in Counter}

    def close(self) -> None:
        from pyroute2 import netns
        errors = []
        for node in self.nodes:
            for fd in list(node.prog_fds.values()) + [node.map_fd]:
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            node.prog_fds.clear()
            node.map_fd = None
        for name in reversed(self.namespaces):
            try:
                netns.remove(name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    errors.append(f"{name}: {exc}")
        self.namespaces.clear()
        if errors:
            raise RuntimeError("could not remove namespaces: "
                               + "; ".join(errors))


# -- tests ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["none", "bridge"])
def lab(request):
    # "none": the product default, the program only on fanvx egress (the
    # kernel forwards pods' traffic); "bridge": also on the fan bridge's
    # ingress, bypassing the sending node's forwarding path.
    lab = Lab(nodes=3, attach_point=request.param)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
    from pyroute2 import netns
    assert not [n for n in netns.listnetns() if n.startswith(lab.prefix)]


def pod(lab: Lab, name: str) -> Pod:
    return next(p for p in lab.pods if p.name == name)


def test_programs_are_attached_where_intended(lab) -> None:
    from cni_fan.bpf import syscall
    from cni_fan.bpf.fanprog import Hook
    from cni_fan.net import tc
    from cni_fan.net.rtnl import Rtnl
    for node in lab.nodes:
        with Rtnl.in_netns(node.ns) as sock:
            for hook, index in ((Hook.INGRESS, node.br_index),
                                (Hook.EGRESS, node.vx_index)):
                pid = syscall.prog_info(node.prog_fds[hook]).id
                wanted = hook is Hook.EGRESS or lab.attach_point == "bridge"
                assert tc.is_attached(sock, index, hook,
                                      prog_id=pid) == wanted
                assert not tc.is_attached(sock, index, hook,
                                          prog_id=pid + 100000)


def test_pod_to_pod_across_nodes_and_back(lab) -> None:
    p1, p2, p3 = pod(lab, "p1"), pod(lab, "p2"), pod(lab, "p3")
    before = lab.counters(p1.node)
    for src, dst in ((p1, p2), (p2, p1), (p1, p3), (p3, p2)):
        answer, _ = ping(src.ns, str(dst.address))
        assert answer is not None and answer.kind == "reply", (src, dst)
        assert answer.src == str(dst.address)
    after = lab.counters(p1.node)
    # Which attach point did the work: with "bridge", the bridge's tc
    # ingress (pods' frames to their gateway MAC pass it on the way up to
    # the bridge); otherwise fanvx's egress after the kernel forwarded.
    worker, idle = ("ingress", "egress") if lab.attach_point == "bridge" \
        else ("egress", "ingress")
    assert after[(worker, "ENCAPSULATED")] - \
        before[(worker, "ENCAPSULATED")] >= 2
    assert after[(idle, "ENCAPSULATED")] == before[(idle, "ENCAPSULATED")]


def test_ttl_is_decremented_once_per_node(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    with icmp_socket(p2.ns) as watch:
        answer, seen = ping(p1.ns, str(p2.address), ttl=64, watch=watch)
    # Two routers on the way: node 1 (the program) and node 2 (the kernel).
    assert seen is not None and seen.ttl == 62
    assert answer is not None and answer.ttl == 62


def test_ttl_expiry_is_reported_like_a_router(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    answer, _ = ping(p1.ns, str(p2.address), ttl=1)
    assert answer is not None and answer.kind == "time-exceeded"
    assert answer.src == str(p1.node.gateway)
    answer, _ = ping(p1.ns, str(p2.address), ttl=2)
    assert answer is not None and answer.kind == "time-exceeded"
    assert ipaddress.IPv4Address(answer.src) in p2.node.slice


def test_node_to_remote_pod(lab) -> None:
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    before = lab.counters(n1)
    with icmp_socket(p2.ns) as watch:
        answer, seen = ping(n1.ns, str(p2.address), watch=watch)
    assert answer is not None and answer.kind == "reply"
    assert seen is not None and seen.src == str(n1.gateway)
    assert seen.ttl == 63   # node 1 originates, only node 2 forwards
    after = lab.counters(n1)
    assert after[("egress", "ENCAPSULATED")] > \
        before[("egress", "ENCAPSULATED")]


def test_remote_pod_to_node_and_node_to_node_overlay(lab) -> None:
    p3, n1, n2 = pod(lab, "p3"), lab.nodes[0], lab.nodes[1]
    answer, _ = ping(p3.ns, str(n1.gateway))
    assert answer is not None and answer.kind == "reply"
    answer, _ = ping(n2.ns, str(n1.gateway))
    assert answer is not None and answer.kind == "reply"


def test_full_size_df_packet_passes_and_one_byte_more_does_not(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    full = POD_MTU - 28
    answer, _ = ping(p1.ns, str(p2.address), payload=full)
    assert answer is not None and answer.kind == "reply"
    assert answer.size == POD_MTU   # a 1450-byte IP packet came back
    with pytest.raises(OSError) as info:
        ping(p1.ns, str(p2.address), payload=full + 1)
    assert info.value.errno == errno.EMSGSIZE
    # The node itself: its overlay route goes through fanvx (MTU 1450).
    n1 = lab.nodes[0]
    answer, _ = ping(n1.ns, str(p2.address), payload=full)
    assert answer is not None and answer.kind == "reply"
    with pytest.raises(OSError) as info:
        ping(n1.ns, str(p2.address), payload=full + 1)
    assert info.value.errno == errno.EMSGSIZE


def test_pod_ignoring_the_mtu_gets_fragmentation_needed(lab) -> None:
    # A pod whose interface claims 1500 sends a 1451-byte DF packet: the
    # program leaves it to the kernel, which answers as a router must.
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    big = lab.add_pod(n1, mtu=UNDERLAY_MTU, index=6)
    answer, _ = ping(big.ns, str(p2.address), payload=POD_MTU + 1 - 28)
    assert answer is not None and answer.kind == "unreachable"
    assert answer.code == 4 and answer.mtu == POD_MTU
    answer, _ = ping(big.ns, str(p2.address), payload=POD_MTU - 28)
    assert answer is not None and answer.kind == "reply"


def test_tcp_bulk_transfer(lab) -> None:
    # GSO super-packets through adjust_room (FIXED_GSO) and redirect_neigh.
    _tcp_transfer(pod(lab, "p1"), pod(lab, "p3"), 32, 5201)


def _tcp_transfer(src: Pod, dst: Pod, megabytes: int, port: int) -> None:
    server = subprocess.Popen(
        ["ip", "netns", "exec", dst.ns, "python3", "-c",
         "import socket\n"
         "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
         "socket.SO_REUSEADDR,1)\n"
         f"s.bind(('0.0.0.0',{port})); s.listen(1); print('up',flush=True)\n"
         "c,_=s.accept(); n=0\n"
         "while True:\n"
         "    b=c.recv(1<<20)\n"
         "    if not b: break\n"
         "    n+=len(b)\n"
         "c.sendall(str(n).encode()); c.close()\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        with entered(src.ns):
            c = socket.create_connection((str(dst.address), port), timeout=20)
        with c:
            blob = os.urandom(1 << 20)
            for _ in range(megabytes):
                c.sendall(blob)
            c.shutdown(socket.SHUT_WR)
            got = c.recv(100)
        assert int(got) == megabytes << 20
    finally:
        server.kill()
        server.wait()


def test_gso_segments_fit_the_underlay_mtu(lab) -> None:
    # On veth the encapsulated GSO packets would cross whole; with UDP-tunnel
    # segmentation offload off on node 1's underlay device the kernel must
    # segment them in software, which only yields frames that fit 1500 if
    # the program kept the inner MSS (FIXED_GSO) and pods use MTU 1450.
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    n1 = p1.node
    sh(n1.ns, "ethtool", "-K", "ul0", "tx-udp_tnl-segmentation", "off",
       "tx-udp_tnl-csum-segmentation", "off")
    import threading
    with entered(lab.switch):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                            socket.htons(0x0003))
    sizes: list[int] = []
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            try:
                frame, addr = cap.recvfrom(70000)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 and \
                    frame[36:38] == struct.pack("!H", 4789):
                sizes.append(len(frame))

    try:
        cap.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
        cap.bind((n1.name, 0))
        cap.settimeout(0.2)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        _tcp_transfer(p1, p2, 8, 5202)
        time.sleep(0.5)
        done.set()
        reader.join(timeout=5)
    finally:
        done.set()
        cap.close()
        sh(n1.ns, "ethtool", "-K", "ul0", "tx-udp_tnl-segmentation", "on",
           "tx-udp_tnl-csum-segmentation", "on")
    assert len(sizes) > 5000     # 8 MiB in ~1400-byte segments
    assert max(sizes) == 14 + UNDERLAY_MTU


def _per_peer_state(lab: Lab, node: Node) -> dict[str, list]:
    """Everything in a node's namespace that names another node.

    "Per-peer state" means any route, neighbour or FDB entry that refers to
    another node's underlay address or to an address in another node's
    slice, or any tunnel-device FDB entry at all. The one exception is the
    underlay's own ARP cache on ``ul0`` (kernel-learned, never permanent),
    which any host has for the neighbours it talks to.
    """
    others = [n for n in lab.nodes if n is not node]
    remote_nets = [n.slice for n in others]
    remote_ul = {str(n.underlay) for n in others}

    def remote(addr: str | None) -> bool:
        if not addr or ":" in addr:
            return False
        a = ipaddress.IPv4Address(addr.split("/")[0])
        return str(a) in remote_ul or any(a in net for net in remote_nets)

    found: dict[str, list] = {"routes": [], "neighbours": [], "fdb": []}
    for r in ip_json(node.ns, "ip", "-j", "-4", "route", "show", "table",
                     "all"):
        dst = r.get("dst", "")
        net = None if dst in ("default", "") else \
            ipaddress.IPv4Network(dst if "/" in dst else dst + "/32")
        # A route to (part of) a remote slice or to a peer is per-peer; the
        # one route for the whole overlay is not.
        if (net is not None and any(net.subnet_of(n) for n in remote_nets)
                or remote(r.get("gateway")) or remote(r.get("prefsrc"))
                or dst in remote_ul):
            found["routes"].append(r)
    for r in ip_json(node.ns, "ip", "-j", "-4", "route", "show", "cache"):
        found["routes"].append(r)
    for n in ip_json(node.ns, "ip", "-j", "-4", "neigh", "show"):
        if n.get("dev") == "ul0" and n["dst"] in remote_ul and \
                "PERMANENT" not in n.get("state", []) and \
                "NOARP" not in n.get("state", []):
            continue   # the underlay's ARP cache
        if n.get("dev") == "fanvx" or remote(n["dst"]):
            found["neighbours"].append(n)
    for f in ip_json(node.ns, "bridge", "-j", "fdb", "show", "dev", "fanvx"):
        found["fdb"].append(f)
    return found


def test_nodes_hold_no_per_peer_state(lab) -> None:
    # Make sure every pair has talked (pods and nodes), then look.
    for src in lab.pods[:3]:
        for dst in lab.pods[:3]:
            if src is not dst:
                ping(src.ns, str(dst.address))
    for node in lab.nodes:
        for other in lab.nodes:
            if other is not node:
                ping(node.ns, str(other.gateway))
    for node in lab.nodes:
        state = _per_peer_state(lab, node)
        # Exactly the one permanent next hop on the tunnel device...
        vx = state["neighbours"]
        assert [(n["dst"], n["lladdr"]) for n in vx] == \
            [(NEXT_HOP, TUNNEL_MAC)], vx
        assert "PERMANENT" in vx[0]["state"]
        # ...and nothing else that names a peer.
        assert state["routes"] == [] and state["fdb"] == [], state
        overlay_routes = [r for r in ip_json(node.ns, "ip", "-j", "-4",
                                             "route", "show")
                          if r["dst"].startswith("241.")]
        assert sorted(r["dst"] for r in overlay_routes) == \
            sorted([str(OVERLAY), str(node.slice)])


def test_reattach_after_someone_deletes_the_filter(lab) -> None:
    from cni_fan.bpf import syscall
    from cni_fan.bpf.fanprog import Hook
    from cni_fan.net import tc
    from cni_fan.net.rtnl import Rtnl
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    fd = n1.prog_fds[Hook.EGRESS]
    pid = syscall.prog_info(fd).id
    with Rtnl.in_netns(n1.ns) as sock:
        assert tc.detach(sock, n1.vx_index, Hook.EGRESS)
        assert not tc.detach(sock, n1.vx_index, Hook.EGRESS)
        assert not tc.is_attached(sock, n1.vx_index, Hook.EGRESS,
                                  prog_id=pid)
        # Without the program the plain VXLAN device has nowhere to send.
        answer, _ = ping(n1.ns, str(p2.address), tries=1, timeout=0.5)
        assert answer is None
        tc.attach(sock, n1.vx_index, fd, Hook.EGRESS)
        tc.attach(sock, n1.vx_index, fd, Hook.EGRESS)   # idempotent
        assert tc.is_attached(sock, n1.vx_index, Hook.EGRESS, prog_id=pid)
        assert len(tc.list_attached(sock, n1.vx_index, Hook.EGRESS)) == 1
    answer, _ = ping(n1.ns, str(p2.address))
    assert answer is not None and answer.kind == "reply"


@pytest.fixture(scope="module")
def iptables():
    from shutil import which
    if which("iptables") is None:
        pytest.skip("iptables not installed")


def _with_invalid_drop(lab: Lab) -> None:
    # What kube-proxy installs on every node (KUBE-FORWARD).
    for node in lab.nodes:
        sh(node.ns, "iptables", "-A", "FORWARD", "-m", "conntrack",
           "--ctstate", "INVALID", "-j", "DROP")


def test_egress_only_keeps_conntrack_symmetric(iptables) -> None:
    lab = Lab(nodes=2, attach_point="none")
    try:
        lab.build()
        _with_invalid_drop(lab)
        p1, p2 = lab.pods
        answer, _ = ping(p1.ns, str(p2.address))
        assert answer is not None and answer.kind == "reply"
    finally:
        lab.close()


def test_bridge_ingress_bypasses_the_sending_nodes_conntrack(iptables) -> None:
    # The documented limit of the fast path: each node's conntrack sees only
    # one direction of a cross-node flow, so "ctstate INVALID" drops it.
    lab = Lab(nodes=2, attach_point="bridge")
    try:
        lab.build()
        _with_invalid_drop(lab)
        p1, p2 = lab.pods
        answer, _ = ping(p1.ns, str(p2.address), tries=1)
        assert answer is None
    finally:
        lab.close()


def test_onlink_next_hop_variant() -> None:
    # bpf_redirect_neigh given the outer destination as next hop (no route
    # lookup): valid on a flat underlay like this one.
    lab = Lab(nodes=2, onlink_underlay=True)
    try:
        lab.build()
        p1, p2 = lab.pods[0], lab.pods[1]
        answer, _ = ping(p1.ns, str(p2.address))
        assert answer is not None and answer.kind == "reply"
        answer, _ = ping(lab.nodes[0].ns, str(p2.address))
        assert answer is not None and answer.kind == "reply"
    finally:
        lab.close()


def test_veth_attach_point_variant() -> None:
    # The alternative attach point: each pod's host-side veth (the program
    # then checks the gateway MAC itself, frames are not PACKET_HOST there).
    lab = Lab(nodes=2, attach_point="veth")
    try:
        lab.build()
        p1, p2 = lab.pods[0], lab.pods[1]
        with icmp_socket(p2.ns) as watch:
            answer, seen = ping(p1.ns, str(p2.address), watch=watch)
        assert answer is not None and answer.kind == "reply"
        assert seen is not None and seen.ttl == 62
        assert lab.counters(p1.node)[("ingress", "ENCAPSULATED")] >= 1
    finally:
        lab.close()


def test_per_peer_check_sees_flannel_style_state() -> None:
    # The checker above must not be blind: a classic VXLAN set-up (the
    # bench's baseline) holds a route, a neighbour and an FDB entry per peer.
    lab = Lab(nodes=3, mode="flannel")
    try:
        lab.build()
        p1, p2 = lab.pods[0], lab.pods[1]
        answer, _ = ping(p1.ns, str(p2.address))
        assert answer is not None and answer.kind == "reply"
        state = _per_peer_state(lab, lab.nodes[0])
        assert len(state["routes"]) == 2
        assert len(state["neighbours"]) == 2
        assert len(state["fdb"]) >= 2
    finally:
        lab.close()
