"""The Fan datapath in the real kernel: nodes and pods in network namespaces.

The lab (harness/bpflab.py) builds it by hand: the generated program
loaded and attached directly, no plugin, no agent. Topology (every name
starts with ``tbpf-<random>-``; nothing of the host's own is touched):

    underlay switch ns: bridge ``sw0``, 198.18.0.0/16, MTU 1500
      node n1 198.18.1.10   owns 241.1.10.0/24   pod p1 241.1.10.5
      node n2 198.18.2.20   owns 241.2.20.0/24   pod p2 241.2.20.5
      node n3 198.18.3.30   owns 241.3.30.0/24   pod p3 241.3.30.5

Pings are harness/ping.py's `echo`: one request with DF and a chosen TTL,
answered by the reply or the ICMP error it caused.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time

import pytest

from harness.bpflab import (NEXT_HOP, OVERLAY, POD_MTU, TUNNEL_MAC, UNDERLAY_MTU, Lab, Node, Pod, ip_json,
                            sh)
from harness.ping import echo, icmp_socket
from harness.system import inside
from harness.tcpflow import tcp_transfer

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


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
        answer, _ = echo(src.path, str(dst.address))
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
    with icmp_socket(p2.path) as watch:
        answer, seen = echo(p1.path, str(p2.address), ttl=64, watch=watch)
    # Two routers on the way: node 1 (the program) and node 2 (the kernel).
    assert seen is not None and seen.ttl == 62
    assert answer is not None and answer.ttl == 62


def test_ttl_expiry_is_reported_like_a_router(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    answer, _ = echo(p1.path, str(p2.address), ttl=1)
    assert answer is not None and answer.kind == "time-exceeded"
    assert answer.src == str(p1.node.gateway)
    answer, _ = echo(p1.path, str(p2.address), ttl=2)
    assert answer is not None and answer.kind == "time-exceeded"
    assert ipaddress.IPv4Address(answer.src) in p2.node.slice


def test_node_to_remote_pod(lab) -> None:
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    before = lab.counters(n1)
    with icmp_socket(p2.path) as watch:
        answer, seen = echo(n1.path, str(p2.address), watch=watch)
    assert answer is not None and answer.kind == "reply"
    assert seen is not None and seen.src == str(n1.gateway)
    assert seen.ttl == 63   # node 1 originates, only node 2 forwards
    after = lab.counters(n1)
    assert after[("egress", "ENCAPSULATED")] > \
        before[("egress", "ENCAPSULATED")]


def test_remote_pod_to_node_and_node_to_node_overlay(lab) -> None:
    p3, n1, n2 = pod(lab, "p3"), lab.nodes[0], lab.nodes[1]
    answer, _ = echo(p3.path, str(n1.gateway))
    assert answer is not None and answer.kind == "reply"
    answer, _ = echo(n2.path, str(n1.gateway))
    assert answer is not None and answer.kind == "reply"


def test_full_size_df_packet_passes_and_one_byte_more_does_not(lab) -> None:
    p1, p2 = pod(lab, "p1"), pod(lab, "p2")
    full = POD_MTU - 28
    answer, _ = echo(p1.path, str(p2.address), payload=full)
    assert answer is not None and answer.kind == "reply"
    assert answer.size == POD_MTU   # a 1450-byte IP packet came back
    with pytest.raises(OSError) as info:
        echo(p1.path, str(p2.address), payload=full + 1)
    assert info.value.errno == errno.EMSGSIZE
    # The node itself: its overlay route goes through fanvx (MTU 1450).
    n1 = lab.nodes[0]
    answer, _ = echo(n1.path, str(p2.address), payload=full)
    assert answer is not None and answer.kind == "reply"
    with pytest.raises(OSError) as info:
        echo(n1.path, str(p2.address), payload=full + 1)
    assert info.value.errno == errno.EMSGSIZE


def test_pod_ignoring_the_mtu_gets_fragmentation_needed(lab) -> None:
    # A pod whose interface claims 1500 sends a 1451-byte DF packet: the
    # program leaves it to the kernel, which answers as a router must.
    n1, p2 = lab.nodes[0], pod(lab, "p2")
    big = lab.add_pod(n1, mtu=UNDERLAY_MTU, index=6)
    answer, _ = echo(big.path, str(p2.address), payload=POD_MTU + 1 - 28)
    assert answer is not None and answer.kind == "unreachable"
    assert answer.code == 4 and answer.mtu == POD_MTU
    answer, _ = echo(big.path, str(p2.address), payload=POD_MTU - 28)
    assert answer is not None and answer.kind == "reply"


def test_tcp_bulk_transfer(lab) -> None:
    # GSO super-packets through adjust_room (FIXED_GSO) and redirect_neigh.
    _transfer(pod(lab, "p1"), pod(lab, "p3"), 32, 5201)


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
    with inside(lab.switch_path):
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
        _transfer(p1, p2, 8, 5202)
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
                echo(src.path, str(dst.address))
    for node in lab.nodes:
        for other in lab.nodes:
            if other is not node:
                echo(node.path, str(other.gateway))
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
        answer, _ = echo(n1.path, str(p2.address), tries=1, timeout=0.5)
        assert answer is None
        tc.attach(sock, n1.vx_index, fd, Hook.EGRESS)
        tc.attach(sock, n1.vx_index, fd, Hook.EGRESS)   # idempotent
        assert tc.is_attached(sock, n1.vx_index, Hook.EGRESS, prog_id=pid)
        assert len(tc.list_attached(sock, n1.vx_index, Hook.EGRESS)) == 1
    answer, _ = echo(n1.path, str(p2.address))
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
        answer, _ = echo(p1.path, str(p2.address))
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
        answer, _ = echo(p1.path, str(p2.address), tries=1)
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
        answer, _ = echo(p1.path, str(p2.address))
        assert answer is not None and answer.kind == "reply"
        answer, _ = echo(lab.nodes[0].path, str(p2.address))
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
        with icmp_socket(p2.path) as watch:
            answer, seen = echo(p1.path, str(p2.address), watch=watch)
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
        answer, _ = echo(p1.path, str(p2.address))
        assert answer is not None and answer.kind == "reply"
        state = _per_peer_state(lab, lab.nodes[0])
        assert len(state["routes"]) == 2
        assert len(state["neighbours"]) == 2
        assert len(state["fdb"]) >= 2
    finally:
        lab.close()


def _transfer(src: Pod, dst: Pod, megabytes: int, port: int) -> None:
    tcp_transfer(src.path, dst.ns, str(dst.address), megabytes, port)
