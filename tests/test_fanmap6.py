"""FanMap with IPv6 overlays: the worked examples of issue 11 (dual-stack and
IPv6-only) and every IPv6 refusal (the properties over random fans of both
families are in test_fanmap_properties.py)."""
from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from cni_fan.fanmap import FanMap, FanMapError

# -- worked examples ------------------------------------------------------------


def test_dual_stack_example_ipv4_underlay_names_an_ipv6_slice() -> None:
    fan, host = FanMap.parse_host("fd50::/48", "172.30.0.28/16")
    assert host == IPAddress("172.30.0.28")
    assert (fan.overlay, fan.underlay) == (IPNetwork("fd50::/48"), IPNetwork("172.30.0.0/16"))
    assert (fan.slice_prefixlen, fan.host_bits) == (64, 16)
    assert str(fan.slice_for(host)) == "fd50:0:0:1c::/64"
    assert str(fan.gateway_for(host)) == "fd50:0:0:1c::1"
    assert fan.first_pod(host) == IPAddress("fd50:0:0:1c::2")
    assert fan.last_pod(host) == IPAddress("fd50:0:0:1c:ffff:ffff:ffff:fffe")
    assert fan.capacity == (1 << 64) - 3
    owner = fan.underlay_host_for("fd50:0:0:1c::5")
    assert (owner, owner.version) == (host, 4)


def test_ipv6_only_example_ipv6_underlay_names_an_ipv6_slice() -> None:
    fan, host = FanMap.parse_host("fd50::/48", "fd00:198:18::1c/112")
    assert host == IPAddress("fd00:198:18::1c")
    assert str(fan.underlay) == "fd00:198:18::/112"
    assert (fan.slice_prefixlen, fan.host_bits) == (64, 16)
    assert str(fan.slice_for(host)) == "fd50:0:0:1c::/64"
    assert str(fan.gateway_for(host)) == "fd50:0:0:1c::1"
    owner = fan.underlay_host_for(IPAddress("fd50:0:0:1c:ffff:ffff:ffff:fffe"))
    assert (owner, owner.version) == (host, 6)


def test_ipv4_overlay_that_was_refused_before_now_maps() -> None:
    """`fd00::/8` over an IPv4 /16 was "IPv6; the Fan maps IPv4 only"; it is a /24-slice fan now."""
    fan = FanMap.parse("fd00::/8", "172.30.0.0/16")
    assert fan.slice_for("172.30.0.28") == IPNetwork("fd00:1c00::/24")


def test_a_pod_has_the_same_index_in_both_families() -> None:
    """IPv4 `.5` pairs with IPv6 `::5`: the dual-stack pod's two addresses name each other."""
    fan4 = FanMap.parse("250.0.0.0/8", "172.30.0.0/16")
    fan6 = FanMap.parse("fd50::/48", "172.30.0.0/16")
    host = "172.30.0.28"
    assert fan4.pod_address(host, 3) == IPAddress("250.0.28.5")
    assert fan6.pod_address(host, 3) == IPAddress("fd50:0:0:1c::5")
    assert fan6.pod_index(host, "fd50:0:0:1c::5") == fan4.pod_index(host, "250.0.28.5") == 3
    assert fan6.pod_address(host, fan4.capacity - 1) == IPAddress("fd50:0:0:1c::fe")


def test_smallest_ipv6_slice_is_a_slash120_shaped_like_an_ipv4_slash24() -> None:
    fan4 = FanMap.parse("250.0.0.0/8", "172.30.0.0/16", host_reserve=2)
    fan6 = FanMap.parse("fd50::/104", "172.30.0.0/16", host_reserve=2)
    host = "172.30.0.28"
    assert fan6.slice_prefixlen == 120 and fan6.capacity == fan4.capacity == 252
    assert fan6.slice_for(host) == IPNetwork("fd50::1c00/120")
    assert fan6.reserved_for(host) == [IPAddress("fd50::1c01"), IPAddress("fd50::1c02")]
    assert fan6.first_pod(host) == IPAddress("fd50::1c03")
    assert fan6.last_pod(host) == IPAddress("fd50::1cfe")
    for index in (0, 100, 251):
        assert fan6.pod_address(host, index).value & 0xFF == fan4.pod_address(host, index).value & 0xFF


def test_slash126_underlay_has_two_hosts() -> None:
    fan = FanMap.parse("fd50::/48", "fd00:198:18::/126")
    assert [IPAddress(h, 6) for h in fan.host_ints()] == [IPAddress("fd00:198:18::1"), IPAddress("fd00:198:18::2")]
    assert fan.slice_for("fd00:198:18::2") == IPNetwork("fd50:0:0:8000::/50")


def test_small_integers_stay_ipv6() -> None:
    """An overlay low in the IPv6 space still gives IPv6 answers (netaddr guesses IPv4 for small integers)."""
    fan = FanMap.parse("::1:0/112", "10.0.0.0/24")  # /120 slices
    network = fan.slice_for("10.0.0.1")
    assert network.version == 6 and (network.first, network.prefixlen) == (0x1_0100, 120)
    gateway = fan.gateway_for("10.0.0.1")
    assert (gateway.version, gateway.value) == (6, 0x1_0101)
    assert fan.underlay_host_for(IPAddress("::1:1fe")) == IPAddress("10.0.0.1")
    # The same integers in two families are not an overlap: ::a00:0/112 is not 10.0.0.0/24.
    assert FanMap.parse("::a00:0/112", "10.0.0.0/24").slice_prefixlen == 120
    # An IPv6 underlay low in the space (IPv4-compatible form) still gives IPv6 hosts.
    owner = FanMap.parse("fd50::/48", "::a00:0/104").underlay_host_for("fd50::500:0:0:1")  # /72 slices
    assert (owner.version, owner.value) == (6, 0x0A00_0005)


def test_contains_by_family() -> None:
    fan = FanMap.parse("fd50::/48", "172.30.0.0/16")
    assert fan.contains("fd50::1") and fan.contains(IPAddress("fd50:0:0:ffff:ffff:ffff:ffff:ffff"))
    assert not fan.contains("fd51::1")
    assert not fan.contains("250.0.28.5") and not fan.contains("172.30.0.28")
    with pytest.raises(FanMapError, match="'fd50::x' is not an IP address"):
        fan.contains("fd50::x")


def test_value_semantics_across_families() -> None:
    a = FanMap.parse("fd50::/48", "172.30.0.28/16")
    b = FanMap(IPNetwork("fd50::/48"), IPNetwork("172.30.0.0/16"))
    c = FanMap.parse("fd50::/48", "fd00:198:18::/112")
    assert a == b and hash(a) == hash(b) and a != c


def test_integer_forms_for_an_ipv6_underlay() -> None:
    fan = FanMap.parse("fd50::/48", "fd00:198:18::/112")
    hosts = fan.host_ints()
    assert (hosts.start, hosts.stop - 1) == (IPAddress("fd00:198:18::1").value, IPAddress("fd00:198:18::fffe").value)
    assert fan.slice_and_gateway_ints(IPAddress("fd00:198:18::1c").value) == (
        IPAddress("fd50:0:0:1c::").value, IPAddress("fd50:0:0:1c::1").value)


# -- refusals -----------------------------------------------------------------

REFUSED_PARSE6 = [
    # (overlay, underlay, host_reserve, fragment of the message)
    ("250.0.0.0/8", "fd00:198:18::/112", 1,
     "underlay 'fd00:198:18::/112' is IPv6 but overlay '250.0.0.0/8' is IPv4: an IPv4 overlay is named by "
     "the nodes' IPv4 addresses"),
    ("fd50::", "172.30.0.0/16", 1, "overlay 'fd50::' has no prefix length; write it in CIDR form, e.g. fd50::/48"),
    ("fd50::/129", "172.30.0.0/16", 1, "overlay 'fd50::/129' is not an IPv6 network in CIDR form (like fd50::/48)"),
    ("fd50:::/48", "172.30.0.0/16", 1, "overlay 'fd50:::/48' is not an IPv6 network"),
    ("fd50::/48", "fd00::g/112", 1, "underlay 'fd00::g/112' is not an IPv6 network"),
    ("fd50::/105", "172.30.0.0/16", 1,
     "overlay fd50::/105 over underlay 172.30.0.0/16 gives /121 slices (105 + 32 - 16), fewer than the 256 "
     "addresses of an IPv4 /24 slice; slices must be /120 or shorter"),
    ("fd50::/64", "fd00::/64", 1, "overlay fd50::/64 over underlay fd00::/64 gives /128 slices (64 + 128 - 64)"),
    ("fd50::1:0/96", "172.30.0.0/16", 1, "overlay fd50::1:0/96 has host bits set; did you mean fd50::/96?"),
    ("ff00::/8", "172.30.0.0/16", 1,
     "overlay ff00::/8 overlaps ff00::/8 (multicast, not unicast); use part of fd00::/8 (unique local "
     "addresses), the recommended home for an IPv6 fan overlay"),
    ("ff02::/16", "172.30.0.0/16", 1, "overlay ff02::/16 overlaps ff00::/8 (multicast"),
    ("fe80::/64", "172.30.0.0/16", 1, "overlay fe80::/64 overlaps fe80::/10 (link-local"),
    ("fe80::/10", "172.30.0.0/16", 1, "overlaps fe80::/10 (link-local, never routed off a link); use part of fd00::/8"),
    ("::1/128", "172.30.0.0/30", 1, "overlay ::1/128 overlaps ::1/128 (loopback, never leaves a host)"),
    ("::/0", "172.30.0.0/16", 1, "overlay ::/0 overlaps ::/128 (the unspecified address"),
    ("::/112", "172.30.0.0/30", 1, "overlay ::/112 overlaps ::/128 (the unspecified address"),
    ("::ffff:0:0/104", "172.30.0.0/24", 1, "overlay ::ffff:0.0.0.0/104 overlaps ::ffff:0.0.0.0/96 (IPv4-mapped"),
    ("::fffe:0:0/95", "172.30.0.0/24", 1, "overlaps ::ffff:0.0.0.0/96 (IPv4-mapped"),
    ("fd00::/8", "fd00:1::/112", 1, "overlay fd00::/8 overlaps underlay fd00:1::/112"),
    ("fd00:1::/112", "fd00::/16", 1, "overlay fd00:1::/112 overlaps underlay fd00::/16"),
    ("fd50::/48", "fd00::1/127", 1,
     "underlay fd00::/127 is a /127: a fan needs the hosts' network (/126 or shorter); a /128 is usually a VIP"),
    ("fd50::/48", "fd00::1/128", 1, "underlay fd00::1/128 is a /128"),
    ("fd50::/104", "172.30.0.0/16", 254,
     "host reserve 254 leaves no pod addresses in a /120 slice (256 addresses minus subnet-router anycast, "
     "all-ones anycast and 254 reserved)"),
    ("fd50::/48", "172.30.0.0/16", 0, "host reserve 0 is below 1"),
]


@pytest.mark.parametrize("overlay, underlay, host_reserve, message", REFUSED_PARSE6)
def test_parse_refuses_with_a_clear_message(overlay, underlay, host_reserve, message) -> None:
    with pytest.raises(FanMapError) as caught:
        FanMap.parse(overlay, underlay, host_reserve)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_longest_allowed_slices_and_underlays_are_accepted() -> None:
    assert FanMap.parse("fd50::/104", "172.30.0.0/16").slice_prefixlen == 120
    assert FanMap.parse("fd50::/48", "fd00::/64").slice_prefixlen == 112
    assert FanMap.parse("fd50::/118", "fd00::/126").slice_prefixlen == 120
    assert FanMap.parse("fd50::/104", "172.30.0.0/16", host_reserve=253).capacity == 1


def test_constructor_refuses_mixed_families_with_the_networks_named() -> None:
    with pytest.raises(FanMapError) as caught:
        FanMap(IPNetwork("250.0.0.0/8"), IPNetwork("fd00:198:18::/112"))
    assert str(caught.value).startswith("underlay fd00:198:18::/112 is IPv6 but overlay 250.0.0.0/8 is IPv4:")


@pytest.mark.parametrize(
    "underlay, message",
    [
        ("fd00:198:18::/112", "underlay fd00:198:18::/112 names the network, not a host; "
                              "give this host's address with the prefix, e.g. fd00:198:18::1/112"),
        ("fd00:198:18::ffff/112",
         "host fd00:198:18::ffff is the all-ones anycast address of underlay fd00:198:18::/112, which no host can hold"),
    ],
)
def test_parse_host_refuses_first_and_last_ipv6_underlay_addresses(underlay: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        FanMap.parse_host("fd50::/48", underlay)
    assert message in str(caught.value)


@pytest.fixture
def fan6() -> FanMap:
    return FanMap.parse("fd50::/48", "fd00:198:18::/112")


@pytest.fixture
def dual() -> FanMap:
    return FanMap.parse("fd50::/48", "172.30.0.0/16")


@pytest.mark.parametrize(
    "host, message",
    [
        ("fd00:198:19::1", "host fd00:198:19::1 is not in underlay fd00:198:18::/112"),
        ("fd00:198:18::", "host fd00:198:18:: is the subnet-router anycast address of underlay fd00:198:18::/112"),
        ("fd00:198:18::ffff", "host fd00:198:18::ffff is the all-ones anycast address of underlay"),
        ("fd00:198:18::1/112", "host 'fd00:198:18::1/112' is not an IPv6 address"),
        ("172.30.0.28", "host 172.30.0.28 is IPv4; this fan's underlay fd00:198:18::/112 is IPv6"),
        (IPAddress("172.30.0.28"), "host 172.30.0.28 is IPv4"),
        (28, "host must be an IPv6 address, got 28"),
    ],
)
def test_every_host_query_refuses_bad_ipv6_hosts(fan6: FanMap, host, message: str) -> None:
    queries = [
        fan6.slice_for, fan6.gateway_for, fan6.first_pod, fan6.last_pod, fan6.reserved_for,
        lambda h: fan6.pod_address(h, 0), lambda h: fan6.pod_index(h, "fd50:0:0:1c::2"),
    ]
    for query in queries:
        with pytest.raises(FanMapError) as caught:
            query(host)
        assert message in str(caught.value)


def test_dual_stack_map_takes_ipv4_hosts_only(dual: FanMap) -> None:
    with pytest.raises(FanMapError, match=r"host fd00:198:18::1c is IPv6; this fan's underlay 172.30.0.0/16 is IPv4"):
        dual.slice_for("fd00:198:18::1c")
    with pytest.raises(FanMapError, match="host 172.30.255.255 is the broadcast address of underlay 172.30.0.0/16"):
        dual.slice_for("172.30.255.255")


@pytest.mark.parametrize(
    "address, message",
    [
        ("fd50:0:0:1c::", "fd50:0:0:1c:: is not a pod address: it is the subnet-router anycast address of slice "
                          "fd50:0:0:1c::/64"),
        ("fd50:0:0:1c::1", "it is reserved for the host in slice fd50:0:0:1c::/64"),
        ("fd50:0:0:1c:ffff:ffff:ffff:ffff", "it is the all-ones anycast address of slice fd50:0:0:1c::/64"),
        ("fd50:0:0:1d::2", "fd50:0:0:1d::2 is not a pod address: it is not in slice fd50:0:0:1c::/64"),
        ("250.0.28.2", "pod address 250.0.28.2 is IPv4; this fan's overlay fd50::/48 is IPv6"),
        ("x", "pod address 'x' is not an IPv6 address"),
    ],
)
def test_pod_index_refuses_non_pod_addresses(fan6: FanMap, address: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        fan6.pod_index("fd00:198:18::1c", address)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "address, message",
    [
        ("fd51::1", "fd51::1 is not in overlay fd50::/48"),
        ("fd50::9", "fd50::9 maps to fd00:198:18::, the subnet-router anycast address of underlay "
                    "fd00:198:18::/112, so no host owns it"),
        ("fd50:0:0:ffff::1", "fd50:0:0:ffff::1 maps to fd00:198:18::ffff, the all-ones anycast address of underlay"),
        ("nope", "overlay address 'nope' is not an IPv6 address"),
        ("250.0.28.5", "overlay address 250.0.28.5 is IPv4; this fan's overlay fd50::/48 is IPv6"),
    ],
)
def test_underlay_host_for_refuses(fan6: FanMap, address: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        fan6.underlay_host_for(address)
    assert message in str(caught.value)


def test_dual_stack_reverse_map_refuses_the_broadcast_hosts_slice(dual: FanMap) -> None:
    with pytest.raises(FanMapError, match="maps to 172.30.255.255, the broadcast address of underlay 172.30.0.0/16"):
        dual.underlay_host_for("fd50:0:0:ffff::1")
