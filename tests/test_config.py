"""FanConfig / parse_ipam_config: defaults, every refusal (code 7, naming the
key), unknown-key warnings, and bridge names for every slice size.
"""
from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from harness.configs import refused

from cni_fan.cni import errors
from cni_fan.cni.errors import CniError
from cni_fan.config import (
    DEFAULT_AGENT_SOCKET,
    FanConfig,
    FanParams,
    RouteSpec,
    parse_ipam_config,
)
from cni_fan.fanmap import FanMap
from cni_fan.plan import bridge_name_for

BASE = {"cniVersion": "1.1.0", "name": "fannet", "type": "fan", "overlay": "250.0.0.0/8",
        "underlay": "172.30.0.0/16"}
IPAM_BASE = {"cniVersion": "1.1.0", "name": "fannet", "type": "fan",
             "ipam": {"type": "fan-ipam", "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16"}}
MISSING = object()


def with_(base: dict, **changes) -> dict:
    raw = dict(base)
    for key, value in changes.items():
        if value is MISSING:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.fixture
def warnings(caplog):
    """Warnings of cni_fan.config, even if a runner test turned propagation off."""
    logger = logging.getLogger("cni_fan")
    saved = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.WARNING, logger="cni_fan.config")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "cni_fan.config"]
    logger.propagate = saved


# -- defaults ---------------------------------------------------------------------


def test_defaults() -> None:
    cfg = FanConfig.from_dict(BASE)
    assert cfg.encap == "vxlan"
    assert cfg.encap_overhead == 50
    assert cfg.vni == int(IPAddress("250.0.0.0")) >> 8 == 0xFA0000
    assert cfg.vxlan_port == 4789
    assert cfg.ip_masq is True
    assert cfg.fanmap_mode == "bpf"
    assert cfg.neigh_suppress is True
    assert cfg.anti_spoof is True
    assert cfg.mtu is None
    assert cfg.bridge is None
    assert cfg.metrics_address == "127.0.0.1" and cfg.metrics_port == 9475
    assert cfg.dns == {}
    p = cfg.params
    assert p.network == "fannet"
    assert p.fanmap == FanMap.parse("250.0.0.0/8", "172.30.0.0/16", 1)
    assert cfg.fanmap is p.fanmap
    assert p.fanmap.host_reserve == 1
    assert p.underlay == "172.30.0.0/16"
    assert p.underlay_interface is None
    assert p.data_dir == "/run/cni-fan"
    assert p.state_dir == "/run/cni-fan/networks/fannet"
    assert p.agent_socket == DEFAULT_AGENT_SOCKET == "/run/cni-fan/plugin.sock"
    assert p.routes is None
    assert p.log_file is None and p.log_level == "info"


@pytest.mark.parametrize("overlay, vni", [("250.0.0.0/8", 0xFA0000), ("240.0.0.0/4", 0xF00000),
                                          ("241.16.0.0/16", 0xF11000), ("100.64.0.0/10", 0x644000)])
def test_default_vni_is_the_overlay_shifted_right_by_8(overlay: str, vni: int) -> None:
    assert FanConfig.from_dict(with_(BASE, overlay=overlay, underlay="198.18.0.0/24")).vni == vni


def test_every_setting_is_read() -> None:
    raw = with_(BASE, encap="ipip", mtu=1480, bridge="fanbr0", vni=42, vxlanPort=8472, ipMasq=False,
                fanmap="bpf", neighSuppress=False, antiSpoof=False, metricsAddress="0.0.0.0", metricsPort=9100,
                dns={"nameservers": ["10.96.0.10"]}, underlayInterface="ens3", hostReserve=3,
                dataDir="/var/lib/cni-fan/", agentSocket="/run/fan/agent.sock", logFile="/var/log/fan.log",
                logLevel="DEBUG", routes=[{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.1/8", "gw": "250.0.28.1"}])
    cfg = FanConfig.from_dict(raw)
    assert (cfg.encap, cfg.encap_overhead, cfg.mtu, cfg.bridge, cfg.vni, cfg.vxlan_port) == \
        ("ipip", 20, 1480, "fanbr0", 42, 8472)
    assert (cfg.ip_masq, cfg.fanmap_mode, cfg.neigh_suppress, cfg.anti_spoof) == (False, "bpf", False, False)
    assert (cfg.metrics_address, cfg.metrics_port, cfg.dns) == ("0.0.0.0", 9100, {"nameservers": ["10.96.0.10"]})
    p = cfg.params
    assert p.underlay_interface == "ens3"
    assert p.fanmap.host_reserve == 3
    assert p.data_dir == "/var/lib/cni-fan"  # trailing slash dropped
    assert p.agent_socket == "/run/fan/agent.sock"
    assert p.log_file == "/var/log/fan.log"
    assert p.log_level == "debug"
    assert p.routes == (RouteSpec(dst="0.0.0.0/0"), RouteSpec(dst="10.0.0.0/8", gw="250.0.28.1"))


def test_explicit_null_means_the_default_for_optional_numbers() -> None:
    cfg = FanConfig.from_dict(with_(BASE, mtu=None, routes=None, dns=None))
    assert cfg.mtu is None and cfg.params.routes is None and cfg.dns == {}


def test_empty_routes_list_means_no_routes() -> None:
    assert FanConfig.from_dict(with_(BASE, routes=[])).params.routes == ()


def test_underlay_may_carry_a_host_address() -> None:
    cfg = FanConfig.from_dict(with_(BASE, underlay="172.30.0.28/16"))
    assert cfg.fanmap.underlay == IPNetwork("172.30.0.0/16")


# -- refusals: code 7, naming the key --------------------------------------------------

BAD_VALUES = {
    "name": [MISSING, "", 5, None, ["fannet"]],
    "overlay": [MISSING, None, 5, "", "250.0.0.0", "250.1.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "fd00::/8",
                "banana/8", "250.0.0.0/33", ["250.0.0.0/8"], "250.0.0.0/8\x00"],
    "underlay": [MISSING, None, 5, "", "172.30.0.0", "172.30.0.0/31", "10.0.0.0/32", "x/16", "250.1.0.0/16",
                 "::/0"],
    "hostReserve": [0, -1, True, False, "1", 1.5, 1 << 25, 254, None],
    "dataDir": ["", "run/cni-fan", "./x", "/run/../etc", "/run/cni-fan/..", 5, False, [], "/run\x00x", None],
    "agentSocket": ["", "plugin.sock", "/run/../plugin.sock", 5, None],
    "logFile": ["", "fan.log", "/var/log/../../etc/passwd", 5, True],
    "logLevel": ["verbose", "trace", "", 5, True],
    "underlayInterface": ["", "a" * 16, "eth/0", "eth:0", ".", "..", "eth 0", "eth0\n", "\teth0", 5],
    "encap": ["gre", "", "VXLAN", 5, None, ["vxlan"], "geneve"],
    "mtu": [575, 0, -1, 65536, "1450", True, 1450.0],
    "bridge": ["", "a" * 16, "br/0", "br:0", ".", "..", "br 0", "br0\n", 5, True],
    "vni": [0, -1, 1 << 24, "42", True, 4.2],
    "vxlanPort": [0, -1, 65536, "4789", True, 4789.0],
    "ipMasq": ["true", 1, 0, None, "yes"],
    "neighSuppress": ["false", 0, None],
    "antiSpoof": ["no", 1, None],
    "fanmap": ["nft", "", "BPF", 5, None],
    "metricsPort": [0, 65536, "9475", False],
    "metricsAddress": ["", 5, ["127.0.0.1"]],
    "routes": ["0.0.0.0/0", {"dst": "0.0.0.0/0"}, [5], [None], [{"gw": "250.0.28.1"}], [{"dst": 5}],
               [{"dst": "x"}], [{"dst": "::/0"}], [{"dst": "0.0.0.0/0", "gw": "x"}],
               [{"dst": "0.0.0.0/0", "gw": "::1"}], [{"dst": "0.0.0.0/0", "gw": 5}],
               [{"dst": "0.0.0.0/0", "gw": True}], [{"dst": "0.0.0.0/0", "gw": ["250.0.28.1"]}]],
    "dns": ["8.8.8.8", ["8.8.8.8"], 5, True, [], False, ""],
}
CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


def _id(case) -> str:
    key, value = case
    return f"{key}={'<missing>' if value is MISSING else repr(value)[:30]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_every_invalid_value_is_refused_naming_the_key(case) -> None:
    key, value = case
    err = refused(with_(BASE, **{key: value}))
    # The key is named in the message (hostReserve's pod-room check is reported
    # by the fan map with the key in the details).
    assert key in err.msg or (key == "hostReserve" and key in str(err)), str(err)


def test_the_message_carries_the_offending_value() -> None:
    err = refused(with_(BASE, vxlanPort=99999))
    assert "vxlanPort" in err.msg and "99999" in err.details


def test_overlay_overlapping_underlay_names_both() -> None:
    err = refused(with_(BASE, overlay="172.0.0.0/8"))
    assert "overlay" in err.msg and "underlay" in err.msg


def test_slices_longer_than_30_are_refused() -> None:
    err = refused(with_(BASE, overlay="250.0.0.0/16", underlay="172.30.0.0/16"))
    assert "overlay" in err.msg


@pytest.mark.parametrize("path", ["/", "/run", "/a/b/c", "/run/cni-fan/", "/a..b/c", "/a/.../b"])
def test_acceptable_paths(path: str) -> None:
    cfg = FanConfig.from_dict(with_(BASE, dataDir=path))
    assert cfg.params.data_dir == (path.rstrip("/") or "/")


@pytest.mark.parametrize("name", ["fanbr0", "f", "a" * 15, "fan-250-0-28", "br.100", "br_x"])
def test_acceptable_bridge_names(name: str) -> None:
    assert FanConfig.from_dict(with_(BASE, bridge=name)).bridge == name


# What each key becomes in the parsed config.
PARSED = {"mtu": lambda c: c.mtu, "vni": lambda c: c.vni, "vxlanPort": lambda c: c.vxlan_port,
          "metricsPort": lambda c: c.metrics_port, "hostReserve": lambda c: c.fanmap.host_reserve}


@pytest.mark.parametrize("key, lo, hi", [("mtu", 576, 65535), ("vni", 1, (1 << 24) - 1), ("vxlanPort", 1, 65535),
                                         ("metricsPort", 1, 65535), ("hostReserve", 1, 253)])
def test_integer_bounds_are_inclusive(key: str, lo: int, hi: int) -> None:
    """Both bounds are taken as given; one step past either is code 7 naming the key
    (a host reserve that leaves no pod address is named in words, with the slice)."""
    for value in (lo, hi):
        assert PARSED[key](FanConfig.from_dict(with_(BASE, **{key: value}))) == value
    for value in (lo - 1, hi + 1):
        with pytest.raises(CniError) as caught:
            FanConfig.from_dict(with_(BASE, **{key: value}))
        named = key in caught.value.msg or (key == "hostReserve" and f"host reserve {value}" in caught.value.msg)
        assert caught.value.code == errors.INVALID_CONFIG and named, caught.value.msg


# -- unknown keys: a warning, never an error --------------------------------------------


def test_unknown_keys_only_warn(warnings) -> None:
    cfg = FanConfig.from_dict(with_(BASE, ovelray="250.0.0.0/8", ipmasq=False, zzz=1))
    assert cfg.ip_masq is True  # the typo did not take effect ...
    messages = warnings()
    assert len(messages) == 3  # ... but each one was reported
    assert any("ovelray" in m for m in messages)
    assert any("ipmasq" in m for m in messages)
    assert any("zzz" in m for m in messages)


def test_runtime_and_known_keys_do_not_warn(warnings) -> None:
    raw = with_(BASE, ipam={"type": "x"}, dns={}, args={"cni": {}}, prevResult={"ips": []},
                runtimeConfig={"portMappings": []}, capabilities={"portMappings": True}, disableCheck=True,
                disableGC=False, cniVersions=["1.0.0", "1.1.0"], mtu=1450, bridge="fanbr0", vni=7,
                vxlanPort=4789, ipMasq=True, fanmap="bpf", neighSuppress=True, antiSpoof=True, logLevel="info",
                metricsPort=9475, metricsAddress="127.0.0.1", confDir="/etc/cni/net.d", routes=[], encap="vxlan",
                hostReserve=1, dataDir="/run/cni-fan", agentSocket="/run/cni-fan/plugin.sock",
                underlayInterface="eth0", logFile="/tmp/fan.log")
    FanConfig.from_dict(raw)
    assert warnings() == []


def test_gc_attachment_keys_added_by_the_runtime_do_not_warn(warnings) -> None:
    # SPEC 1.1.0 GC: the runtime adds cni.dev/valid-attachments (libcni also
    # sets the older cni.dev/attachments) to the plugin's config.
    attachments = [{"containerID": "c0ffee", "ifname": "eth0"}]
    FanConfig.from_dict(with_(BASE, **{"cni.dev/valid-attachments": attachments, "cni.dev/attachments": attachments}))
    parse_ipam_config(with_(IPAM_BASE, **{"cni.dev/valid-attachments": attachments}))
    assert warnings() == []


# -- parse_ipam_config ---------------------------------------------------------------------


def test_ipam_config_defaults() -> None:
    p = parse_ipam_config(IPAM_BASE)
    assert isinstance(p, FanParams)
    assert p.network == "fannet"
    assert p.fanmap == FanMap.parse("250.0.0.0/8", "172.30.0.0/16")
    assert p.data_dir == "/run/cni-fan" and p.state_dir == "/run/cni-fan/networks/fannet"
    assert p.agent_socket == "/run/cni-fan/plugin.sock"
    assert p.routes is None and p.underlay_interface is None and p.log_level == "info"


def test_ipam_config_reads_its_own_object_only() -> None:
    raw = with_(IPAM_BASE, overlay="241.0.0.0/8", dataDir="/elsewhere")
    raw["ipam"] = dict(IPAM_BASE["ipam"], hostReserve=2, dataDir="/var/lib/fan", routes=[{"dst": "0.0.0.0/0"}],
                       logLevel="warning")
    p = parse_ipam_config(raw)
    assert p.fanmap.overlay == IPNetwork("250.0.0.0/8")
    assert p.fanmap.host_reserve == 2
    assert p.data_dir == "/var/lib/fan"
    assert p.routes == (RouteSpec(dst="0.0.0.0/0"),)
    assert p.log_level == "warning"


@pytest.mark.parametrize("ipam", [MISSING, None, "fan-ipam", [], 5])
def test_ipam_object_is_required(ipam) -> None:
    err = refused(with_(IPAM_BASE, ipam=ipam), parse_ipam_config)
    assert "ipam" in err.msg


@pytest.mark.parametrize("name", [MISSING, "", None, 5])
def test_ipam_config_needs_a_name(name) -> None:
    assert "name" in refused(with_(IPAM_BASE, name=name), parse_ipam_config).msg


@pytest.mark.parametrize("key, value", [("overlay", MISSING), ("overlay", "250.1.0.0/8"), ("underlay", MISSING),
                                        ("underlay", 5), ("hostReserve", 0), ("dataDir", "rel"),
                                        ("agentSocket", ""), ("routes", "x"), ("logLevel", "loud"),
                                        ("underlayInterface", "a" * 16), ("logFile", "x.log")])
def test_ipam_errors_name_the_key_under_ipam(key: str, value) -> None:
    raw = dict(IPAM_BASE)
    raw["ipam"] = with_(IPAM_BASE["ipam"], **{key: value})
    err = refused(raw, parse_ipam_config)
    assert f"ipam.{key}" in err.msg or (key in ("overlay", "underlay") and "ipam.overlay/underlay" in err.msg)


def test_ipam_unknown_keys_warn_with_the_ipam_prefix(warnings) -> None:
    raw = dict(IPAM_BASE)
    raw["ipam"] = dict(IPAM_BASE["ipam"], subnet="10.0.0.0/24", encap="vxlan")
    parse_ipam_config(raw)
    messages = warnings()
    assert any("ipam.subnet" in m for m in messages)
    assert any("ipam.encap" in m for m in messages)  # a plugin key, not an IPAM one


def test_plugin_and_ipam_agree_on_the_fan() -> None:
    raw = with_(BASE, ipam={"type": "fan-ipam", "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16"})
    assert FanConfig.from_dict(raw).fanmap == parse_ipam_config(raw).fanmap


# -- bridge names ---------------------------------------------------------------------------


@pytest.mark.parametrize("slice_net, name", [
    ("250.0.28.0/24", "fan-250-0-28"),
    ("250.255.255.0/24", "fan-250-255-255"),
    ("250.28.0.0/16", "fan-250-28"),
    ("250.0.16.0/20", "fan-250-0-16"),
    ("250.0.240.0/20", "fan-250-0-240"),
    ("250.0.28.16/28", "fan-250-0-28-16"),
    ("241.1.2.16/28", "fan-241-1-2-16"),
    ("250.255.255.240/28", "fan-fafffff0"),
    ("250.0.0.0/8", "fan-250"),
    ("250.128.0.0/9", "fan-250-128"),
    ("250.1.2.4/30", "fan-250-1-2-4"),
])
def test_bridge_name_for_slices(slice_net: str, name: str) -> None:
    assert bridge_name_for(IPNetwork(slice_net)) == name
    assert len(name) <= 15


def test_bridge_names_of_the_fan_examples() -> None:
    fan = FanMap.parse("250.0.0.0/8", "172.30.0.0/16")
    assert bridge_name_for(fan.slice_for("172.30.0.28")) == "fan-250-0-28"
    fan = FanMap.parse("250.0.0.0/8", "10.0.0.0/12")  # /28 slices
    names = {bridge_name_for(fan.slice_for(IPAddress(int(IPAddress("10.0.0.0")) + off)))
             for off in range(1, 4096)}
    assert len(names) == 4095 and all(len(n) <= 15 for n in names)


def test_every_slice_of_a_small_fan_gets_a_distinct_name() -> None:
    fan = FanMap.parse("250.0.0.0/20", "10.1.1.0/24")  # 254 hosts, /28 slices
    names = [bridge_name_for(fan.slice_for(IPAddress(int(IPAddress("10.1.1.0")) + off))) for off in range(1, 255)]
    assert len(set(names)) == 254
    assert all(n.startswith("fan-") and len(n) <= 15 for n in names)


@st.composite
def _fan_and_hosts(draw):
    overlay_len = draw(st.integers(4, 28))
    underlay_len = draw(st.integers(max(8, overlay_len + 2), 30))
    first = draw(st.integers(240, 255))
    overlay = IPNetwork(f"{first}.{draw(st.integers(0, 255))}.{draw(st.integers(0, 255))}.0/{overlay_len}").cidr
    underlay = IPNetwork(f"10.{draw(st.integers(0, 255))}.{draw(st.integers(0, 255))}.0/{underlay_len}").cidr
    fan = FanMap(overlay, underlay, 1)
    hosts = draw(st.sets(st.integers(1, (1 << (32 - underlay_len)) - 2), min_size=1, max_size=6))
    return fan, [IPAddress(underlay.first + h) for h in hosts]


@settings(max_examples=300, deadline=None)
@given(_fan_and_hosts())
def test_property_bridge_names_fit_ifnamsiz_and_are_distinct(fan_hosts) -> None:
    fan, hosts = fan_hosts
    slices = [fan.slice_for(h) for h in hosts]
    names = [bridge_name_for(s) for s in slices]
    for name in names:
        assert len(name) <= 15
        assert name.startswith("fan-")
        assert all(c.isalnum() or c == "-" for c in name)
    assert len(set(names)) == len(set(slices)) == len(hosts)


def test_routes_fanmap_is_read_with_vxlan_and_refused_with_ipip() -> None:
    assert FanConfig.from_dict(with_(BASE, fanmap="routes")).fanmap_mode == "routes"
    with pytest.raises(CniError) as err:
        FanConfig.from_dict(with_(BASE, fanmap="routes", encap="ipip"))
    assert err.value.code == 7 and "fanmap" in err.value.msg and "vxlan" in err.value.msg
