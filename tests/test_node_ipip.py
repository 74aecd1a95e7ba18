"""IPIP, checked where this kernel lets us check it.

The development kernel has **no ipip module** (FACTS.md section 5: no ipip,
gre or geneve), so an IPIP node cannot be brought up here. What can be
checked, is:

- the RTM_NEWLINK message `node up` sends for the tunnel
  (`tunnel.link_spec(plan)` through pyroute2's request path, compiled with
  `IPBatch` and decoded back, both with pyroute2's `ifinfmsg` and by hand
  against the kernel's own attribute numbers from <linux/if_tunnel.h>):
  kind `ipip`, the collect-metadata flag, the underlay link, MTU =
  underlay MTU - 20;
- the overlay route message for IPIP (no gateway, scope link,
  `prefsrc` = the node's gateway), and that the datapath's own check
  accepts exactly that route;
- the tunnel-key program (`cni_fan.bpf.tunnelkey`): loaded by the kernel's
  verifier for several fan widths and run with BPF_PROG_TEST_RUN: packets
  outside the overlay and for the local slice pass (0), packets for
  another node's slice get their key set (0), packets for a slice's
  network or broadcast address (or the underlay's) are dropped (2).

The program cannot be attached (no device to attach it to); on an IPIP
device `skb->data` starts at the IPv4 header, and that is what the test runs
feed it.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from pathlib import Path

import netaddr
import pytest
from pyroute2 import IPBatch
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cni_fan.config import FanConfig
from cni_fan.fanmap import FanMap
from cni_fan.net.rtnl import NLMSGHDR
from cni_fan.net.rtnl_addrs import route_info
from cni_fan.node import tunnel
from cni_fan.node.fanmap_bpf import ipip_params
from cni_fan.node.route import ensure_route, slice_route_problems
from cni_fan.plan import make_plan

BASE = {"name": "fan", "cniVersion": "1.0.0", "type": "fan", "overlay": "241.0.0.0/8",
        "underlay": "198.18.0.0/16", "encap": "ipip", "dataDir": "/nonexistent/cni-fan-test"}
RTM_NEWLINK, RTM_NEWROUTE = 16, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x1, 0x4, 0x200, 0x400, 0x100
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
NLA_TYPE_MASK = 0x3FFF
RT_SCOPE_LINK = 253
IF_TUNNEL_H = Path("/usr/include/linux/if_tunnel.h")


def ipip_plan(underlay_mtu: int = 1500, ifindex: int = 2, host: str = "198.18.1.11", **extra):
    cfg = FanConfig.from_dict({**BASE, **extra})
    return make_plan(cfg, netaddr.IPAddress(host), "eth0", ifindex, underlay_mtu)


def iptun_numbers() -> dict[str, int]:
    """IFLA_IPTUN_* from the kernel's uapi header (the values are ABI)."""
    numbers = {"IFLA_IPTUN_LINK": 1, "IFLA_IPTUN_COLLECT_METADATA": 19}
    if IF_TUNNEL_H.exists():
        body = re.search(r"IFLA_IPTUN_UNSPEC,(.*?)__IFLA_IPTUN_MAX", IF_TUNNEL_H.read_text(), re.S).group(1)
        names = re.findall(r"(IFLA_IPTUN_\w+)", body)
        from_header = {name: i + 1 for i, name in enumerate(names)}
        assert {k: from_header[k] for k in numbers} == numbers
    return numbers


def raw_attrs(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        assert length >= 4 and pos + length <= len(data)
        out[kind & NLA_TYPE_MASK] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def compile_newlink(plan) -> bytes:
    batch = IPBatch()
    try:
        batch.link("add", **tunnel.link_spec(plan))
        return bytes(batch.batch)
    finally:
        batch.close()


def compile_route(plan, tunnel_index: int) -> bytes:
    """What the overlay route component (`route.ensure_route`) sends for this plan."""
    batch = IPBatch()
    try:
        ensure_route(batch, plan, tunnel_index)
        return bytes(batch.batch)
    finally:
        batch.close()


@pytest.mark.parametrize("underlay_mtu", [1500, 9000, 1442])
def test_newlink_message_for_the_ipip_tunnel(underlay_mtu: int) -> None:
    plan = ipip_plan(underlay_mtu=underlay_mtu, ifindex=7)
    data = compile_newlink(plan)

    # Decoded by pyroute2's own message class.
    msg = ifinfmsg(data)
    msg.decode()
    assert msg["header"]["type"] == RTM_NEWLINK
    flags = msg["header"]["flags"]
    assert flags & NLM_F_REQUEST and flags & NLM_F_CREATE and flags & NLM_F_EXCL
    assert msg.get_attr("IFLA_IFNAME") == "fan-ipip"
    assert msg.get_attr("IFLA_MTU") == underlay_mtu - 20 == plan.mtu
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "ipip"
    data_attrs = info.get_attr("IFLA_INFO_DATA")
    assert data_attrs.get_attr("IFLA_IPIP_COLLECT_METADATA") is True
    assert data_attrs.get_attr("IFLA_IPIP_LINK") == 7

    # And by hand, against the kernel's numbers: what the kernel will read.
    numbers = iptun_numbers()
    length, kind = struct.unpack_from("=IH", data)
    assert length == len(data) and kind == RTM_NEWLINK
    top = raw_attrs(data[16 + 16:])  # nlmsghdr, ifinfomsg
    assert top[IFLA_IFNAME] == b"fan-ipip\0"
    assert struct.unpack("=I", top[IFLA_MTU])[0] == underlay_mtu - 20
    linkinfo = raw_attrs(top[IFLA_LINKINFO])
    assert linkinfo[IFLA_INFO_KIND].rstrip(b"\0") == b"ipip"
    iptun = raw_attrs(linkinfo[IFLA_INFO_DATA])
    assert iptun[numbers["IFLA_IPTUN_COLLECT_METADATA"]] == b"", "collect-metadata is a flag (no payload)"
    assert struct.unpack("=I", iptun[numbers["IFLA_IPTUN_LINK"]])[0] == 7
    # No fixed remote or local: the program sets the remote per packet.
    assert set(iptun) == {numbers["IFLA_IPTUN_COLLECT_METADATA"], numbers["IFLA_IPTUN_LINK"]}


def test_newlink_mtu_override() -> None:
    msg = ifinfmsg(compile_newlink(ipip_plan(mtu=1400, underlay_mtu=9000)))
    msg.decode()
    assert msg.get_attr("IFLA_MTU") == 1400


def test_overlay_route_message_for_ipip() -> None:
    plan = ipip_plan()
    data = compile_route(plan, tunnel_index=9)
    msg = rtmsg(data)
    msg.decode()
    assert msg["header"]["length"] == len(data), "one message only: IPIP needs no neighbour entry"
    assert msg["header"]["type"] == RTM_NEWROUTE
    assert msg["header"]["flags"] & NLM_F_REPLACE and msg["header"]["flags"] & NLM_F_CREATE
    assert (msg["family"], msg["dst_len"], msg["table"], msg["type"]) == (socket.AF_INET, 8, 254, 1)
    assert msg["scope"] == RT_SCOPE_LINK
    assert msg.get_attr("RTA_DST") == "241.0.0.0"
    assert msg.get_attr("RTA_OIF") == 9
    assert msg.get_attr("RTA_GATEWAY") is None
    assert msg.get_attr("RTA_PREFSRC") == str(plan.ipv4.gateway) == "241.1.11.1"
    assert msg["flags"] == 0  # no onlink next hop

    # The datapath's check, reading the message as the kernel would dump it, accepts exactly this
    # route, and no neighbour is wanted.
    route = route_info(data, NLMSGHDR.size, len(data))
    assert slice_route_problems(plan, plan.ipv4, 9, [route], []) == []
    assert slice_route_problems(plan, plan.ipv4, 10, [route], []) != []
    assert slice_route_problems(plan, plan.ipv4, 9, [], []) == ["route to 241.0.0.0/8 is missing"]


def test_vxlan_route_for_comparison_has_an_onlink_next_hop_and_a_neighbour() -> None:
    cfg = FanConfig.from_dict({**BASE, "encap": "vxlan"})
    plan = make_plan(cfg, netaddr.IPAddress("198.18.1.11"), "eth0", 2, 1500)
    data = compile_route(plan, tunnel_index=9)
    first_len = struct.unpack_from("=I", data)[0]
    neigh, route = data[:first_len], data[first_len:]
    assert struct.unpack_from("=IH", neigh)[1] == 28  # RTM_NEWNEIGH before the route that needs it
    msg = rtmsg(route)
    msg.decode()
    assert msg.get_attr("RTA_GATEWAY") == "241.0.0.0" and msg["flags"] & 0x4  # RTNH_F_ONLINK


def test_the_ipip_tunnel_carries_the_gateway_as_a_32_as_vxlan_does() -> None:
    """MASQUERADE into the tunnel takes this address (docs/datapath.md); `Tunnel.ensure`
    adds it whatever the encapsulation, which test_node_datapath.py checks for VXLAN."""
    assert str(ipip_plan().ipv4.tunnel_address) == "241.1.11.1/32"
    assert str(ipip_plan(host="198.18.200.7").ipv4.tunnel_address) == "241.200.7.1/32"


def test_tunnel_key_params_match_the_plan() -> None:
    for extra, host in (({}, "198.18.1.11"), ({"underlay": "198.18.0.0/24"}, "198.18.0.11"),
                        ({"overlay": "240.0.0.0/4"}, "198.18.200.3")):
        plan = ipip_plan(host=host, **extra)
        params = ipip_params(plan)
        assert str(params.local_slice) == str(plan.ipv4.slice)
        assert str(params.local_underlay) == host
        assert params.container_bits == 32 - plan.ipv4.slice.prefixlen


@pytest.mark.kernel
def test_this_kernel_has_no_ipip_and_refuses_the_message_cleanly() -> None:
    """The message reaches the kernel intact: it fails on the kind alone.
    (If an ipip module shows up, the device is made and checked instead.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from harness import nodelab
    from harness.system import in_netns
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ns = nodelab.Netns(nodelab.new_prefix("ni") + "-x")
    try:
        plan = ipip_plan(ifindex=1)  # lo stands in for the underlay device

        def attempt():
            ipr = IPRoute()
            try:
                try:
                    ipr.link("add", **tunnel.link_spec(plan))
                except NetlinkError as exc:
                    return exc.code
                link = ipr.link("get", ifname="fan-ipip")[0]
                data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
                return (link.get_attr("IFLA_MTU"), data.get_attr("IFLA_IPIP_COLLECT_METADATA"))
            finally:
                ipr.close()

        outcome = in_netns(ns.path, attempt)
        assert outcome in (errno.EOPNOTSUPP, (1480, True)), outcome
    finally:
        ns.delete()


# -- the tunnel-key program in the kernel -------------------------------------------------

WIDTHS = [  # (overlay, underlay, this host) -> slice length
    ("241.0.0.0/8", "198.18.0.0/16", "198.18.1.11"),    # /24
    ("241.0.0.0/8", "198.18.0.0/24", "198.18.0.11"),    # /16
    ("240.0.0.0/4", "198.18.0.0/16", "198.18.200.3"),   # /20
    ("240.0.0.0/12", "198.18.0.0/16", "198.18.7.9"),    # /28
    ("242.64.0.0/10", "198.18.0.0/20", "198.18.3.7"),   # /22
    ("250.0.0.0/8", "198.18.0.0/15", "198.19.1.2"),     # /25
]
TC_ACT_OK, TC_ACT_SHOT = 0, 2


def ipv4_packet(dst: str, src: str = "241.1.11.2", version: int = 4) -> bytes:
    """IPv4 header + an 8-byte ICMP echo: what an L3 device's egress sees."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | 5, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + icmp


def kernel_bpf():
    if os.geteuid() != 0:
        pytest.skip("loading programs needs root")
    from cni_fan.bpf import syscall
    return syscall


@pytest.mark.kernel
@pytest.mark.parametrize("overlay,underlay,host", WIDTHS, ids=[f"{o}-over-{u}" for o, u, _ in WIDTHS])
def test_tunnel_key_program_verdicts(overlay: str, underlay: str, host: str) -> None:
    syscall = kernel_bpf()
    from cni_fan.bpf.tunnelkey import IpipKeyParams, build_ipip_key_program

    params = IpipKeyParams(ipaddress.IPv4Network(overlay), ipaddress.IPv4Network(underlay),
                           ipaddress.IPv4Address(host))
    fm = FanMap.parse(overlay, underlay)
    local = fm.slice_for(netaddr.IPAddress(host))
    assert str(params.local_slice) == str(local)
    u = netaddr.IPNetwork(underlay)
    others = [netaddr.IPAddress(u.first + 1), netaddr.IPAddress(u.last - 1), netaddr.IPAddress(u.first + 2)]
    others = [h for h in others if str(h) != host]

    fd = syscall.load_sched_cls(build_ipip_key_program(params), name="t_ipip_key")
    try:
        def verdict(packet: bytes) -> int:
            return syscall.test_run(fd, packet).retval

        src = str(fm.first_pod(netaddr.IPAddress(host)))
        expect: list[tuple[str, int, str]] = [
            ("198.18.2.12", TC_ACT_OK, "outside the overlay"),
            ("198.19.255.1", TC_ACT_OK, "outside the overlay"),
            (str(fm.gateway_for(netaddr.IPAddress(host))), TC_ACT_OK, "local gateway"),
            (src, TC_ACT_OK, "local pod"),
            (str(netaddr.IPAddress(local.last - 1)), TC_ACT_OK, "local pod, last"),
            (str(netaddr.IPAddress(local.first)), TC_ACT_OK, "local slice network: the kernel's business"),
            (str(netaddr.IPAddress(local.last)), TC_ACT_OK, "local slice broadcast: the kernel's business"),
        ]
        for other in others:
            s = fm.slice_for(other)
            expect += [
                (str(fm.first_pod(other)), TC_ACT_OK, f"pod on {other}: key set"),
                (str(netaddr.IPAddress(s.last - 1)), TC_ACT_OK, f"last pod on {other}: key set"),
                (str(netaddr.IPAddress(s.first)), TC_ACT_SHOT, f"network address of {other}'s slice"),
                (str(netaddr.IPAddress(s.last)), TC_ACT_SHOT, f"broadcast address of {other}'s slice"),
            ]
        ov = netaddr.IPNetwork(overlay)
        cbits = 32 - local.prefixlen
        # Pods in the slices of the underlay's network and broadcast "hosts": no node there.
        expect.append((str(netaddr.IPAddress(ov.first + 2)), TC_ACT_SHOT, "slice of the underlay network address"))
        expect.append((str(netaddr.IPAddress(ov.first | (((1 << (32 - u.prefixlen)) - 1) << cbits) | 2)),
                       TC_ACT_SHOT, "slice of the underlay broadcast address"))
        wrong = [(dst, want, got, why) for dst, want, why in expect
                 if (got := verdict(ipv4_packet(dst, src=src))) != want]
        assert not wrong, "\n".join(f"{dst}: want {want}, got {got} ({why})" for dst, want, got, why in wrong)

        # Not IPv4, or shorter than an IPv4 header: passed untouched.
        remote = str(fm.first_pod(others[0]))
        assert verdict(ipv4_packet(remote, src=src, version=6)) == TC_ACT_OK
        assert verdict(ipv4_packet(str(netaddr.IPAddress(fm.slice_for(others[0]).first)), src=src)[:19]) \
            == TC_ACT_OK
        # Packet bytes come back unchanged (the device encapsulates, not the program).
        packet = ipv4_packet(remote, src=src)
        assert syscall.test_run(fd, packet).data == packet
    finally:
        syscall.close(fd)
