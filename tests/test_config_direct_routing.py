"""`directRouting`: the config key, the node's segment in the plan, and what the node components
derive from it (pure: no root, no kernel)."""
from __future__ import annotations

import netaddr
import pytest

from harness.configs import refused

from cni_fan.config import FanConfig
from cni_fan.node import sysctl
from cni_fan.node.conf import parse_conflist
from cni_fan.node.fanmap_bpf import datapath_params
from cni_fan.node.firewall import FirewallRules
from cni_fan.plan import make_plan

BASE = {"name": "fan", "cniVersion": "1.0.0", "type": "fan", "overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16"}
HOST = netaddr.IPAddress("198.18.1.10")


def plan(prefixlen: int | None = 24, host: netaddr.IPAddress = HOST, **extra):
    return make_plan(FanConfig.from_dict({**BASE, **extra}), host, "eth0", 2, 1500, prefixlen)


def test_default_is_off_and_true_turns_it_on() -> None:
    assert FanConfig.from_dict(BASE).direct_routing is False
    assert FanConfig.from_dict({**BASE, "directRouting": True}).direct_routing is True


def test_the_agent_reads_it_from_the_conflist() -> None:
    conf = parse_conflist({"cniVersion": "1.0.0", "name": "fan", "plugins": [{**BASE, "directRouting": True}]})
    assert conf.fan.direct_routing is True


@pytest.mark.parametrize("value", ["true", 1, None, [True]])
def test_a_non_boolean_is_invalid_config(value) -> None:
    assert "directRouting" in refused({**BASE, "directRouting": value}).msg


@pytest.mark.parametrize("extra, reason", [({"encap": "ipip"}, "vxlan"), ({"fanmap": "routes"}, "bpf")])
def test_refused_where_the_program_cannot_choose(extra, reason) -> None:
    assert reason in refused({**BASE, "directRouting": True, **extra}).msg


@pytest.mark.parametrize("prefixlen, segment", [(24, "198.18.1.0/24"), (20, "198.18.0.0/20"),
                                                (8, "198.18.0.0/16"), (None, None)])
def test_segment_is_the_connected_prefix_within_the_underlay(prefixlen, segment) -> None:
    p = plan(prefixlen, directRouting=True)
    assert (None if p.segment is None else str(p.segment)) == segment
    assert p.direct is (segment is not None)


def test_segment_overlay_prefixes_per_family() -> None:
    p = plan(directRouting=True, overlay6="fd41::/48")
    assert [str(p.segment_overlay(s)) for s in p.slices] == ["241.1.0.0/16", "fd41:0:0:100::/56"]
    # Every node of the segment owns a slice inside it; a node outside owns one outside.
    for s in p.slices:
        inside = s.fanmap.slice_for(netaddr.IPAddress("198.18.1.254"))
        outside = s.fanmap.slice_for(netaddr.IPAddress("198.18.2.1"))
        assert inside in p.segment_overlay(s) and outside not in p.segment_overlay(s)


def test_ipv6_only_segment() -> None:
    raw = {"name": "fan", "type": "fan", "overlay6": "fd50::/48", "underlay": "fd00:198:18::/104",
           "directRouting": True}
    p = make_plan(FanConfig.from_dict(raw), netaddr.IPAddress("fd00:198:18::1:c"), "eth0", 2, 1500, 112)
    assert str(p.segment) == "fd00:198:18::1:0/112"
    assert str(p.segment_overlay(p.ipv6)) == "fd50:0:0:100::/56"
    params = datapath_params(p)
    assert params.direct and str(params.segment) == "fd00:198:18::1:0/112"


def test_program_params_follow_the_plan() -> None:
    on = datapath_params(plan(directRouting=True))
    off = datapath_params(plan())
    assert on.direct and str(on.segment) == "198.18.1.0/24"
    assert not off.direct


def test_sysctls_loose_rp_filter_on_the_underlay_only_with_direct_routing() -> None:
    assert "net.ipv4.conf.eth0.rp_filter" not in sysctl.wanted(plan())
    assert sysctl.wanted(plan(directRouting=True))["net.ipv4.conf.eth0.rp_filter"] == "2"
    dual = sysctl.wanted(plan(directRouting=True, overlay6="fd41::/48"))
    assert dual["net.ipv6.conf.eth0.disable_ipv6"] == "0"


def test_firewall_rules_unchanged_without_direct_routing() -> None:
    rules = FirewallRules.from_plan(plan())
    assert "direct" not in repr(rules) and "chain direct" not in rules.nft_ruleset()


def test_firewall_direct_chain() -> None:
    text = FirewallRules.from_plan(plan(directRouting=True, overlay6="fd41::/48")).nft_ruleset()
    assert ('iifname "eth0" ip saddr 241.1.10.0/24 counter drop' in text
            and 'iifname "eth0" ip saddr 241.0.0.0/8 ip saddr != 241.1.0.0/16 counter drop' in text
            and 'iifname "eth0" ip6 saddr fd41::/48 ip6 saddr != fd41:0:0:100::/56 counter drop' in text)


@pytest.mark.parametrize("all_, dev, problem", [("1", "2", False), ("1", "1", True), ("0", "1", True),
                                                ("0", "0", False), ("2", "1", False)])
def test_status_reports_a_strict_effective_rp_filter(tmp_path, monkeypatch, all_, dev, problem) -> None:
    """The kernel uses the larger of `all` and the device's value; strict (1) drops direct packets."""
    from cni_fan.readiness import direct_routing_problems
    for name, value in (("all", all_), ("eth0", dev)):
        path = tmp_path / "net" / "ipv4" / "conf" / name
        path.mkdir(parents=True)
        (path / "rp_filter").write_text(value + "\n")
    monkeypatch.setenv("CNI_FAN_PROC_SYS", str(tmp_path))
    assert bool(direct_routing_problems(plan(directRouting=True))) is problem
    assert direct_routing_problems(plan()) == []
