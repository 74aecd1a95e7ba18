"""`overlay6`: the config and the node plan of dual-stack pods (pure, no root).

The node's IPv4 underlay address names its IPv6 slice as it names its IPv4
one, so a pod's two addresses share their container index; what cannot
work (IPIP, an MTU below IPv6's minimum, a malformed prefix) is refused
with code 7 and the key named.
"""
from __future__ import annotations

import netaddr
import pytest

from harness.configs import refused

from cni_fan.cni.errors import CniError
from cni_fan.config import FanConfig, parse_ipam_config
from cni_fan.plan import make_plan

BASE = {"name": "fan", "cniVersion": "1.1.0", "type": "fan", "overlay": "250.0.0.0/8",
        "underlay": "172.30.0.0/16", "overlay6": "fd50::/48"}
HOST = netaddr.IPAddress("172.30.0.28")


def test_the_issues_worked_example() -> None:
    plan = make_plan(FanConfig.from_dict(BASE), HOST, "eth0", 2, 1500)
    assert str(plan.ipv4.slice) == "250.0.28.0/24"
    assert str(plan.ipv6.slice) == "fd50:0:0:1c::/64"
    assert str(plan.ipv6.gateway) == "fd50:0:0:1c::1"
    assert str(plan.ipv6.tunnel_address) == "fd50:0:0:1c::1/128"
    assert str(plan.ipv4.tunnel_address) == "250.0.28.1/32"
    assert [s.version for s in plan.slices] == [4, 6]


def test_a_pod_takes_the_same_index_in_both_families() -> None:
    plan = make_plan(FanConfig.from_dict(BASE), HOST, "eth0", 2, 1500)
    index = plan.ipv4.pod_index("250.0.28.5")
    assert str(plan.ipv6.pod_address(index)) == "fd50:0:0:1c::5"


def test_without_overlay6_the_plan_has_one_family() -> None:
    raw = {k: v for k, v in BASE.items() if k != "overlay6"}
    plan = make_plan(FanConfig.from_dict(raw), HOST, "eth0", 2, 1500)
    assert plan.ipv6 is None and plan.slices == (plan.ipv4,)


def test_fan_ipam_reads_overlay6_from_its_ipam_object() -> None:
    params = parse_ipam_config({"name": "n", "ipam": {"type": "fan-ipam", "overlay": "250.0.0.0/8",
                                                       "underlay": "172.30.0.0/16", "overlay6": "fd50::/48"}})
    assert [m.overlay.version for m in params.fanmaps] == [4, 6]


@pytest.mark.parametrize("overlay6, words", [
    ("fd50::/48\n", "is not an IPv6 network in CIDR form"),
    (" fd50::/48", "is not an IPv6 network in CIDR form"),
    ("250.0.0.0/8", "is not an IPv6 network in CIDR form"),
    ("fd50::1/48", "host bits"),
    ("fd50::/120", "/120"),
    ("ff00::/48", "multicast"),
    ("fe80::/48", "link-local"),
    (48, "must be a non-empty string"),
])
def test_unusable_overlay6_is_refused_naming_the_key(overlay6, words) -> None:
    error = refused({**BASE, "overlay6": overlay6})
    assert "overlay6" in error.msg and words in error.msg, error.msg


def test_ipip_cannot_carry_ipv6_pods() -> None:
    error = refused({**BASE, "encap": "ipip"})
    assert "overlay6" in error.msg and "vxlan" in error.msg


def test_an_mtu_below_ipv6s_minimum_is_refused() -> None:
    assert "1280" in refused({**BASE, "mtu": 1200}).msg
    cfg = FanConfig.from_dict({k: v for k, v in BASE.items() if k != "overlay6"} | {"mtu": 1200})
    assert cfg.mtu == 1200  # IPv4 alone still takes it
    with pytest.raises(CniError, match="IPv6 minimum of 1280"):
        make_plan(FanConfig.from_dict(BASE), HOST, "eth0", 2, 1320)  # 1320 - 50 = 1270


def test_ipv6_routes_need_overlay6_and_match_families() -> None:
    cfg = FanConfig.from_dict({**BASE, "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"},
                                                  {"dst": "fd99::/64", "gw": "fd50:0:0:1c::1"}]})
    assert [r.dst for r in cfg.params.routes] == ["0.0.0.0/0", "::/0", "fd99::/64"]
    no6 = {k: v for k, v in BASE.items() if k != "overlay6"}
    assert "routes[0].dst" in refused({**no6, "routes": [{"dst": "::/0"}]}).msg
    assert "is not an IPv6 address" in refused({**BASE, "routes": [{"dst": "::/0", "gw": "250.0.28.1"}]}).msg


def test_ipv6_slices_smaller_than_ipv4_ones_are_refused() -> None:
    # A /24 underlay: IPv4 /16 slices (65,533 pods), IPv6 /120 slices (253).
    error = refused({**BASE, "underlay": "172.30.0.0/24", "overlay6": "fd50::/112"})
    assert "fewer than the 65533" in error.msg and error.msg.startswith("overlay6:"), error.msg


def test_old_result_versions_tag_each_address_with_its_family() -> None:
    from cni_fan.cni.result import IPConfig

    assert IPConfig(address="fd50:0:0:1c::5/64").to_dict("0.4.0")["version"] == "6"
    assert IPConfig(address="250.0.28.5/24").to_dict("0.3.1")["version"] == "4"


def test_ipv6_slices_name_a_bridge_and_its_mac() -> None:
    from cni_fan.plan import bridge_mac_for, bridge_name_for

    assert bridge_name_for(netaddr.IPNetwork("fd50:0:0:1c::/64")) == "fan6-1c"
    assert bridge_name_for(netaddr.IPNetwork("fd50:ffff:ffff:ffff::/64")) == "fan6-ffffffffff"  # 15 characters
    assert bridge_name_for(netaddr.IPNetwork("fd50::1c00/120")) == "fan6-1c"
    assert bridge_mac_for("fd50:0:0:1c::1") == "02:fc:00:1c:00:01"
    assert bridge_mac_for("fd50:0:0:1d::1") != bridge_mac_for("fd50:0:0:1c::1")
    assert bridge_mac_for("250.0.28.1") == "02:fc:fa:00:1c:01"  # unchanged for IPv4


def test_an_ipv4_overlay_over_an_ipv6_underlay_is_refused_saying_why() -> None:
    """IPv4 slices are named by IPv4 node addresses: a node of an IPv6-only cluster has none."""
    err = refused(dict(BASE, underlay="fd00:198:18::/112"))
    assert err.msg.startswith("overlay:") and "IPv4 addresses" in err.msg and "dual-stack" in err.msg
