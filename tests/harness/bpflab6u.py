"""An IPv6-only Fan datapath built by hand in network namespaces.

The IPv6-underlay counterpart of harness/bpflab.py (which stays IPv4
underlay): no IPv4 anywhere, the underlay is ``fd00:198:18::/112`` and the
overlay ``fd50::/48``, so each node's 16 host bits name its /64 slice:

    underlay switch ns: bridge ``sw0``, MTU 1500
      node n1 fd00:198:18::1c   owns fd50:0:0:1c::/64   pod p1 fd50:0:0:1c::5
      node n2 fd00:198:18::2d   owns fd50:0:0:2d::/64   pod p2 fd50:0:0:2d::5
      node n3 fd00:198:18::3e   owns fd50:0:0:3e::/64   pod p3 fd50:0:0:3e::5

Each node (every name starts with ``tbu6-<random>-``; nothing of the
host's own is touched): ``ul0`` (underlay, no DAD), fan bridge ``fanbr``
(gateway ``::1``, fixed MAC), a plain VXLAN device ``fanvx`` bound to the
node's underlay address (``local``, VNI 241, port 4789, nolearning, the
shared MAC, no FDB entries, and ``udp6zerocsumrx`` unless the lab is built
without it) that only receives, one route ``fd50::/48 via fd50::1 dev fanvx
onlink`` with a permanent neighbour to the shared MAC, and the program of
:mod:`cni_fan.bpf.fanprog_u6` on the tc egress of ``fanvx`` and, with
``attach_point="bridge"``, on the tc ingress of ``fanbr``. Pods have MTU
1500 - 70.
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

from harness.bpflab import (INNER_SRC_MAC, TUNNEL_MAC, VNI, close_lab, netns_path, sh, wait_port_forwarding,
                            wait_solicited_node)

OVERLAY6 = ipaddress.IPv6Network("fd50::/48")
UNDERLAY6 = ipaddress.IPv6Network("fd00:198:18::/112")
UNDERLAY_MTU = 1500
POD_MTU = UNDERLAY_MTU - 70
NEXT_HOP6 = "fd50::1"            # in the slice of the underlay's first address: no host
HOSTS = (0x1C, 0x2D, 0x3E)


@dataclass
class Node:
    name: str
    ns: str
    underlay: ipaddress.IPv6Address
    slice6: ipaddress.IPv6Network
    gateway6: ipaddress.IPv6Address
    ul_index: int = 0
    br_index: int = 0
    vx_index: int = 0
    map_fd: int | None = None
    prog_fds: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return netns_path(self.ns)


@dataclass
class Pod:
    name: str
    ns: str
    node: Node
    address6: ipaddress.IPv6Address

    @property
    def path(self) -> str:
        return netns_path(self.ns)


class Lab6U:
    """Nodes, pods and an underlay switch, IPv6 only. Always call :meth:`close`.

    ``zero_csum_rx=False`` builds the receiving VXLAN devices without
    ``udp6zerocsumrx`` (the control: they then drop our packets);
    ``onlink_underlay`` gives the program's redirect the outer destination
    as an IPv6 next hop (no route lookup).
    """

    def __init__(self, nodes: int = 3, attach_point: str = "none", zero_csum_rx: bool = True,
                 onlink_underlay: bool = False) -> None:
        if attach_point not in ("bridge", "none"):
            raise ValueError(attach_point)
        if not 1 <= nodes <= len(HOSTS):
            raise ValueError(f"1 to {len(HOSTS)} nodes")
        self.attach_point = attach_point
        self.zero_csum_rx = zero_csum_rx
        self.onlink_underlay = onlink_underlay
        self.prefix = f"tbu6-{secrets.token_hex(3)}-"
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self._count = nodes
        self.switch = self._netns("sw")
        self.switch_path = netns_path(self.switch)

    # -- building ----------------------------------------------------------
    def _netns(self, role: str) -> str:
        from pyroute2 import netns
        name = self.prefix + role
        netns.create(name)
        self.namespaces.append(name)
        # No DAD anywhere: a tentative address drops traffic for a second.
        sh(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        sh(name, "ip", "link", "set", "lo", "up")
        return name

    def build(self) -> "Lab6U":
        sh(self.switch, "ip", "link", "add", "sw0", "type", "bridge")
        sh(self.switch, "ip", "link", "set", "sw0", "up")
        for i in range(1, self._count + 1):
            self._add_node(i)
        for node in self.nodes:
            self._load_programs(node)
        for node in self.nodes:
            self.add_pod(node)
        return self

    def _add_node(self, i: int) -> None:
        name = f"n{i}"
        ns = self._netns(name)
        host = HOSTS[i - 1]
        underlay = UNDERLAY6.network_address + host
        plen = OVERLAY6.prefixlen + UNDERLAY6.max_prefixlen - UNDERLAY6.prefixlen
        slice6 = ipaddress.IPv6Network((int(OVERLAY6.network_address) | host << (128 - plen), plen))
        node = Node(name, ns, underlay, slice6, slice6.network_address + 1)
        sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh(ns, "ip", "link", "add", "ul0", "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", name)
        sh(ns, "ip", "link", "set", name, "netns", self.switch)
        sh(self.switch, "ip", "link", "set", name, "master", "sw0", "up")
        sh(ns, "ip", "link", "set", "ul0", "up")
        sh(ns, "ip", "-6", "addr", "add", f"{underlay}/{UNDERLAY6.prefixlen}", "dev", "ul0", "nodad")
        # A fixed MAC: a bridge otherwise takes its lowest port's MAC.
        sh(ns, "ip", "link", "add", "fanbr", "address", f"02:fc:00:00:00:{i:02x}", "mtu", str(POD_MTU),
           "type", "bridge")
        sh(ns, "ip", "link", "set", "fanbr", "up")
        sh(ns, "ip", "-6", "addr", "add", f"{node.gateway6}/{slice6.prefixlen}", "dev", "fanbr", "nodad")
        zero = ["udp6zerocsumrx"] if self.zero_csum_rx else []
        sh(ns, "ip", "link", "add", "fanvx", "address", TUNNEL_MAC, "mtu", str(POD_MTU), "type", "vxlan",
           "id", str(VNI), "local", str(underlay), "dstport", "4789", "nolearning", *zero)
        sh(ns, "ip", "link", "set", "fanvx", "up")
        sh(ns, "ip", "-6", "neigh", "add", NEXT_HOP6, "lladdr", TUNNEL_MAC, "dev", "fanvx", "nud", "permanent")
        sh(ns, "ip", "-6", "route", "add", str(OVERLAY6), "via", NEXT_HOP6, "dev", "fanvx", "onlink",
           "src", str(node.gateway6))
        node.ul_index = _ifindex(ns, "ul0")
        node.br_index = _ifindex(ns, "fanbr")
        node.vx_index = _ifindex(ns, "fanvx")
        wait_port_forwarding(self.switch, name)
        wait_solicited_node(ns, "ul0", underlay)
        wait_solicited_node(ns, "fanbr", node.gateway6)
        self.nodes.append(node)

    def params(self, node: Node, hook):
        from cni_fan.bpf.fanprog import Hook
        from cni_fan.bpf.fanprog_u6 import Underlay6DatapathParams
        return Underlay6DatapathParams(
            overlay6=OVERLAY6, underlay=UNDERLAY6, local_underlay=node.underlay,
            underlay_ifindex=node.ul_index, vni=VNI, tunnel_mac=TUNNEL_MAC, inner_src_mac=INNER_SRC_MAC,
            hook=hook, overlay_mtu=POD_MTU if hook is Hook.INGRESS else None,
            onlink_underlay=self.onlink_underlay)

    def _load_programs(self, node: Node) -> None:
        from cni_fan.bpf import syscall
        from cni_fan.bpf.fanprog import COUNTER_SLOTS, Hook
        from cni_fan.bpf.fanprog_u6 import build_underlay6_program
        from cni_fan.net import tc
        from cni_fan.net.rtnl import Rtnl
        node.map_fd = syscall.create_percpu_array(8, COUNTER_SLOTS, f"fu6_{node.name}")
        for hook, index in ((Hook.INGRESS, node.br_index), (Hook.EGRESS, node.vx_index)):
            if hook is Hook.INGRESS and self.attach_point != "bridge":
                continue
            code = build_underlay6_program(self.params(node, hook), node.map_fd)
            fd = syscall.load_sched_cls(code, f"fu6_{node.name}_{hook.value}")
            node.prog_fds[hook] = fd
            with Rtnl.in_netns(node.ns) as sock:
                tc.attach(sock, index, fd, hook)

    def add_pod(self, node: Node, index: int = 5) -> Pod:
        name = f"p{node.name[1:]}"
        ns = self._netns(name)
        host_if = f"v{name}"
        address6 = node.slice6.network_address + index
        sh(node.ns, "ip", "link", "add", host_if, "mtu", str(POD_MTU), "type", "veth", "peer", "name", "eth0",
           "mtu", str(POD_MTU))
        sh(node.ns, "ip", "link", "set", "eth0", "netns", ns)
        sh(node.ns, "ip", "link", "set", host_if, "master", "fanbr", "up")
        sh(ns, "ip", "link", "set", "eth0", "up")
        sh(ns, "ip", "-6", "addr", "add", f"{address6}/{node.slice6.prefixlen}", "dev", "eth0", "nodad")
        sh(ns, "ip", "-6", "route", "add", "default", "via", str(node.gateway6), "dev", "eth0")
        wait_port_forwarding(node.ns, host_if)
        wait_solicited_node(ns, "eth0", address6)
        pod = Pod(name, ns, node, address6)
        self.pods.append(pod)
        return pod

    # -- reading -------------------------------------------------------------
    def counters(self, node: Node) -> dict[tuple[str, str], int]:
        from cni_fan.bpf import syscall
        from cni_fan.bpf.fanprog import Counter, Hook, counter_key
        return {(h.value, c.name): sum(syscall.read_percpu_u64(node.map_fd, counter_key(h, c)))
                for h in Hook for c in Counter}

    def close(self) -> None:
        close_lab(self.nodes, self.namespaces)


def _ifindex(ns: str, ifname: str) -> int:
    import json
    return json.loads(sh(ns, "ip", "-j", "link", "show", "dev", ifname))[0]["ifindex"]


def snmp6(ns: str, name: str) -> int:
    """A counter of the namespace's /proc/net/snmp6 (e.g. Udp6InCsumErrors)."""
    for line in sh(ns, "cat", "/proc/net/snmp6").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value.strip())
    raise KeyError(name)
