"""A lab over several underlay L2 segments joined by a router (`lab up --segments N`),
and the path `lab check` sees on the wire for every pod pair (issue 12).

Pure tests of the segment arithmetic, the spec's refusals and the frame
classifier; then real labs: 4 nodes over 2 segments (every pod reaches
every other, each pair's path seen on the sender's underlay, ext behind
the router) and the per-node state of the same lab at 4 and 8 nodes.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess

import netaddr
import pytest

from harness.labcli import lab as _lab

from cni_fan.lab import segments as seg
from cni_fan.lab.icmp import checksum
from cni_fan.lab import topology
from cni_fan.lab.netns import entered as netns_entered
from cni_fan.lab.pathwatch import path_verdicts, unsettled
from cni_fan.lab.run import Endpoint
from cni_fan.lab.topology import LabSpec, TopologyError
from cni_fan.lab.wireframes import DIRECT, ENCAPSULATED, classify, path_ok



# -- the segment arithmetic and the spec (pure) ------------------------------------

def test_nodes_spread_round_robin_over_segments_with_unique_slices() -> None:
    spec = LabSpec(prefix="tsg-", nodes=5, pods_per_node=1, segments=2)
    nodes = spec.all_nodes
    assert [n.segment for n in nodes] == [1, 2, 1, 2, 1]
    assert [n.cidr for n in nodes[:3]] == ["198.18.1.11/24", "198.18.2.12/24", "198.18.1.13/24"]
    assert len({n.slice for n in nodes}) == 5
    assert all(n.address in seg.segment_network(n.segment) for n in nodes)
    assert all(seg.router_address(n.segment) in seg.segment_network(n.segment) for n in nodes)
    assert spec.ext_cidr == "198.18.200.1/24"
    assert netaddr.IPAddress(topology.EXT_ADDRESS) in seg.segment_network(seg.EXT_SEGMENT)
    assert spec.namespaces()[:3] == ["tsg-under", "tsg-router", "tsg-ext"]
    assert topology.lab_namespace_re("tsg-").match("tsg-router")
    assert LabSpec.from_dict(spec.to_dict()) == spec
    # One segment is the lab as it always was: no router, /16 addresses.
    flat = LabSpec(prefix="tsg-", nodes=2)
    assert [n.cidr for n in flat.all_nodes] == ["198.18.1.11/16", "198.18.2.12/16"]
    assert "tsg-router" not in flat.namespaces() and "segments" not in flat.to_dict()


def test_ipv6_segments_mirror_the_ipv4_ones() -> None:
    dual = LabSpec(prefix="tsg-", nodes=3, segments=2, overlay6="fd00:50::/48")
    assert [n.cidr6 for n in dual.all_nodes] == ["fd00:198:18::1:b/112", "fd00:198:18::2:c/112",
                                                 "fd00:198:18::1:d/112"]
    assert dual.ext_cidr6 == f"{topology.EXT_ADDRESS6}/112"
    only6 = LabSpec(prefix="tsg-", nodes=3, segments=3, ipv6_only=True, overlay6=topology.DEFAULT_OVERLAY6_ONLY)
    underlay6 = netaddr.IPNetwork(topology.UNDERLAY6_ONLY)
    assert all(n.address in underlay6 and n.address in seg.segment_network6(n.segment) for n in only6.all_nodes)
    assert len({n.slice for n in only6.all_nodes}) == 3


def test_bad_segment_counts_are_refused() -> None:
    for segments in (0, -1, seg.MAX_SEGMENTS + 1, True, "2", 1.5):
        with pytest.raises(TopologyError, match="segments"):
            LabSpec(nodes=20, segments=segments)
    with pytest.raises(TopologyError, match="at least 3 nodes"):
        LabSpec(nodes=2, segments=3)
    with pytest.raises(TopologyError, match="direct_routing"):
        LabSpec(direct_routing="yes")


def test_cli_refuses_bad_segments_with_exit_2(capsys) -> None:
    from cni_fan.cli import build_parser

    for argv in (["lab", "up", "--segments", "0"], ["lab", "up", "--nodes", "2", "--segments", "3"]):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("cni-fan lab: segments: ")


def test_expected_path_is_direct_only_with_direct_routing_in_one_segment() -> None:
    assert seg.expected_path(True, 1, 1) == DIRECT
    assert seg.expected_path(True, 1, 2) == ENCAPSULATED
    assert seg.expected_path(False, 1, 1) == ENCAPSULATED


# -- classifying frames (pure) -----------------------------------------------------

def _eth(ethertype: int) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype)


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def _ipv6(src: str, dst: str, nxt: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64) + socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst) + payload)


def _vxlan(outer_src: str, outer_dst: str, inner: bytes, inner_type: int = 0x0800, port: int = 4789) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 0, 0) + struct.pack("!II", 0x08000000, 1 << 8) + _eth(inner_type) + inner
    return _eth(0x0800) + _ipv4(outer_src, outer_dst, 17, udp)


def test_frames_are_classified_direct_or_encapsulated_with_their_overlay_pair() -> None:
    icmp = b"\x08\x00\x00\x00\x00\x01\x00\x01"
    inner = _ipv4("241.1.11.2", "241.2.12.2", 1, icmp)
    assert classify(_eth(0x0800) + inner) == (DIRECT, "241.1.11.2", "241.2.12.2")
    assert classify(_vxlan("198.18.1.11", "198.18.2.12", inner)) == (ENCAPSULATED, "241.1.11.2", "241.2.12.2")
    inner6 = _ipv6("fd00:50:1:b::2", "fd00:50:2:c::2", 58, icmp)
    assert classify(_vxlan("198.18.1.11", "198.18.2.12", inner6, 0x86DD)) == (
        ENCAPSULATED, "fd00:50:1:b::2", "fd00:50:2:c::2")
    assert classify(_eth(0x86DD) + inner6) == (DIRECT, "fd00:50:1:b::2", "fd00:50:2:c::2")
    ipip = _eth(0x0800) + _ipv4("198.18.1.11", "198.18.2.12", 4, inner)
    assert classify(ipip) == (ENCAPSULATED, "241.1.11.2", "241.2.12.2")
    outer6 = _eth(0x86DD) + _ipv6("fd00:198:18::1:b", "fd00:198:18::2:c", 17,
                                  _vxlan("0.0.0.0", "0.0.0.0", inner6, 0x86DD)[34:])
    assert classify(outer6) == (ENCAPSULATED, "fd00:50:1:b::2", "fd00:50:2:c::2")
    # UDP to another port is an ordinary packet; another VXLAN port is honoured; ARP is nothing.
    assert classify(_vxlan("198.18.1.11", "198.18.2.12", inner, port=8472))[0] == DIRECT
    assert classify(_vxlan("198.18.1.11", "198.18.2.12", inner, port=8472), vxlan_port=8472)[0] == ENCAPSULATED
    assert classify(_eth(0x0806) + b"\0" * 28) is None
    assert classify(b"\0" * 10) is None


def test_a_pair_passes_only_when_its_one_expected_path_was_seen() -> None:
    spec = LabSpec(prefix="tsg-", nodes=3, pods_per_node=1, segments=2)
    pods = [Endpoint(f"n{i}p1", f"tsg-n{i}p1", "pod", f"241.{s}.{10 + i}.2", f"n{i}")
            for i, s in ((1, 1), (2, 2), (3, 1))]
    seen = {"n1": {("241.1.11.2", "241.2.12.2"): [ENCAPSULATED] * 2, ("241.1.11.2", "241.1.13.2"): [DIRECT]},
            "n3": {("241.1.13.2", "241.1.11.2"): [ENCAPSULATED, DIRECT]}}
    verdicts = path_verdicts(spec, pods, seen)
    assert len(verdicts) == 6  # pairs on two different nodes, each way
    assert verdicts["n1p1 -> n2p1"] == {"expected": ENCAPSULATED, "seen": [ENCAPSULATED], "ok": True}
    assert verdicts["n1p1 -> n3p1"] == {"expected": ENCAPSULATED, "seen": [DIRECT], "ok": False}
    assert verdicts["n3p1 -> n1p1"]["ok"] is False          # both paths seen
    assert verdicts["n2p1 -> n1p1"] == {"expected": ENCAPSULATED, "seen": [], "ok": False}  # nothing seen
    # With direct routing: direct from the first direct packet on (the fallback before it allowed).
    direct = LabSpec(prefix="tsg-", nodes=3, pods_per_node=1, segments=2, direct_routing=True)
    verdicts = path_verdicts(direct, pods, seen)
    assert verdicts["n1p1 -> n3p1"] == {"expected": DIRECT, "seen": [DIRECT], "ok": True}
    assert verdicts["n3p1 -> n1p1"] == {"expected": DIRECT, "seen": [ENCAPSULATED, DIRECT], "ok": True}
    assert verdicts["n1p1 -> n2p1"]["ok"] is True
    assert not path_ok(DIRECT, [DIRECT, ENCAPSULATED]) and not path_ok(DIRECT, [ENCAPSULATED])
    assert not path_ok(DIRECT, []) and not path_ok(ENCAPSULATED, [])
    # Pairs to ping again: expected direct, seen only in the fallback (or not at all).
    seen["n1"][("241.1.11.2", "241.1.13.2")] = [ENCAPSULATED]
    assert unsettled(path_verdicts(direct, pods, seen), pods) == [("tsg-n1p1", "241.1.13.2")]


# -- real labs ---------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _ip_json(ns: str, *argv: str, tool: str = "ip") -> list[dict]:
    out = subprocess.run([tool, "-j", "-n", ns, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def node_state_counts(ns: str) -> dict[str, int]:
    """What a node holds: routes (every table, both families, IPv6 link-local left out), IPv4
    neighbours off the underlay interface (not NOARP), FDB entries with a VXLAN destination, nftables rules."""
    ruleset = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"], capture_output=True,
                             text=True, check=True).stdout
    return {
        "routes": len(_ip_json(ns, "-4", "route", "show", "table", "all")),
        # IPv6 link-local and multicast routes come and go with each device's link-local address: not counted.
        "routes6": sum(1 for r in _ip_json(ns, "-6", "route", "show", "table", "all")
                       if not r.get("dst", "").startswith(("fe80", "ff0", "multicast"))),
        # NOARP entries (multicast groups, 0.0.0.0 on lo) are the kernel's own, made when something is
        # first sent there, so they come and go with timing: not counted.
        "neighbours": sum(1 for n in _ip_json(ns, "-4", "neigh", "show", "nud", "all")
                          if n.get("dev") != topology.NODE_UNDERLAY_IF and "NOARP" not in (n.get("state") or [])),
        "fdb": sum(1 for f in _ip_json(ns, "fdb", "show", tool="bridge") if f.get("dst")),
        "nft_rules": sum(1 for item in json.loads(ruleset).get("nftables", []) if "rule" in item),
    }


def _up_and_check(prefix: str, nodes: int, *extra: str) -> dict:
    _lab("up", "--prefix", prefix, "--nodes", str(nodes), "--pods-per-node", "1", "--segments", "2", *extra,
         check=True)
    checked = _lab("check", "--prefix", prefix, "--json")
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], checked.stdout[-3000:] + checked.stderr
    return report


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("direct", [True, False], ids=["direct-routing", "vxlan"])
def test_four_nodes_on_two_segments_reach_each_other_on_the_expected_paths(request, direct: bool) -> None:
    prefix = f"tsg{secrets.token_hex(2)}-"
    request.addfinalizer(lambda: _lab("down", "--prefix", prefix))
    report = _up_and_check(prefix, 4, *(["--direct-routing"] if direct else []))
    spec = LabSpec(prefix=prefix, nodes=4, pods_per_node=1, segments=2, direct_routing=direct)

    # Every pod reached every other; every pair across nodes was seen on the wire: with direct
    # routing the 4 pairs within a segment (n1-n3, n2-n4, each way) unencapsulated, the 8 across it
    # encapsulated; without it all 12 encapsulated.
    pods = [f"n{i}p1" for i in range(1, 5)]
    assert all(report["matrix"][a][b] == "ok" for a in pods for b in pods if a != b)
    in_segment = {"n1p1 -> n3p1", "n3p1 -> n1p1", "n2p1 -> n4p1", "n4p1 -> n2p1"}
    assert len(report["paths"]) == 12
    for pair, path in report["paths"].items():
        want = DIRECT if direct and pair in in_segment else ENCAPSULATED
        assert path["expected"] == want and path["ok"] and path["seen"][-1] == want, (pair, path)
        assert path["seen"] in ([want], [ENCAPSULATED, DIRECT]), (pair, path)  # the fallback first, at most
    # The topology: two bridges, the router forwarding between them, ext behind it.
    ports = {b: {link["ifname"] for link in _ip_json(spec.underlay_netns, "link", "show", "master", b)}
             for b in ("br0", "br1", "br2")}
    assert ports == {"br0": {"ext", "rx"}, "br1": {"n1", "n3", "r1"}, "br2": {"n2", "n4", "r2"}}
    routes = _ip_json(spec.node(2).netns, "-4", "route", "show", "198.18.0.0/16")
    assert [r.get("gateway") for r in routes] == ["198.18.2.254"]
    assert all(report["nat"][p]["ok"] for p in pods)
    assert all(s["ok"] for s in report["peer_state"].values())
    assert all(a["show"]["direct_routing"] is direct for a in report["agents"].values())
    if direct:
        _unencapsulated_from_another_segment_is_dropped_and_counted(spec)
    assert _lab("down", "--prefix", prefix).returncode == 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    assert not [name for name in left if name.startswith(prefix)]  # the router and the bridges' namespace too


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("family", ["dual-stack", "ipv6-only"])
def test_ipv6_paths_over_two_segments_with_direct_routing(request, family: str) -> None:
    """The same in IPv6: a dual-stack lab (IPv6 pods over the IPv4 underlay, both families' paths
    checked) and an IPv6-only one (VXLAN over IPv6 between /112 segments)."""
    prefix = f"tsg{secrets.token_hex(2)}-"
    request.addfinalizer(lambda: _lab("down", "--prefix", prefix))
    args = ["--overlay6", "fd00:50::/48"] if family == "dual-stack" else ["--ipv6-only"]
    report = _up_and_check(prefix, 4, "--direct-routing", *args)
    in_segment = {"n1p1 -> n3p1", "n3p1 -> n1p1", "n2p1 -> n4p1", "n4p1 -> n2p1"}
    checked = ["paths6"] if family == "ipv6-only" else ["paths", "paths6"]
    assert report["checks"]["paths"] and all(report["checks"].values())
    for key in checked:
        assert len(report[key]) == 12, key
        for pair, path in report[key].items():
            want = DIRECT if pair in in_segment else ENCAPSULATED
            assert path["expected"] == want and path["ok"] and path["seen"][-1] == want, (key, pair, path)
    assert all(cell in ("ok", "self") for row in report["matrix6"].values() for cell in row.values())
    assert all(s["ok"] for s in report["peer_state"].values())


def _frame_to(ns: str, dst_mac: str, src: str, dst: str) -> None:
    """One ICMP echo request from `src` to `dst`, unencapsulated, sent raw from `ns`'s underlay interface."""
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x7E57, 1) + b"cni-fan-lab-test")
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(_ipv4(src, dst, 1, bytes(icmp)))
    header[10:12] = checksum(bytes(header[:20])).to_bytes(2, "big")  # a bad one is dropped before netfilter
    with netns_entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((topology.NODE_UNDERLAY_IF, 0))
        src_mac = bytes.fromhex(sock.getsockname()[4].hex())
        sock.send(bytes.fromhex(dst_mac.replace(":", "")) + src_mac + struct.pack("!H", 0x0800) + bytes(header))


def _dropped(spec: LabSpec, node_index: int) -> int:
    from cni_fan.lab.agents import node_show

    return node_show(spec.node(node_index))["dropped_direct_source_packets"]


def _unencapsulated_from_another_segment_is_dropped_and_counted(spec: LabSpec) -> None:
    """Node 3 (segment 1) puts on the wire, to node 1, an unencapsulated packet whose source is the
    pod of node 2 (segment 2: it could only come encapsulated): node 1 drops it and counts it; one
    from node 3's own pod (same segment) is not counted."""
    n1, n2, n3 = spec.node(1), spec.node(2), spec.node(3)
    mac = _ip_json(n1.netns, "link", "show", topology.NODE_UNDERLAY_IF)[0]["address"]
    pod1, pod2, pod3 = (str(n.slice.ip + 2) for n in (n1, n2, n3))
    before = _dropped(spec, 1)
    _frame_to(n3.netns, mac, pod3, pod1)
    assert _dropped(spec, 1) == before
    for _ in range(3):
        _frame_to(n3.netns, mac, pod2, pod1)
    assert _dropped(spec, 1) == before + 3


@pytest.mark.kernel
@needs_root
def test_per_node_state_is_the_same_at_4_and_8_nodes(request) -> None:
    """With direct routing over 2 segments, after every pod pinged every other."""
    counts = {}
    for nodes in (4, 8):
        prefix = f"tsg{secrets.token_hex(2)}-"
        request.addfinalizer(lambda prefix=prefix: _lab("down", "--prefix", prefix))
        report = _up_and_check(prefix, nodes, "--direct-routing")
        assert all(s["ok"] for s in report["peer_state"].values())
        spec = LabSpec(prefix=prefix, nodes=nodes, pods_per_node=1, segments=2)
        counts[nodes] = [node_state_counts(n.netns) for n in spec.all_nodes]
        assert _lab("down", "--prefix", prefix).returncode == 0
    first = counts[4][0]
    assert first["routes"] > 0 and first["nft_rules"] > 0
    assert all(c == first for c in counts[4] + counts[8]), json.dumps(counts)
