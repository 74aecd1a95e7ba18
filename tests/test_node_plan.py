"""The node's plan and the pure pieces derived from it (no root, no kernel).

- `cni_fan.plan.make_plan`: names, the shared tunnel MAC, the next hop, MTU defaults
  per encapsulation, the per-node MACs of the `routes` mapping;
- `firewall.FirewallRules.nft_ruleset`: the text handed to `nft -f`
  (checked once by nft itself, in a throwaway namespace, when root);
- `fanmap_routes.messages`: every netlink message decoded back with
  `struct` (first and last peer, own host skipped, distinct metrics,
  count = `expected_entries`);
- `tunnel.link_spec` for VXLAN and IPIP;
- dual-stack (`overlay6`): the NAT66 table, the IPv6 peer messages, the IPv6
  sysctls; an IPv4-only plan renders exactly what it did before.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess

import netaddr
import pytest

from cni_fan.cni.errors import INVALID_CONFIG, CniError
from cni_fan.config import FanConfig
from cni_fan.fanmap import FanMap
from cni_fan.node import fanmap_routes, firewall, sysctl, tunnel
from cni_fan.node.firewall import NFT_TABLE
from cni_fan.plan import (TUNNEL_NAMES, bridge_mac_for, inner_source_mac, make_plan, peer_mac, shared_tunnel_mac,
                          slice_plan)

BASE = {"name": "fan", "cniVersion": "1.0.0", "type": "fan", "overlay": "241.0.0.0/8",
        "underlay": "198.18.0.0/16", "dataDir": "/nonexistent/cni-fan-test"}
HOST = netaddr.IPAddress("198.18.1.11")


def cfg(**extra) -> FanConfig:
    return FanConfig.from_dict({**BASE, **extra})


def plan(host: str | netaddr.IPAddress = HOST, underlay_mtu: int = 1500, ifindex: int = 2, **extra):
    return make_plan(cfg(**extra), netaddr.IPAddress(host), "eth0", ifindex, underlay_mtu)


# -- plan -----------------------------------------------------------------------

def test_names_slice_gateway_and_defaults() -> None:
    p = plan()
    assert p.ipv4.slice == netaddr.IPNetwork("241.1.11.0/24")
    assert p.ipv4.gateway == netaddr.IPAddress("241.1.11.1")
    assert p.bridge == "fan-241-1-11"
    assert p.tunnel == "fan-vxlan" == TUNNEL_NAMES["vxlan"]
    assert plan(encap="ipip").tunnel == "fan-ipip"
    assert (p.underlay_ifname, p.underlay_ifindex, p.ipv4.host) == ("eth0", 2, HOST)
    assert p.vni == int(netaddr.IPAddress("241.0.0.0")) >> 8 == 0xF10000
    assert p.vxlan_port == 4789
    assert p.ipv4.overlay_route == "241.0.0.0/8"
    assert p.fanmap_mode == "bpf" and p.ip_masq is True
    # Every interface name the plan makes fits IFNAMSIZ.
    for other in ("198.18.255.254", "198.18.100.200", "198.18.0.1"):
        q = plan(other)
        assert len(q.bridge) <= 15 and len(q.tunnel) <= 15


def test_bridge_name_override_and_hex_fallback() -> None:
    assert plan(bridge="fanbr0").bridge == "fanbr0"
    # 240.0.0.0/12 over a /16 underlay: /28 slices, four significant octets.
    p = make_plan(cfg(overlay="240.0.0.0/12"), HOST, "eth0", 2, 1500)
    assert p.ipv4.slice.prefixlen == 28
    assert p.bridge == f"fan-{int(p.ipv4.slice.network):08x}" and len(p.bridge) <= 15


def test_shared_mac_is_the_same_on_every_node_and_locally_administered() -> None:
    macs = {plan(h).tunnel_mac for h in ("198.18.1.11", "198.18.2.12", "198.18.255.254")}
    assert macs == {shared_tunnel_mac(0xF10000)} == {"02:fa:f1:00:00:01"}
    p = plan()
    assert p.inner_src_mac == inner_source_mac(0xF10000) == "02:fa:f1:00:00:02"
    # VXLAN drops frames from its own MAC: the inner source must differ.
    assert p.inner_src_mac != p.tunnel_mac
    for mac in (p.tunnel_mac, p.inner_src_mac):
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01, f"{mac} must be a locally administered unicast MAC"
    # The VNI is part of it: two fans on one underlay do not share MACs.
    assert plan(vni=42).tunnel_mac == "02:fa:00:00:2a:01" != p.tunnel_mac


def test_next_hop_is_an_overlay_address_no_node_owns() -> None:
    p = plan()
    assert p.ipv4.next_hop == netaddr.IPAddress("241.0.0.0")
    assert p.ipv4.next_hop in p.ipv4.overlay
    # It lies in the slice of the underlay's network address (no host has that),
    # and never in this node's own slice.
    container_bits = 32 - p.ipv4.slice.prefixlen
    assert (int(p.ipv4.next_hop) - p.ipv4.overlay.first) >> container_bits == 0
    assert p.ipv4.next_hop not in p.ipv4.slice
    assert {plan(h).ipv4.next_hop for h in ("198.18.1.11", "198.18.2.12")} == {p.ipv4.next_hop}


@pytest.mark.parametrize("encap,underlay_mtu,want", [
    ("vxlan", 1500, 1450), ("ipip", 1500, 1480),
    ("vxlan", 9000, 8950), ("ipip", 9000, 8980),
    ("vxlan", 1442, 1392),  # OpenStack's tenant networks
])
def test_mtu_defaults_to_underlay_minus_the_encapsulation(encap: str, underlay_mtu: int, want: int) -> None:
    assert plan(encap=encap, underlay_mtu=underlay_mtu).mtu == want


@pytest.mark.parametrize("encap", ["vxlan", "ipip"])
def test_mtu_override_wins(encap: str) -> None:
    assert plan(encap=encap, mtu=1300, underlay_mtu=9000).mtu == 1300


@pytest.mark.parametrize("encap,underlay_mtu,want", [("vxlan", 625, 575), ("ipip", 595, 575)])
def test_mtu_below_the_ipv4_minimum_is_refused_with_code_7(encap: str, underlay_mtu: int, want: int) -> None:
    """The one MTU check: the plugin, STATUS and the agent all get it from `make_plan`."""
    with pytest.raises(CniError) as caught:
        plan(encap=encap, underlay_mtu=underlay_mtu)
    assert caught.value.code == INVALID_CONFIG
    assert caught.value.msg == f"pod MTU would be {want}, below the IPv4 minimum of 576"
    assert caught.value.details == f'underlay eth0 has MTU {underlay_mtu}; set "mtu"'
    assert plan(encap=encap, underlay_mtu=underlay_mtu + 1).mtu == 576
    assert plan(encap=encap, underlay_mtu=underlay_mtu, mtu=1400).mtu == 1400  # an explicit MTU needs no headroom


def test_slice_plan_is_what_the_ipam_and_the_tunnel_address_read() -> None:
    v4 = plan().ipv4
    assert v4 == slice_plan(FanMap.parse("241.0.0.0/8", "198.18.0.0/16"), HOST)
    assert (v4.first_pod, v4.last_pod) == (netaddr.IPAddress("241.1.11.2"), netaddr.IPAddress("241.1.11.254"))
    assert v4.overlay == netaddr.IPNetwork("241.0.0.0/8") and v4.underlay == netaddr.IPNetwork("198.18.0.0/16")
    assert v4.tunnel_address == netaddr.IPNetwork("241.1.11.1/32")
    assert plan(hostReserve=3).ipv4.first_pod == netaddr.IPAddress("241.1.11.4")


def test_bridge_mac_is_derived_from_the_gateway() -> None:
    assert plan().bridge_mac == bridge_mac_for("241.1.11.1") == "02:fc:f1:01:0b:01"
    assert plan("198.18.2.12").bridge_mac == "02:fc:f1:02:0c:01"


def test_routes_mode_gives_each_node_its_own_mac() -> None:
    hosts = ["198.18.1.11", "198.18.2.12", "198.18.2.13"]
    plans = [plan(h, fanmap="routes") for h in hosts]
    assert [p.tunnel_mac for p in plans] == ["02:fb:c6:12:01:0b", "02:fb:c6:12:02:0c", "02:fb:c6:12:02:0d"]
    assert all(p.tunnel_mac == peer_mac(p.ipv4.host) for p in plans)
    assert len({p.tunnel_mac for p in plans}) == len(plans)
    assert all(p.tunnel_mac != shared_tunnel_mac(p.vni) for p in plans)
    assert all(p.fanmap_mode == "routes" for p in plans)


def test_plan_is_pure() -> None:
    assert plan() == plan()
    assert plan() != plan(mtu=1400)


# -- firewall -------------------------------------------------------------------

def test_nft_ruleset_vxlan_with_masquerade() -> None:
    rules = firewall.FirewallRules.from_plan(plan())
    text = rules.nft_ruleset()
    assert text.startswith(f"table ip {NFT_TABLE} {{\n") and text.endswith("}\n")
    assert "type filter hook input priority filter; policy accept;" in text
    assert 'udp dport 4789 ip saddr != 198.18.0.0/16 counter drop comment "tunnel from outside the underlay"' in text
    assert "type nat hook postrouting priority srcnat; policy accept;" in text
    assert 'ip saddr 241.1.11.0/24 ip daddr != 241.0.0.0/8 counter masquerade comment "pods leaving the overlay"' \
        in text
    assert text.count("{") == text.count("}") == 3
    # Nothing accepts or drops outside those two rules.
    assert text.count(" drop ") == 1 and text.count("masquerade") == 1


def test_nft_ruleset_follows_port_masquerade_and_encap() -> None:
    assert "udp dport 8472 " in firewall.FirewallRules.from_plan(plan(vxlanPort=8472)).nft_ruleset()
    no_masq = firewall.FirewallRules.from_plan(plan(ipMasq=False)).nft_ruleset()
    assert "postrouting" not in no_masq and "masquerade" not in no_masq and "counter drop" in no_masq
    ipip = firewall.FirewallRules.from_plan(plan(encap="ipip")).nft_ruleset()
    assert "ip protocol ipencap ip saddr != 198.18.0.0/16 counter drop" in ipip
    assert "udp" not in ipip


@pytest.mark.kernel
@pytest.mark.parametrize("extra", [{}, {"ipMasq": False}, {"encap": "ipip"}, {"vxlanPort": 8472},
                                   {"overlay6": "fd41::/48"}])
def test_nft_accepts_the_ruleset(extra: dict) -> None:
    """`nft -c` (check only) in a private network namespace: the text parses."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, nft and unshare")
    text = firewall.FirewallRules.from_plan(plan(**extra)).nft_ruleset()
    proc = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, f"{proc.stderr}\n{text}"


# -- fanmap routes: the messages, decoded --------------------------------------

NLMSG = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")
RTM_NEWROUTE, RTM_NEWNEIGH = 24, 28
NLM_F_REQUEST, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x100, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 4, 5, 6, 7
NDA_DST, NDA_LLADDR = 1, 2
AF_BRIDGE, NUD_PERMANENT, NTF_SELF, RTNH_F_ONLINK = 7, 0x80, 0x02, 0x4


def attrs(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        assert length >= 4 and pos + length <= len(data), "attribute overruns its message"
        assert kind not in out, f"attribute {kind} twice"
        out[kind] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    assert pos == len(data)
    return out


def decode(msg: bytes) -> tuple[int, int, int, tuple, dict[int, bytes]]:
    length, kind, flags, seq, pid = NLMSG.unpack_from(msg)
    assert length == len(msg) and length % 4 == 0 and pid == 0
    body = msg[NLMSG.size:]
    head = RTMSG.unpack_from(body) if kind == RTM_NEWROUTE else NDMSG.unpack_from(body)
    size = RTMSG.size if kind == RTM_NEWROUTE else NDMSG.size
    return kind, flags, seq, head, attrs(body[size:])


def peers_of(p, tunnel_index: int = 7) -> list[dict]:
    """Group the stream back into (neigh, fdb, route) per peer."""
    msgs = [decode(m) for m in fanmap_routes.messages(p, tunnel_index)]
    assert len(msgs) % 3 == 0
    seqs = [m[2] for m in msgs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    out = []
    for i in range(0, len(msgs), 3):
        neigh, fdb, route = msgs[i:i + 3]
        assert [neigh[0], fdb[0], route[0]] == [RTM_NEWNEIGH, RTM_NEWNEIGH, RTM_NEWROUTE]
        for m in (neigh, fdb, route):
            assert m[1] == NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE  # replace: re-running is harmless
        out.append({"neigh": neigh, "fdb": fdb, "route": route})
    return out


def test_routes_messages_decode_to_one_route_neighbour_and_fdb_entry_per_peer() -> None:
    p = make_plan(cfg(underlay="198.18.0.0/24", fanmap="routes"), netaddr.IPAddress("198.18.0.11"), "eth0", 2, 1500)
    assert p.ipv4.slice == netaddr.IPNetwork("241.11.0.0/16")
    fm = FanMap.parse("241.0.0.0/8", "198.18.0.0/24")
    peers = peers_of(p, tunnel_index=7)
    assert len(peers) == fanmap_routes.expected_entries(p) == 253  # .1 to .254 but ourselves

    hosts = []
    metrics = []
    for peer in peers:
        _, _, _, nhead, nat = peer["neigh"]
        assert nhead == (socket.AF_INET, 7, NUD_PERMANENT, 0, 0)
        gw = netaddr.IPAddress(int.from_bytes(nat[NDA_DST], "big"))
        mac = nat[NDA_LLADDR]
        host = netaddr.IPAddress(int.from_bytes(mac[2:], "big"))
        assert mac[:2] == b"\x02\xfb" and ":".join(f"{b:02x}" for b in mac) == peer_mac(host)
        assert gw == fm.gateway_for(host)

        _, _, _, fhead, fat = peer["fdb"]
        assert fhead == (AF_BRIDGE, 7, NUD_PERMANENT, NTF_SELF, 0)
        assert fat[NDA_LLADDR] == mac and fat[NDA_DST] == host.packed

        _, _, _, rhead, rat = peer["route"]
        family, dst_len, src_len, tos, table, proto, scope, rtype, flags = rhead
        assert (family, dst_len, src_len, tos, table, scope, rtype) == (socket.AF_INET, 16, 0, 0, 254, 0, 1)
        assert proto == 0xFA and flags == RTNH_F_ONLINK
        assert netaddr.IPNetwork(f"{netaddr.IPAddress(int.from_bytes(rat[RTA_DST], 'big'))}/16") \
            == fm.slice_for(host)
        assert rat[RTA_GATEWAY] == gw.packed
        assert struct.unpack("=I", rat[RTA_OIF])[0] == 7
        assert rat[RTA_PREFSRC] == p.ipv4.gateway.packed  # our own gateway: node traffic leaves with an overlay source
        metrics.append(struct.unpack("=I", rat[RTA_PRIORITY])[0])
        hosts.append(host)

    assert hosts[0] == netaddr.IPAddress("198.18.0.1") and hosts[-1] == netaddr.IPAddress("198.18.0.254")
    assert netaddr.IPAddress("198.18.0.11") not in hosts
    assert hosts == sorted(set(hosts))
    assert len(set(metrics)) == len(metrics), "equal metrics make the kernel's route insertion O(n^2)"


def test_routes_messages_skip_only_the_own_host_wherever_it_is() -> None:
    for own in ("198.18.0.1", "198.18.0.254"):
        p = make_plan(cfg(underlay="198.18.0.0/24", fanmap="routes"), netaddr.IPAddress(own), "eth0", 3, 1500)
        hosts = [netaddr.IPAddress(int.from_bytes(peer["fdb"][4][NDA_DST], "big")) for peer in peers_of(p, 3)]
        assert len(hosts) == fanmap_routes.expected_entries(p) == 253
        assert netaddr.IPAddress(own) not in hosts
        assert {netaddr.IPAddress("198.18.0.1"), netaddr.IPAddress("198.18.0.254")} - {netaddr.IPAddress(own)} \
            <= set(hosts)


def test_routes_messages_count_on_a_16_underlay() -> None:
    p = make_plan(cfg(fanmap="routes"), HOST, "eth0", 2, 1500)
    assert fanmap_routes.expected_entries(p) == 65533
    assert sum(1 for _ in fanmap_routes.messages(p, 5)) == 3 * 65533


# -- tunnel link spec -------------------------------------------------------------

def test_link_spec_vxlan() -> None:
    assert tunnel.link_spec(plan(ifindex=4)) == {
        "ifname": "fan-vxlan", "kind": "vxlan", "vxlan_id": 0xF10000, "vxlan_port": 4789, "vxlan_learning": 0,
        "vxlan_link": 4, "vxlan_local": "198.18.1.11", "address": "02:fa:f1:00:00:01", "mtu": 1450}
    spec = tunnel.link_spec(plan(vni=42, vxlanPort=8472, mtu=1400, fanmap="routes"))
    assert (spec["vxlan_id"], spec["vxlan_port"], spec["mtu"], spec["address"]) == \
        (42, 8472, 1400, "02:fb:c6:12:01:0b")
    # Not collect-metadata: a plain device receives at full speed (FACTS 6b).
    assert not any("collect_metadata" in key or "external" in key for key in spec)


def test_link_spec_ipip() -> None:
    assert tunnel.link_spec(plan(encap="ipip", ifindex=4)) == {
        "ifname": "fan-ipip", "kind": "ipip", "ipip_collect_metadata": True, "ipip_link": 4, "mtu": 1480}
    assert tunnel.link_spec(plan(encap="ipip", underlay_mtu=9000))["mtu"] == 8980


# -- dual-stack (overlay6) ----------------------------------------------------------

OVERLAY6 = {"overlay6": "fd41::/48"}


def test_dual_stack_plan_has_an_ipv6_tunnel_address() -> None:
    v6 = plan(**OVERLAY6).ipv6
    assert v6.slice == netaddr.IPNetwork("fd41:0:0:10b::/64") and v6.gateway == netaddr.IPAddress("fd41:0:0:10b::1")
    assert v6.tunnel_address == netaddr.IPNetwork("fd41:0:0:10b::1/128")
    assert v6.next_hop == netaddr.IPAddress("fd41::")


def test_nft_ruleset_dual_stack_adds_nat66_in_an_ip6_table() -> None:
    rules = firewall.FirewallRules.from_plan(plan(**OVERLAY6))
    text = rules.nft_ruleset()
    ipv4_only = firewall.FirewallRules.from_plan(plan()).nft_ruleset()
    assert text.startswith(ipv4_only)  # the IPv4 table is untouched
    assert text[len(ipv4_only):] == (
        f"table ip6 {NFT_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        '    ip6 saddr fd41:0:0:10b::/64 ip6 daddr != fd41::/48 counter masquerade comment "pods leaving the overlay"\n'
        "  }\n"
        "}\n")
    # The tunnel input filter stays IPv4 (the underlay is IPv4): one drop rule in all.
    assert text.count(" drop ") == 1
    no_masq = firewall.FirewallRules.from_plan(plan(ipMasq=False, **OVERLAY6)).nft_ruleset()
    assert "ip6" not in no_masq and "masquerade" not in no_masq


def test_ipv4_only_rules_repr_is_unchanged() -> None:
    """The node state file stores repr(rules): an IPv4-only node must not see a change (no re-apply)."""
    assert repr(firewall.FirewallRules.from_plan(plan())) == (
        "FirewallRules(slice='241.1.11.0/24', overlay='241.0.0.0/8', underlay='198.18.0.0/16', "
        "vxlan_port=4789, masquerade=True)")
    assert "slice6='fd41:0:0:10b::/64', overlay6='fd41::/48'" in repr(firewall.FirewallRules.from_plan(
        plan(**OVERLAY6)))


def test_sysctls_for_ipv6_only_with_overlay6() -> None:
    ipv4_only = sysctl.wanted(plan())
    assert not [k for k in ipv4_only if "ipv6" in k or "ip6tables" in k]
    dual = sysctl.wanted(plan(**OVERLAY6))
    assert {k: v for k, v in dual.items() if k not in ipv4_only} == {
        "net.ipv6.conf.all.forwarding": "1", "net.bridge.bridge-nf-call-ip6tables": "1",
        "net.ipv6.conf.fan-241-1-11.disable_ipv6": "0", "net.ipv6.conf.fan-vxlan.disable_ipv6": "0",
        "net.ipv6.conf.fan-241-1-11.accept_ra": "0", "net.ipv6.conf.fan-241-1-11.accept_dad": "0"}
    # The underlay interface is left alone (docs/install.md: accept_ra=2 there is the operator's).
    assert not [k for k in dual if ".eth0." in k]


def test_routes_messages_dual_stack_add_an_ipv6_route_and_neighbour_per_peer() -> None:
    p = make_plan(cfg(underlay="198.18.0.0/24", fanmap="routes", **OVERLAY6), netaddr.IPAddress("198.18.0.11"),
                  "eth0", 2, 1500)
    fm6 = FanMap.parse("fd41::/48", "198.18.0.0/24")
    msgs = [decode(m) for m in fanmap_routes.messages(p, 7)]
    assert len(msgs) == 5 * fanmap_routes.expected_entries(p) == 5 * 253
    seqs = [m[2] for m in msgs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    hosts, metrics6 = [], []
    for i in range(0, len(msgs), 5):
        neigh4, _fdb, route4, neigh6, route6 = msgs[i:i + 5]
        assert [m[0] for m in msgs[i:i + 5]] == [RTM_NEWNEIGH, RTM_NEWNEIGH, RTM_NEWROUTE, RTM_NEWNEIGH, RTM_NEWROUTE]
        mac = neigh4[4][NDA_LLADDR]
        host = netaddr.IPAddress(int.from_bytes(mac[2:], "big"))
        _, flags, _, nhead, nat = neigh6
        assert flags == NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
        assert nhead == (socket.AF_INET6, 7, NUD_PERMANENT, 0, 0)
        assert nat[NDA_LLADDR] == mac  # the peer's one MAC: the FDB entry serves both families
        gw6 = fm6.gateway_for(host)
        assert nat[NDA_DST] == gw6.packed
        _, _, _, rhead, rat = route6
        family, dst_len, src_len, tos, table, proto, scope, rtype, rflags = rhead
        assert (family, dst_len, src_len, tos, table, scope, rtype) == (socket.AF_INET6, 56, 0, 0, 254, 0, 1)
        assert proto == 0xFA and rflags == RTNH_F_ONLINK
        assert netaddr.IPNetwork(f"{netaddr.IPAddress(int.from_bytes(rat[RTA_DST], 'big'), 6)}/56") \
            == fm6.slice_for(host)
        assert rat[RTA_GATEWAY] == gw6.packed and struct.unpack("=I", rat[RTA_OIF])[0] == 7
        assert rat[RTA_PREFSRC] == p.ipv6.gateway.packed
        assert route4[3][0] == socket.AF_INET and len(route4[4][RTA_DST]) == 4
        metrics6.append(struct.unpack("=I", rat[RTA_PRIORITY])[0])
        hosts.append(host)
    assert netaddr.IPAddress("198.18.0.11") not in hosts and len(set(hosts)) == 253
    assert len(set(metrics6)) == 253


def test_ipv4_only_routes_messages_are_unchanged_by_the_ipv6_code() -> None:
    p = make_plan(cfg(underlay="198.18.0.0/24", fanmap="routes"), netaddr.IPAddress("198.18.0.11"), "eth0", 2, 1500)
    dual = make_plan(cfg(underlay="198.18.0.0/24", fanmap="routes", **OVERLAY6), netaddr.IPAddress("198.18.0.11"),
                     "eth0", 2, 1500)
    v4 = list(fanmap_routes.messages(p, 7))
    assert len(v4) == 3 * 253
    # The IPv4 entries of a dual-stack node are the same messages (sequence numbers aside).
    strip = [decode(m)[3:] for m in v4]
    dual_v4 = [decode(m)[3:] for m in fanmap_routes.messages(dual, 7)
               if decode(m)[3][0] != socket.AF_INET6]
    assert strip == dual_v4


def test_slice_info_metric_has_one_series_per_family() -> None:
    from cni_fan.node.metrics import slice_info
    samples = [(s.labels, s.value) for s in slice_info(plan(**OVERLAY6)).samples]
    assert samples == [({"family": "ipv4", "slice": "241.1.11.0/24", "gateway": "241.1.11.1"}, 1.0),
                       ({"family": "ipv6", "slice": "fd41:0:0:10b::/64", "gateway": "fd41:0:0:10b::1"}, 1.0)]
    assert len(slice_info(plan()).samples) == 1
