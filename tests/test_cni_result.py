"""CNI results in every spec version's shape, and prevResult parsing.

0.3.x and 0.4.0 ips carry "version": "4"; 1.0.0 drops it; an interface's
mtu exists only from 1.1.0. A prevResult of any version reads back into the
same internal shape, and anything that is not a result is code 6.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_fan.cni import errors
from cni_fan.cni.errors import CniError
from cni_fan.cni.result import Interface, IPConfig, Result, Route, parse_result

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
OLD_VERSIONS = ["0.3.0", "0.3.1", "0.4.0"]

PLUGIN_RESULT = Result(
    interfaces=(
        Interface(name="fan-250-0-28", mac="0a:58:fa:00:1c:01", mtu=1450),
        Interface(name="veth1a2b3c4d", mac="2e:11:22:33:44:55", mtu=1450),
        Interface(name="eth0", mac="0a:58:fa:00:1c:02", mtu=1450, sandbox="/var/run/netns/cni-1"),
    ),
    ips=(IPConfig(address="250.0.28.2/24", gateway="250.0.28.1", interface=2),),
    routes=(Route(dst="0.0.0.0/0", gw="250.0.28.1"), Route(dst="250.0.0.0/8")),
    dns={"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]},
)
IPAM_RESULT = Result(
    ips=(IPConfig(address="250.0.28.7/24", gateway="250.0.28.1"),),
    routes=(Route(dst="0.0.0.0/0", gw="250.0.28.1"),),
)


# -- shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_old_versions_tag_ips_with_version_4(version: str) -> None:
    out = PLUGIN_RESULT.to_dict(version)
    assert out == {
        "cniVersion": version,
        "interfaces": [
            {"name": "fan-250-0-28", "mac": "0a:58:fa:00:1c:01"},
            {"name": "veth1a2b3c4d", "mac": "2e:11:22:33:44:55"},
            {"name": "eth0", "mac": "0a:58:fa:00:1c:02", "sandbox": "/var/run/netns/cni-1"},
        ],
        "ips": [{"address": "250.0.28.2/24", "version": "4", "gateway": "250.0.28.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "250.0.28.1"}, {"dst": "250.0.0.0/8"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]},
    }


def test_1_0_0_drops_the_ip_version_and_has_no_mtu() -> None:
    out = PLUGIN_RESULT.to_dict("1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"] == [{"address": "250.0.28.2/24", "gateway": "250.0.28.1", "interface": 2}]
    assert all("mtu" not in i for i in out["interfaces"])
    assert out["interfaces"][2] == {"name": "eth0", "mac": "0a:58:fa:00:1c:02", "sandbox": "/var/run/netns/cni-1"}


def test_1_1_0_adds_the_interface_mtu() -> None:
    out = PLUGIN_RESULT.to_dict("1.1.0")
    assert out["cniVersion"] == "1.1.0"
    assert [i["mtu"] for i in out["interfaces"]] == [1450, 1450, 1450]
    assert all("version" not in ip for ip in out["ips"])
    assert out["interfaces"][2] == {"name": "eth0", "mac": "0a:58:fa:00:1c:02", "mtu": 1450,
                                    "sandbox": "/var/run/netns/cni-1"}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_every_version_has_the_common_keys_and_is_json(version: str) -> None:
    out = PLUGIN_RESULT.to_dict(version)
    assert set(out) == {"cniVersion", "interfaces", "ips", "routes", "dns"}
    assert json.loads(json.dumps(out)) == out
    # The interface index points into interfaces (the spec's rule).
    for ip in out["ips"]:
        assert 0 <= ip["interface"] < len(out["interfaces"])
    for ip in out["ips"]:
        assert "/" in ip["address"]  # CIDR form


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_ipam_result_has_no_interfaces(version: str) -> None:
    out = IPAM_RESULT.to_dict(version)
    assert "interfaces" not in out
    ip = out["ips"][0]
    assert "interface" not in ip
    assert ip["address"] == "250.0.28.7/24" and ip["gateway"] == "250.0.28.1"
    assert ("version" in ip) == (version in OLD_VERSIONS)
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "250.0.28.1"}]
    assert out["dns"] == {}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_empty_result(version: str) -> None:
    assert Result().to_dict(version) == {"cniVersion": version, "ips": [], "dns": {}}


def test_interface_index_zero_is_kept() -> None:
    out = Result(interfaces=(Interface(name="eth0"),), ips=(IPConfig(address="250.0.28.2/24", interface=0),))
    assert out.to_dict("1.0.0")["ips"][0]["interface"] == 0


def test_to_dict_does_not_share_the_dns_object() -> None:
    r = Result(dns={"nameservers": ["1.1.1.1"]})
    r.to_dict("1.1.0")["dns"]["x"] = 1
    assert r.dns == {"nameservers": ["1.1.1.1"]}


# -- prevResult ------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("result", [PLUGIN_RESULT, IPAM_RESULT, Result()], ids=["plugin", "ipam", "empty"])
def test_prev_result_of_every_version_round_trips(version: str, result: Result) -> None:
    dumped = result.to_dict(version)
    parsed = parse_result(json.loads(json.dumps(dumped)))
    assert parsed.to_dict(version) == dumped


def test_1_1_0_prev_result_keeps_everything() -> None:
    assert parse_result(PLUGIN_RESULT.to_dict("1.1.0")) == PLUGIN_RESULT


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_older_prev_result_converts_up_to_1_1_0(version: str) -> None:
    parsed = parse_result(PLUGIN_RESULT.to_dict(version))
    out = parsed.to_dict("1.1.0")
    assert all("version" not in ip for ip in out["ips"])
    assert all("mtu" not in i for i in out["interfaces"])  # unknown, so absent
    assert out["ips"] == PLUGIN_RESULT.to_dict("1.1.0")["ips"]


def test_newer_prev_result_converts_down_to_0_3_1() -> None:
    out = parse_result(PLUGIN_RESULT.to_dict("1.1.0")).to_dict("0.3.1")
    assert out == PLUGIN_RESULT.to_dict("0.3.1")


def test_prev_result_from_a_reference_plugin() -> None:
    # The bridge plugin's 1.0.0 result, as a runtime hands it to the next plugin.
    raw = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "vethabc", "mac": "11:22:33:44:55:66"},
                       {"name": "eth0", "mac": "66:55:44:33:22:11", "sandbox": "/proc/42/ns/net"}],
        "ips": [{"interface": 2, "address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    r = parse_result(raw)
    assert r.interfaces[2] == Interface(name="eth0", mac="66:55:44:33:22:11", sandbox="/proc/42/ns/net")
    assert r.ips == (IPConfig(address="10.1.0.5/16", gateway="10.1.0.1", interface=2),)
    assert r.routes == (Route(dst="0.0.0.0/0"),)


def test_prev_result_tolerates_nulls_and_unknown_keys() -> None:
    raw = {"cniVersion": "1.1.0", "interfaces": None, "ips": [{"address": "250.0.28.2/24", "interface": None,
                                                                 "future": True}],
           "routes": None, "dns": None, "extra": {"x": 1}}
    r = parse_result(raw)
    assert r.ips == (IPConfig(address="250.0.28.2/24"),)
    assert r.interfaces == () and r.routes == () and r.dns == {}


@pytest.mark.parametrize("raw", [
    None, [], "result", 5, True,
    {"interfaces": "eth0"},
    {"interfaces": {"name": "eth0"}},
    {"interfaces": ["eth0"]},
    {"interfaces": [{"mac": "aa:bb:cc:dd:ee:ff"}]},
    {"interfaces": [{"name": "eth0", "mtu": "big"}]},
    {"interfaces": [{"name": "eth0", "mtu": [1500]}]},
    {"interfaces": [{"name": "eth0", "mtu": float("inf")}]},
    {"interfaces": [{"name": "eth0", "mtu": float("nan")}]},
    {"ips": "250.0.28.2/24"},
    {"ips": [None]},
    {"ips": [{"gateway": "250.0.28.1"}]},
    {"ips": [{"address": "250.0.28.2/24", "interface": "eth0"}]},
    {"ips": [{"address": "250.0.28.2/24", "interface": {"i": 1}}]},
    {"ips": [{"address": "250.0.28.2/24", "interface": float("inf")}]},
    {"routes": [{"gw": "250.0.28.1"}]},
    {"routes": [[]]},
    {"routes": 1},
], ids=lambda raw: json.dumps(raw, allow_nan=True)[:60])
def test_malformed_prev_result_is_a_decode_failure(raw) -> None:
    with pytest.raises(CniError) as info:
        parse_result(raw)
    assert info.value.code == errors.DECODE_FAILURE
    assert "prevResult" in info.value.msg


def test_malformed_prev_result_from_json_text_with_infinity() -> None:
    # Python's json accepts Infinity/NaN, so a runtime's prevResult may hold them.
    raw = json.loads('{"interfaces": [{"name": "eth0", "mtu": Infinity}]}')
    with pytest.raises(CniError) as info:
        parse_result(raw)
    assert info.value.code == errors.DECODE_FAILURE


# -- properties -------------------------------------------------------------------

_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=15)
_mac = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
_ipv4 = st.integers(1, 2**32 - 2).map(lambda v: ".".join(str((v >> s) & 255) for s in (24, 16, 8, 0)))
_cidr = st.tuples(_ipv4, st.integers(1, 32)).map(lambda t: f"{t[0]}/{t[1]}")


@st.composite
def _results(draw) -> Result:
    interfaces = tuple(draw(st.lists(st.builds(
        Interface, name=_name, mac=st.one_of(st.just(""), _mac), mtu=st.one_of(st.just(0), st.integers(576, 65535)),
        sandbox=st.one_of(st.just(""), st.just("/var/run/netns/x"))), max_size=3)))
    index = st.none() if not interfaces else st.one_of(st.none(), st.integers(0, len(interfaces) - 1))
    ips = tuple(draw(st.lists(st.builds(IPConfig, address=_cidr, gateway=st.one_of(st.just(""), _ipv4),
                                        interface=index), max_size=3)))
    routes = tuple(draw(st.lists(st.builds(Route, dst=_cidr, gw=st.one_of(st.just(""), _ipv4)), max_size=3)))
    dns = draw(st.one_of(st.just({}), st.fixed_dictionaries({"nameservers": st.lists(_ipv4, max_size=2)})))
    return Result(interfaces=interfaces, ips=ips, routes=routes, dns=dns)


@settings(max_examples=150, deadline=None)
@given(result=_results(), version=st.sampled_from(ALL_VERSIONS), target=st.sampled_from(ALL_VERSIONS))
def test_property_round_trip_through_json(result: Result, version: str, target: str) -> None:
    dumped = json.loads(json.dumps(result.to_dict(version)))
    parsed = parse_result(dumped)
    assert parsed.to_dict(version) == dumped
    if version == "1.1.0":
        assert parsed == result
    # Converting on to any version gives what converting the original would.
    expected = result.to_dict(target)
    got = parsed.to_dict(target)
    if version != "1.1.0" and target == "1.1.0":  # the mtu was lost on the way through the old version
        for i in expected.get("interfaces", []):
            i.pop("mtu", None)
    assert got == expected
