"""An IPv6 underlay: the config, the node plan and the node components' pure parts of an IPv6-only cluster.

The node's IPv6 underlay address names its one slice (of `overlay6`); what
cannot work (an IPv4 `overlay`, more host bits than the eBPF program maps,
IPIP, the `routes` mapping) is refused with code 7 and the key named; the
plugins serve its pods (tests/test_ipam_ipv6_only*.py, tests/test_plugin_ipv6_only.py).
"""
from __future__ import annotations

import ipaddress

import netaddr
import pytest

from harness.configs import refused

from cni_fan.bpf.fanprog_u6 import Underlay6DatapathParams, build_underlay6_program
from cni_fan.cni.errors import CniError
from cni_fan.config import FanConfig, parse_ipam_config
from cni_fan.node.fanmap_bpf import datapath_params
from cni_fan.node.firewall import FirewallRules
from cni_fan.node.sysctl import wanted
from cni_fan.node.tunnel import link_spec
from cni_fan.plan import make_plan

BASE = {"name": "fan", "cniVersion": "1.1.0", "type": "fan", "underlay": "fd00:198:18::/112",
        "overlay6": "fd50::/48"}
HOST = netaddr.IPAddress("fd00:198:18::1c")


def plan_of(raw: dict = BASE, mtu: int = 1500):
    return make_plan(FanConfig.from_dict(raw), HOST, "eth0", 2, mtu)


def test_the_issues_worked_example() -> None:
    plan = plan_of()
    assert plan.ipv4 is None
    assert str(plan.ipv6.slice) == "fd50:0:0:1c::/64"
    assert str(plan.ipv6.gateway) == "fd50:0:0:1c::1"
    assert str(plan.ipv6.tunnel_address) == "fd50:0:0:1c::1/128"
    assert plan.slices == (plan.ipv6,) and plan.primary is plan.ipv6
    assert plan.host == HOST and plan.ipv6_underlay


def test_bridge_is_named_and_addressed_after_the_ipv6_slice() -> None:
    plan = plan_of()
    assert plan.bridge == "fan6-1c"
    assert plan.bridge_mac == "02:fc:00:1c:00:01"
    assert plan.bridge_gateways == (("fd50:0:0:1c::1", 64),)


def test_mtu_is_the_underlays_minus_vxlan_over_ipv6() -> None:
    assert plan_of().mtu == 1430
    assert plan_of(mtu=9000).mtu == 8930
    with pytest.raises(CniError) as caught:
        plan_of(mtu=1340)  # 1270: below IPv6's minimum
    assert "1280" in caught.value.msg


def test_params_have_one_family_and_the_ipv6_underlay() -> None:
    params = FanConfig.from_dict(BASE).params
    assert params.fanmap is None and params.ipv6_only
    assert [m.overlay.version for m in params.fanmaps] == [6]
    assert str(params.underlay_net) == "fd00:198:18::/112"


def test_default_vni_is_the_overlays_first_24_bits() -> None:
    assert FanConfig.from_dict(BASE).vni == 0xFD5000
    assert FanConfig.from_dict({**BASE, "vni": 7}).vni == 7


def test_a_96_underlay_fits_the_programs_32_host_bits() -> None:
    plan = plan_of({**BASE, "underlay": "fd00:198:18::/96", "overlay6": "fd50::/32"})
    assert str(plan.ipv6.slice) == "fd50:0:0:1c::/64"


def test_fan_ipam_reads_an_ipv6_underlay_from_its_ipam_object() -> None:
    params = parse_ipam_config({"name": "n", "ipam": {"type": "fan-ipam", "underlay": "fd00:198:18::/112",
                                                       "overlay6": "fd50::/48"}})
    assert params.ipv6_only and [m.overlay.version for m in params.fanmaps] == [6]


@pytest.mark.parametrize("change, key, words", [
    ({"overlay": "250.0.0.0/8"}, "overlay", "IPv4 slices are named by the nodes' IPv4 addresses"),
    ({"overlay6": None}, "overlay6", "is required with an IPv6 underlay"),
    ({"underlay": "fd00:198::/64", "overlay6": "fd50::/32"}, "underlay", "at most 32"),
    ({"underlay": "fd00:198:18::/95", "overlay6": "fd50::/24"}, "underlay", "33 host bits"),
    ({"underlay": "fd00:198:18::1/112\n"}, "underlay", "is not an IPv6 network in CIDR form"),
    ({"underlay": "fd50::/112"}, "overlay6/underlay", "overlaps"),
    ({"encap": "ipip"}, "overlay6", "vxlan"),
    ({"fanmap": "routes"}, "fanmap", "IPv6 underlay"),
    ({"mtu": 1200}, "mtu", "1280"),
    ({"routes": [{"dst": "0.0.0.0/0"}]}, "routes[0].dst", "IPv6-only"),
])
def test_what_cannot_work_is_refused_naming_the_key(change, key, words) -> None:
    raw = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    error = refused(raw)
    assert error.msg.startswith(key) and words in error.msg, error.msg


def test_ipv6_routes_are_accepted() -> None:
    cfg = FanConfig.from_dict({**BASE, "routes": [{"dst": "::/0"}]})
    assert [r.dst for r in cfg.params.routes] == ["::/0"]


def test_tunnel_is_vxlan_over_ipv6_taking_zero_checksums() -> None:
    spec = link_spec(plan_of())
    assert spec["vxlan_local6"] == "fd00:198:18::1c" and "vxlan_local" not in spec
    assert spec["vxlan_udp_zero_csum6_rx"] == 1 and spec["vxlan_udp_zero_csum6_tx"] == 1
    assert spec["mtu"] == 1430


def test_program_parameters_are_the_ipv6_underlay_ones() -> None:
    params = datapath_params(plan_of())
    assert isinstance(params, Underlay6DatapathParams)
    assert params.underlay == ipaddress.IPv6Network("fd00:198:18::/112")
    assert params.local_underlay == ipaddress.IPv6Address("fd00:198:18::1c")
    assert params.overlay6 == ipaddress.IPv6Network("fd50::/48")
    assert build_underlay6_program(params)  # the generator takes them


def test_sysctls_are_ipv6_ones_only() -> None:
    settings = wanted(plan_of())
    assert settings["net.ipv6.conf.all.forwarding"] == "1"
    assert not [k for k in settings if k.startswith("net.ipv4.") or k.endswith("call-iptables")]


def test_firewall_filters_the_tunnel_over_ipv6_and_masquerades_ipv6() -> None:
    rules = FirewallRules.from_plan(plan_of())
    text = rules.nft_ruleset()
    assert "table ip " not in text
    assert "udp dport 4789 ip6 saddr != fd00:198:18::/112 counter drop" in text
    assert "ip6 saddr fd50:0:0:1c::/64 ip6 daddr != fd50::/48 counter masquerade" in text
    assert "underlay6='fd00:198:18::/112'" in repr(rules)


def test_firewall_without_masquerade_keeps_the_input_filter() -> None:
    text = FirewallRules.from_plan(plan_of({**BASE, "ipMasq": False})).nft_ruleset()
    assert "drop" in text and "masquerade" not in text
