"""FanMap with IPv4 overlays: the worked examples from FACTS.md section 1 and
every refusal (the properties over random fans of both families are in
test_fanmap_properties.py)."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
from netaddr import IPAddress, IPNetwork

from cni_fan.fanmap import FanMap, FanMapError, parse_host


# -- worked examples (FACTS.md section 1) ------------------------------------


def test_announcement_example_slash16_under_slash8() -> None:
    fan, host = FanMap.parse_host("250.0.0.0/8", "172.30.0.28/16")
    assert host == IPAddress("172.30.0.28")
    assert fan.underlay == IPNetwork("172.30.0.0/16")
    assert str(fan.underlay) == "172.30.0.0/16"
    assert fan.slice_prefixlen == 24
    assert fan.host_bits == 16
    assert fan.slice_for(host) == IPNetwork("250.0.28.0/24")
    assert fan.gateway_for(host) == IPAddress("250.0.28.1")
    assert fan.first_pod(host) == IPAddress("250.0.28.2")
    assert fan.last_pod(host) == IPAddress("250.0.28.254")
    assert fan.capacity == 253
    assert fan.underlay_host_for(IPAddress("250.0.28.5")) == host


def test_kernel_example_slash20_host_gets_a_slash20() -> None:
    # Computed by hand: 10.99.238.5 & 0.0.15.255 = 0x0E05; shifted left by the
    # 12 pod bits: 0x00E05000 = 0.224.80.0; OR 99.0.0.0 -> 99.224.80.0/20.
    fan = FanMap.parse("99.0.0.0/8", "10.99.238.5/20")
    assert fan.slice_prefixlen == 20
    assert fan.slice_for(IPAddress("10.99.238.5")) == IPNetwork("99.224.80.0/20")
    assert fan.capacity == 4096 - 3
    assert fan.underlay_host_for("99.224.95.254") == IPAddress("10.99.238.5")


def test_kernel_example_slash12_underlay() -> None:
    fan = FanMap.parse("33.0.0.0/8", "10.111.1.2/12")
    assert fan.slice_prefixlen == 28
    assert fan.slice_for("10.111.1.2") == IPNetwork("33.240.16.32/28")
    assert fan.capacity == 13


def test_kernel_example_slash10_overlay() -> None:
    fan = FanMap.parse("100.64.0.0/10", "10.224.220.10/24")
    assert fan.slice_prefixlen == 18
    assert fan.slice_for("10.224.220.10") == IPNetwork("100.66.128.0/18")


def test_slash8_overlay_over_slash24_underlay_holds_65533_pods() -> None:
    fan = FanMap.parse("240.0.0.0/8", "192.168.1.0/24")
    assert fan.slice_prefixlen == 16
    assert fan.capacity == 65_533
    assert fan.slice_for("192.168.1.7") == IPNetwork("240.7.0.0/16")
    assert fan.last_pod("192.168.1.7") == IPAddress("240.7.255.254")


def test_host_reserve_moves_first_pod_but_not_gateway() -> None:
    fan = FanMap.parse("250.0.0.0/8", "172.30.0.0/16", host_reserve=3)
    host = IPAddress("172.30.0.28")
    assert fan.gateway_for(host) == IPAddress("250.0.28.1")
    assert fan.reserved_for(host) == [IPAddress(f"250.0.28.{i}") for i in (1, 2, 3)]
    assert fan.first_pod(host) == IPAddress("250.0.28.4")
    assert fan.last_pod(host) == IPAddress("250.0.28.254")
    assert fan.capacity == 251
    assert fan.pod_address(host, 0) == fan.first_pod(host)
    assert fan.pod_address(host, 250) == fan.last_pod(host)


def test_pod_address_and_index_at_the_edges() -> None:
    fan = FanMap.parse("250.0.0.0/8", "172.30.0.0/16")
    host = "172.30.0.28"
    assert fan.pod_address(host, 0) == IPAddress("250.0.28.2")
    assert fan.pod_address(host, 252) == IPAddress("250.0.28.254")
    assert fan.pod_index(host, "250.0.28.2") == 0
    assert fan.pod_index(host, IPAddress("250.0.28.254")) == 252


def test_contains() -> None:
    fan = FanMap.parse("250.0.0.0/8", "172.30.0.0/16")
    assert fan.contains("250.1.2.3")
    assert fan.contains(IPAddress("250.255.255.255"))
    assert not fan.contains("251.0.0.0")
    assert not fan.contains("172.30.0.28")
    assert not fan.contains("fd00::1")
    with pytest.raises(FanMapError, match="'nope' is not an IP address"):
        fan.contains("nope")


def test_value_semantics() -> None:
    a = FanMap.parse("250.0.0.0/8", "172.30.0.28/16")
    b = FanMap(IPNetwork("250.0.0.0/8"), IPNetwork("172.30.0.0/16"))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.host_reserve = 2  # type: ignore[misc]
    # Mutating the network handed to the constructor must not change the map.
    overlay = IPNetwork("250.0.0.0/8")
    c = FanMap(overlay, IPNetwork("172.30.0.0/16"))
    overlay.prefixlen = 9
    assert c.overlay == IPNetwork("250.0.0.0/8")
    # Copies and pickles are equal maps, built through the constructor's checks.
    assert copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a and repr(copy.copy(a)) == repr(a)


def test_constructor_normalises_underlay_host_address() -> None:
    fan = FanMap(IPNetwork("250.0.0.0/8"), IPNetwork("172.30.0.28/16"))
    assert str(fan.underlay) == "172.30.0.0/16"


def test_parse_strips_whitespace() -> None:
    fan = FanMap.parse(" 250.0.0.0/8 ", "172.30.0.28/16\n")
    assert fan.slice_for(" 172.30.0.28 ") == IPNetwork("250.0.28.0/24")


def test_module_level_parse_host() -> None:
    fan, host = parse_host("250.0.0.0/8", "172.30.0.28/16", 2)
    assert (fan.host_reserve, host) == (2, IPAddress("172.30.0.28"))


def test_import_is_light() -> None:
    code = (
        "import sys, cni_fan.fanmap\n"
        "heavy = {'pyroute2', 'asyncio', 'hypothesis'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- refusals -----------------------------------------------------------------

REFUSED_PARSE = [
    # (overlay, underlay, host_reserve, fragment of the message)
    ("250.0.0.0", "172.30.0.0/16", 1, "overlay '250.0.0.0' has no prefix length"),
    ("250.0.0/8", "172.30.0.0/16", 1, "overlay '250.0.0/8' is not an IPv4 network"),
    ("banana", "172.30.0.0/16", 1, "overlay 'banana' has no prefix length"),
    ("250.0.0.0/33", "172.30.0.0/16", 1, "overlay '250.0.0.0/33' is not an IPv4 network"),
    ("250.0.0.0/8", "172.30.0.0/x", 1, "underlay '172.30.0.0/x' is not an IPv4 network"),
    ("250.0.0.0/8", "fd00::/64", 1, "underlay 'fd00::/64' is IPv6"),
    (None, "172.30.0.0/16", 1, "overlay must be a string"),
    ("250.1.0.0/8", "172.30.0.0/16", 1, "overlay 250.1.0.0/8 has host bits set; did you mean 250.0.0.0/8?"),
    ("10.0.0.0/8", "10.1.0.0/16", 1, "overlay 10.0.0.0/8 overlaps underlay 10.1.0.0/16"),
    ("10.1.0.0/16", "10.0.0.0/8", 1, "overlay 10.1.0.0/16 overlaps underlay 10.0.0.0/8"),
    ("0.0.0.0/8", "172.30.0.0/16", 1, "overlay 0.0.0.0/8 overlaps 0.0.0.0/8 ('this network'"),
    ("127.0.0.0/8", "172.30.0.0/16", 1, "overlay 127.0.0.0/8 overlaps 127.0.0.0/8 (loopback"),
    ("127.64.0.0/10", "172.30.0.0/16", 1, "overlaps 127.0.0.0/8 (loopback"),
    ("224.0.0.0/8", "172.30.0.0/16", 1, "overlay 224.0.0.0/8 overlaps 224.0.0.0/4 (multicast"),
    ("192.0.0.0/2", "10.0.0.0/24", 1, "overlay 192.0.0.0/2 overlaps 224.0.0.0/4"),
    ("250.0.0.0/8", "172.30.0.1/32", 1, "underlay 172.30.0.1/32 is a /32"),
    ("250.0.0.0/8", "172.30.0.0/31", 1, "underlay 172.30.0.0/31 is a /31"),
    ("250.0.0.0/16", "172.30.0.0/16", 1,
     "overlay 250.0.0.0/16 over underlay 172.30.0.0/16 gives /32 slices (16 + 32 - 16)"),
    ("250.0.0.0/16", "172.30.0.0/17", 1, "gives /31 slices"),
    ("250.0.0.0/16", "172.30.0.0/18", 2, "host reserve 2 leaves no pod addresses in a /30 slice"),
    ("250.0.0.0/8", "172.30.0.0/16", 0, "host reserve 0 is below 1"),
    ("250.0.0.0/8", "172.30.0.0/16", -1, "host reserve -1 is below 1"),
    ("250.0.0.0/8", "172.30.0.0/16", 254, "host reserve 254 leaves no pod addresses in a /24 slice"),
    ("250.0.0.0/8", "172.30.0.0/16", "1", "host reserve must be a whole number, got '1'"),
    ("250.0.0.0/8", "172.30.0.0/16", True, "host reserve must be a whole number, got True"),
]


@pytest.mark.parametrize("overlay, underlay, host_reserve, message", REFUSED_PARSE)
def test_parse_refuses_with_a_clear_message(overlay, underlay, host_reserve, message) -> None:
    with pytest.raises(FanMapError) as caught:
        FanMap.parse(overlay, underlay, host_reserve)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_slash30_slice_with_one_reserved_address_has_one_pod() -> None:
    fan = FanMap.parse("250.0.0.0/16", "172.30.0.0/18")
    assert (fan.slice_prefixlen, fan.capacity) == (30, 1)
    host = "172.30.0.5"
    assert fan.slice_for(host) == IPNetwork("250.0.0.20/30")
    assert fan.first_pod(host) == fan.last_pod(host) == IPAddress("250.0.0.22")


def test_class_e_and_shared_space_overlays_are_accepted() -> None:
    """Accepted, and mapped like any other overlay: host .5 gets the fifth slice."""
    for overlay, slice_ in (("240.0.0.0/4", "240.80.0.0/12"), ("240.0.0.0/8", "240.5.0.0/16"),
                            ("100.64.0.0/10", "100.65.64.0/18")):
        fan = FanMap.parse(overlay, "10.0.0.0/24")
        assert fan.overlay == IPNetwork(overlay)
        assert fan.slice_for("10.0.0.5") == IPNetwork(slice_)


def test_constructor_validates_too() -> None:
    with pytest.raises(FanMapError, match="overlaps underlay"):
        FanMap(IPNetwork("10.0.0.0/8"), IPNetwork("10.0.0.0/16"))
    with pytest.raises(FanMapError, match="overlay must be a netaddr.IPNetwork"):
        FanMap("250.0.0.0/8", IPNetwork("10.0.0.0/16"))  # type: ignore[arg-type]
    with pytest.raises(FanMapError, match="underlay fd00::/64 is IPv6"):
        FanMap(IPNetwork("250.0.0.0/8"), IPNetwork("fd00::/64"))


@pytest.mark.parametrize(
    "underlay, message",
    [
        ("172.30.0.0/16", "underlay 172.30.0.0/16 names the network, not a host; "
                          "give this host's address with the prefix, e.g. 172.30.0.1/16"),
        ("172.30.255.255/16", "host 172.30.255.255 is the broadcast address of underlay 172.30.0.0/16"),
    ],
)
def test_parse_host_refuses_network_and_broadcast(underlay: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        FanMap.parse_host("250.0.0.0/8", underlay)
    assert message in str(caught.value)


@pytest.fixture
def fan() -> FanMap:
    return FanMap.parse("250.0.0.0/8", "172.30.0.0/16")


@pytest.mark.parametrize(
    "host, message",
    [
        ("172.31.0.1", "host 172.31.0.1 is not in underlay 172.30.0.0/16"),
        ("172.30.0.0", "host 172.30.0.0 is the network address of underlay 172.30.0.0/16"),
        ("172.30.255.255", "host 172.30.255.255 is the broadcast address of underlay 172.30.0.0/16"),
        ("172.30.0", "host '172.30.0' is not an IPv4 address"),
        ("172.30.0.1/16", "host '172.30.0.1/16' is not an IPv4 address"),
        ("fd00::1", "host fd00::1 is IPv6"),
        (IPAddress("fd00::1"), "host fd00::1 is IPv6"),
        (2887647260, "host must be an IPv4 address, got 2887647260"),
    ],
)
def test_every_host_query_refuses_bad_hosts(fan: FanMap, host, message: str) -> None:
    queries = [
        fan.slice_for, fan.gateway_for, fan.first_pod, fan.last_pod, fan.reserved_for,
        lambda h: fan.pod_address(h, 0), lambda h: fan.pod_index(h, "250.0.28.2"),
    ]
    for query in queries:
        with pytest.raises(FanMapError) as caught:
            query(host)
        assert message in str(caught.value)


@pytest.mark.parametrize(
    "index, message",
    [
        (-1, "pod index -1 is out of range: a /24 slice holds 253 pods (indices 0 to 252)"),
        (253, "pod index 253 is out of range"),
        (1.0, "pod index must be a whole number, got 1.0"),
        (True, "pod index must be a whole number, got True"),
    ],
)
def test_pod_address_refuses_bad_index(fan: FanMap, index, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        fan.pod_address("172.30.0.28", index)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "address, message",
    [
        ("250.0.28.0", "250.0.28.0 is not a pod address: it is the network address of slice 250.0.28.0/24"),
        ("250.0.28.1", "250.0.28.1 is not a pod address: it is reserved for the host in slice 250.0.28.0/24"),
        ("250.0.28.255", "it is the broadcast address of slice 250.0.28.0/24"),
        ("250.0.29.2", "250.0.29.2 is not a pod address: it is not in slice 250.0.28.0/24"),
        ("x", "pod address 'x' is not an IPv4 address"),
    ],
)
def test_pod_index_refuses_non_pod_addresses(fan: FanMap, address: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        fan.pod_index("172.30.0.28", address)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "address, message",
    [
        ("251.0.0.1", "251.0.0.1 is not in overlay 250.0.0.0/8"),
        ("250.0.0.9", "250.0.0.9 maps to 172.30.0.0, the network address of underlay 172.30.0.0/16, so no host owns it"),
        ("250.255.255.1", "250.255.255.1 maps to 172.30.255.255, the broadcast address of underlay"),
        ("nope", "overlay address 'nope' is not an IPv4 address"),
        ("fd00::1", "overlay address fd00::1 is IPv6"),
    ],
)
def test_underlay_host_for_refuses(fan: FanMap, address: str, message: str) -> None:
    with pytest.raises(FanMapError) as caught:
        fan.underlay_host_for(address)
    assert message in str(caught.value)
