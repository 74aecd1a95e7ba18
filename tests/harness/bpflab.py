"""A Fan datapath built by hand in network namespaces: nodes and pods.

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

No plugin and no agent: the generated program is loaded and attached
directly, so tests/test_bpf_datapath.py tests the program alone.
With ``overlay6=True`` the lab is dual-stack (inner IPv6 over the IPv4
underlay): each node's IPv6 slice of ``fd41::/48`` is named by the same host
bits (n1 ``fd41:0:0:10a::/64``), its gateway ``::1`` on the bridge, one
route ``fd41::/48 via fd41::1 dev fanvx onlink`` with a permanent neighbour
to the shared MAC (as node/route.py does for IPv4), IPv6 forwarding on, and
each pod an IPv6 address with the same index; the program gets ``overlay6``.
``Lab`` is also used by bench/datapath_probe.py (mode "flannel": the same
nodes with a classic VXLAN device and per-peer route, neighbour and FDB
entries instead of the program).
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field

OVERLAY = ipaddress.IPv4Network("241.0.0.0/8")
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")
UNDERLAY_MTU = 1500
POD_MTU = UNDERLAY_MTU - 50
VNI = 241
TUNNEL_MAC = "02:fa:f1:00:00:01"      # shared by every node's fanvx
INNER_SRC_MAC = "02:fa:f1:00:00:02"   # the program's inner source MAC
NEXT_HOP = "241.0.0.1"                # in the slice of underlay .0.0: no host
OVERLAY6 = ipaddress.IPv6Network("fd41::/48")
NEXT_HOP6 = "fd41::1"                 # likewise, in the slice of underlay .0.0


# -- the lab ----------------------------------------------------------------

def sh(ns: str, *cmd: str, check: bool = True) -> str:
    """`cmd` run in the namespace named `ns`; its stdout."""
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check,
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def ip_json(ns: str, *args: str) -> list:
    text = sh(ns, *args)
    return json.loads(text) if text.strip() else []


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def _wait(ready, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout} s: {what}")
        time.sleep(0.05)


def wait_port_forwarding(ns: str, ifname: str) -> None:
    """Wait until the bridge forwards through port `ifname`.

    A port whose carrier just came up stays disabled until the kernel's
    link-watch work runs, which takes the rtnl lock (busy while namespaces
    are torn down on the machine); frames flooded to it meanwhile are lost.
    """
    _wait(lambda: [p.get("state") for p in ip_json(ns, "bridge", "-j", "link", "show", "dev", ifname)]
          == ["forwarding"], f"bridge port {ifname} in {ns}")


def wait_solicited_node(ns: str, dev: str, address: ipaddress.IPv6Address) -> None:
    """Wait until `dev` has joined `address`'s solicited-node group.

    The kernel joins it from its address-configuration work, which also
    waits for the rtnl lock, even for an address added with nodad; until
    then the host drops neighbour solicitations for the address.
    """
    group = ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0"))
                                  | int(address) & 0xFFFFFF)

    def joined() -> bool:
        return group in {ipaddress.IPv6Address(line.split()[1])
                         for line in sh(ns, "ip", "-6", "maddr", "show", "dev", dev).splitlines()
                         if line.strip().startswith("inet6 ")}
    _wait(joined, f"{dev} in {ns} joining {group}")


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
    slice6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None

    @property
    def path(self) -> str:
        return netns_path(self.ns)


@dataclass
class Pod:
    name: str
    ns: str
    node: Node
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None

    @property
    def path(self) -> str:
        return netns_path(self.ns)


class Lab:
    """Nodes, pods and an underlay switch in fresh namespaces.

    ``mode``: "fan" (plain VXLAN receive device + generated program, no
    per-peer state) or "flannel" (classic VXLAN with per-peer route,
    neighbour and FDB entries, no program). Always call :meth:`close`.
    """

    def __init__(self, nodes: int = 3, mode: str = "fan",
                 onlink_underlay: bool = False, attach_point: str = "bridge",
                 counters: bool = True, overlay6: bool = False) -> None:
        if mode not in ("fan", "flannel"):
            raise ValueError(mode)
        if attach_point not in ("bridge", "veth", "none"):
            raise ValueError(attach_point)
        self.mode = mode
        self.onlink_underlay = onlink_underlay
        self.attach_point = attach_point
        self.with_counters = counters
        if overlay6 and mode != "fan":
            raise ValueError("overlay6 needs mode 'fan'")
        self.overlay6 = overlay6
        self.prefix = f"tbpf-{secrets.token_hex(3)}-"
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.switch = self._netns("sw")
        self.switch_path = netns_path(self.switch)
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
        wait_port_forwarding(self.switch, name)
        sh(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1")
        if self.overlay6:
            self._add_ipv6(node, host)
        self.nodes.append(node)

    def _add_ipv6(self, node: Node, host: int) -> None:
        """The node's IPv6 slice, gateway, overlay route and next hop."""
        cbits = 128 - (OVERLAY6.prefixlen + 32 - UNDERLAY.prefixlen)
        node.slice6 = ipaddress.IPv6Network(
            (int(OVERLAY6.network_address) | host << cbits, 128 - cbits))
        node.gateway6 = node.slice6.network_address + 1
        ns = node.ns
        sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh(ns, "ip", "-6", "addr", "add", f"{node.gateway6}/{node.slice6.prefixlen}",
           "dev", "fanbr", "nodad")
        wait_solicited_node(ns, "fanbr", node.gateway6)
        sh(ns, "ip", "-6", "neigh", "add", NEXT_HOP6, "lladdr", TUNNEL_MAC,
           "dev", "fanvx", "nud", "permanent")
        sh(ns, "ip", "-6", "route", "add", str(OVERLAY6), "via", NEXT_HOP6,
           "dev", "fanvx", "onlink", "src", str(node.gateway6))

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
            onlink_underlay=self.onlink_underlay, gateway_mac=gateway_mac,
            overlay6=OVERLAY6 if self.overlay6 else None)

    def _load_programs(self, node: Node) -> None:
        from cni_fan.bpf import syscall
        from cni_fan.bpf.fanprog import (COUNTER_SLOTS, Hook,
                                         build_encap_program)
        from cni_fan.net import tc
        from cni_fan.net.rtnl import Rtnl
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
        wait_port_forwarding(node.ns, host_if)
        if node.slice6 is not None:
            pod.address6 = node.slice6.network_address + index
            sh(ns, "ip", "-6", "addr", "add", f"{pod.address6}/{node.slice6.prefixlen}",
               "dev", "eth0", "nodad")
            sh(ns, "ip", "-6", "route", "add", "default", "via", str(node.gateway6),
               "dev", "eth0")
            wait_solicited_node(ns, "eth0", pod.address6)
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
        close_lab(self.nodes, self.namespaces)


def close_lab(nodes: list, namespaces: list[str]) -> None:
    """Close every node's program and map descriptors, then remove the lab's namespaces (last made,
    first removed); `namespaces` is emptied. Shared by the IPv4- and IPv6-underlay labs."""
    from pyroute2 import netns
    errors = []
    for node in nodes:
        for fd in [*node.prog_fds.values(), node.map_fd]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        node.prog_fds.clear()
        node.map_fd = None
    for name in reversed(namespaces):
        try:
            netns.remove(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                errors.append(f"{name}: {exc}")
    namespaces.clear()
    if errors:
        raise RuntimeError("could not remove namespaces: " + "; ".join(errors))
