"""Dual-stack node labs: harness/nodelab.py's FanLab with `overlay6`.

Pods here are plain namespaces: a veth on the node's fan bridge, the pod's
two addresses from the node plan (one container index names both, as the
plugin gives them) and a default route per family. They need neither the
plugin's IPv6 nor its port guard, which pass IPv4 only for now.

IPv6 outside the cluster (`add_outside6`, after `FanLab.add_outside()`):

    router  eth0 fd00:ffff:1::fe/64 on the underlay switch, eth1 fd00:ffff::1/64
    host    fd00:ffff::2/64 ("the IPv6 internet"), default via the router
    node i  eth0 fd00:ffff:1::<i>/64 (`give_ipv6_egress`), default via the router

The router has no route to any overlay6 address: a pod reaches the outside
host only through the node's NAT66. Everything lives in the lab's
namespaces.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import netaddr

from cni_fan.config import FanConfig
from cni_fan.plan import NodePlan, make_plan
from harness.ping import ping_argv
from harness.system import in_netns

ROUTER6_UNDERLAY = "fd00:ffff:1::fe"
OUTSIDE6_ROUTER = "fd00:ffff::1"
OUTSIDE6_HOST = "fd00:ffff::2"
RTPROT_CNI_FAN = 250


def node_plan(node: Any) -> NodePlan:
    """The plan `node up` computes for this lab node (the same config, the same pure function)."""
    cfg = FanConfig.from_dict(node.conflist_data()["plugins"][0] | {"name": "fan"})
    return make_plan(cfg, netaddr.IPAddress(node.address), "eth0", 2, int(node.ns.link("eth0")["mtu"]))


@dataclass
class PlainPod:
    ns: Any
    node: Any
    index: int
    ipv4: str
    ipv6: str

    def ping(self, dst: str, count: int = 1, wait: float = 2.0):
        return self.ns.run(*ping_argv(dst, count, wait), check=False, timeout=30 + count)

    def reaches(self, dst: str, **kw: Any) -> bool:
        return self.ping(dst, **kw).returncode == 0


def add_pod(lab: Any, node: Any, index: int) -> PlainPod:
    """A pod at container `index` on `node` (which must be up: its bridge carries the gateways)."""
    plan = node_plan(node)
    assert plan.ipv6 is not None, "a dual-stack pod needs a lab with overlay6"
    ns = lab.new_netns("p")
    host_end = f"pv{index}"
    node.ns.ip("link", "add", host_end, "mtu", plan.mtu, "type", "veth", "peer", "name", "eth0", "mtu", plan.mtu,
               "netns", ns.name)
    node.ns.ip("link", "set", host_end, "master", plan.bridge, "up")
    v4, v6 = plan.ipv4.pod_address(index), plan.ipv6.pod_address(index)
    ns.ip("addr", "add", f"{v4}/{plan.ipv4.slice.prefixlen}", "dev", "eth0")
    ns.ip("addr", "add", f"{v6}/{plan.ipv6.slice.prefixlen}", "dev", "eth0", "nodad")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "default", "via", str(plan.ipv4.gateway))
    ns.ip("-6", "route", "add", "default", "via", str(plan.ipv6.gateway))
    return PlainPod(ns, node, index, str(v4), str(v6))


def give_ipv6_egress(node: Any) -> str:
    """The node's IPv6 address on the underlay link and its IPv6 default route (through the router)."""
    address = f"fd00:ffff:1::{node.index:x}"
    node.ns.ip("addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    node.ns.ip("-6", "route", "replace", "default", "via", ROUTER6_UNDERLAY)
    return address


def add_outside6(lab: Any) -> None:
    """IPv6 on the router and host of `lab.outside` (see the module docstring)."""
    outside = lab.outside
    assert outside is not None, "call lab.add_outside() first"
    router, host = outside.router, outside.host
    router.ip("addr", "add", f"{ROUTER6_UNDERLAY}/64", "dev", "eth0", "nodad")
    router.ip("addr", "add", f"{OUTSIDE6_ROUTER}/64", "dev", "eth1", "nodad")
    host.ip("addr", "add", f"{OUTSIDE6_HOST}/64", "dev", "eth0", "nodad")
    host.ip("-6", "route", "add", "default", "via", OUTSIDE6_ROUTER)
    router.set_sysctl("net.ipv6.conf.all.forwarding", "1")


def udp_source(server: Any, client: Any, dst: str, bind: str | None = None, port: int = 5353) -> str | None:
    """The source address `server`'s namespace sees on a datagram `client`'s sends to `dst`
    (None when nothing arrives). Both sockets are made in their namespaces by threads of
    this process; a socket stays in the namespace it was made in."""
    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::", port))
        sock.settimeout(2.0)
        return sock

    def send() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            if bind:
                sock.bind((bind, 0))
            for _ in range(3):
                sock.sendto(b"who", (dst, port))

    receiver = in_netns(server.path, listen)
    try:
        in_netns(client.path, send)
        _data, peer = receiver.recvfrom(64)
        return peer[0]
    except socket.timeout:
        return None
    finally:
        receiver.close()


def _not_link_local(text: str) -> bool:
    return "fe80" not in text and '"ff00::/8"' not in text


def ipv6_state(ns: Any) -> dict[str, set[str]]:
    """IPv6 addresses, routes (every table) and permanent neighbours, without what the
    kernel makes by itself on every device (link-local addresses, their routes, the
    multicast route): what a node's `up` makes and its `down` must remove."""
    addrs = {f"{link['ifname']} {a['local']}/{a['prefixlen']}" for link in ns.ip_json("-6", "addr", "show")
             for a in link.get("addr_info", []) if not a["local"].startswith("fe80")}
    routes = set()
    for route in ns.ip_json("-6", "route", "show", "table", "all"):
        route["flags"] = [f for f in route.get("flags", []) if f != "linkdown"]
        route.pop("pref", None)
        text = json.dumps(route, sort_keys=True)
        if _not_link_local(text):
            routes.add(text)
    neigh = {json.dumps(n, sort_keys=True) for n in ns.ip_json("-6", "neigh", "show", "nud", "permanent")}
    return {"addrs6": addrs, "routes6": routes, "neigh6": neigh}


def fan_state_count(node: Any, tunnel: str = "fan-vxlan") -> dict[str, int]:
    """The node's per-peer kernel entries on its tunnel: routes of ours per family,
    permanent neighbours per family, FDB entries with a remote."""
    ns = node.ns
    fdb = json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", tunnel).stdout or "[]")
    return {
        "routes4": len(ns.ip_json("-4", "route", "show", "proto", str(RTPROT_CNI_FAN), "dev", tunnel)),
        "routes6": len(ns.ip_json("-6", "route", "show", "proto", str(RTPROT_CNI_FAN), "dev", tunnel)),
        "neigh4": len(ns.ip_json("-4", "neigh", "show", "dev", tunnel, "nud", "permanent")),
        "neigh6": len(ns.ip_json("-6", "neigh", "show", "dev", tunnel, "nud", "permanent")),
        "fdb": len([f for f in fdb if f.get("dst")]),
    }


def send_router_advertisement(ns: Any, ifname: str = "eth0", lifetime: int = 1800) -> None:
    """One router advertisement (default router, no prefixes) from `ns`'s `ifname` to all
    nodes on its link: what a router on the underlay sends. Its link-local address must
    have finished DAD (the kernel picks it as the source)."""
    def send() -> None:
        index = socket.if_nametoindex(ifname)
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            # type 134, code 0, checksum (the kernel's), hop limit 64, no flags, lifetime,
            # reachable time and retransmission timer unspecified.
            sock.sendto(bytes([134, 0, 0, 0, 64, 0]) + lifetime.to_bytes(2, "big") + bytes(8),
                        ("ff02::1", 0, 0, index))
    in_netns(ns.path, send)


def ra_default_routes(ns: Any) -> list[dict]:
    """The default routes `ns` learnt from router advertisements."""
    return ns.ip_json("-6", "route", "show", "default", "proto", "ra")
