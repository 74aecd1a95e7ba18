"""Address and CIDR keys are taken exactly as written: no whitespace around them.

netaddr parses "241.0.0.0/8\\n" (it reads past trailing whitespace) and the
fan map used to strip its input, so a conflist written by a template with a
stray newline was accepted. Every address/CIDR key of the `fan` config and
of `fan-ipam`'s `ipam` object now goes through the same exact-form check as
the interface-name keys (`bridge`, `underlayInterface`): code 7, the key
named, the value shown with repr() so the invisible character is visible.

The unit part needs nothing; the kernel part runs the real `fan` and
`fan-ipam` executables on a fake node (harness/podlab.py's Lab) and
checks that nothing changes on the node.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_fan.cni.errors import INVALID_CONFIG
from cni_fan.config import FanConfig, parse_ipam_config
from harness.podlab import module_lab
from harness.system import run
from harness.configs import refused

BASE = {"cniVersion": "1.1.0", "name": "fannet", "type": "fan", "overlay": "250.0.0.0/8",
        "underlay": "172.30.0.0/16"}
IPAM_BASE = {"cniVersion": "1.1.0", "name": "fannet", "type": "bridge",
             "ipam": {"type": "fan-ipam", "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16"}}

SURROUNDED = ["{}\n", "{}\r\n", "{}\r", "{} ", " {}", "\t{}", "{}\t", "\n{}", "{}\n\n", "{}\x0b", "{}\x0c",
              "{}\u00a0", "{}\u2028"]


def _variants(good: str) -> list[str]:
    return [form.format(good) for form in SURROUNDED]


def _fan_with(key: str, value) -> dict:
    return dict(BASE, **{key: value})


def _ipam_with(key: str, value) -> dict:
    return dict(IPAM_BASE, ipam=dict(IPAM_BASE["ipam"], **{key: value}))


CIDR_KEYS = {"overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16"}


@pytest.mark.parametrize("key", sorted(CIDR_KEYS))
@pytest.mark.parametrize("form", SURROUNDED, ids=repr)
def test_cidr_keys_with_whitespace_are_refused(key: str, form: str) -> None:
    value = form.format(CIDR_KEYS[key])
    for parse, raw, named in ((FanConfig.from_dict, _fan_with(key, value), key),
                              (parse_ipam_config, _ipam_with(key, value), f"ipam.{key}")):
        err = refused(raw, parse)
        assert named in err.msg and repr(value) in err.msg, err.msg


@pytest.mark.parametrize("value", _variants("0.0.0.0/0") + ["0.0.0.0/0/0", "0.0.0.0 /0", "0.0.0.0/00x"], ids=repr)
def test_route_dst_with_whitespace_is_refused(value: str) -> None:
    routes = [{"dst": "10.0.0.0/8"}, {"dst": value}]
    for parse, raw, named in ((FanConfig.from_dict, _fan_with("routes", routes), "routes[1].dst"),
                              (parse_ipam_config, _ipam_with("routes", routes), "ipam.routes[1].dst")):
        err = refused(raw, parse)
        assert named in err.msg and repr(value) in err.msg, err.msg


@pytest.mark.parametrize("value", _variants("250.0.28.1"), ids=repr)
def test_route_gw_with_whitespace_is_refused(value: str) -> None:
    routes = [{"dst": "0.0.0.0/0", "gw": value}]
    for parse, raw, named in ((FanConfig.from_dict, _fan_with("routes", routes), "routes[0].gw"),
                              (parse_ipam_config, _ipam_with("routes", routes), "ipam.routes[0].gw")):
        err = refused(raw, parse)
        assert named in err.msg and repr(value) in err.msg, err.msg


@pytest.mark.parametrize("value", _variants("127.0.0.1") + ["localhost", "127.0.0.256", "::1"], ids=repr)
def test_metrics_address_must_be_an_address(value: str) -> None:
    err = refused(_fan_with("metricsAddress", value))
    assert "metricsAddress" in err.msg and repr(value) in err.msg, err.msg


@pytest.mark.parametrize("key, value", [("bridge", "br0\n"), ("underlayInterface", "eth0 ")])
def test_interface_names_share_the_same_check(key: str, value: str) -> None:
    """The earlier fix for `bridge` and the new one are one validator: same message shape."""
    err = refused(_fan_with(key, value))
    assert err.msg.startswith(f"{key}: {value!r} is not ")


@pytest.mark.parametrize("key, value", [
    ("overlay", "250.000.0.0/8"), ("overlay", "250.0.0.0/08"), ("overlay", "250.0.0.0/255.0.0.0"),
    ("overlay", "0xfa.0.0.0/8"), ("underlay", "172.30/16"), ("underlay", "١٧٢.30.0.0/16"),
])
def test_ambiguous_spellings_are_refused(key: str, value: str) -> None:
    """Leading zeros (octal elsewhere), netmask or hex forms, non-ASCII digits: one spelling only."""
    err = refused(_fan_with(key, value))
    assert key in err.msg and repr(value) in err.msg


@pytest.mark.parametrize("changes", [
    {"overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16"},
    {"overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16", "metricsAddress": "0.0.0.0"},
    {"routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "250.0.28.1"}, {"dst": "10.1.2.3/8", "gw": ""}]},
])
def test_exact_values_are_still_accepted(changes: dict) -> None:
    cfg = FanConfig.from_dict(dict(BASE, **changes))
    ipam = parse_ipam_config(dict(IPAM_BASE, ipam=dict(IPAM_BASE["ipam"],
                                                      **{k: v for k, v in changes.items() if k != "metricsAddress"})))
    assert cfg.params == ipam


# == the real executables on a fake node ====================================================

lab = module_lab("exact")


def _node_state(lab) -> dict:
    return {"links": lab.ip("-d", "link", "show").stdout, "addrs": lab.ip("addr", "show").stdout,
            "routes": lab.ip("route", "show", "table", "all").stdout,
            "files": sorted(str(p) for p in Path(lab.data).rglob("*")) if Path(lab.data).exists() else []}


@pytest.mark.kernel
@pytest.mark.parametrize("plugin", ["fan", "fan-ipam"])
@pytest.mark.parametrize("server", [False, True], ids=["standalone", "server"])
@pytest.mark.parametrize("key, value", [("overlay", "241.0.0.0/8\n"), ("underlay", "198.18.0.0/16\n"),
                                        ("underlay", " 198.18.0.0/16")])
def test_add_with_a_trailing_newline_is_a_config_error_and_changes_nothing(lab, plugin: str, server: bool,
                                                                           key: str, value: str) -> None:
    [pod] = lab.new_pods(1)
    try:
        conf = lab.conf()
        if plugin == "fan-ipam":
            params = {k: conf.pop(k) for k in ("overlay", "underlay", "dataDir")}
            conf = dict(conf, type="bridge", ipam={"type": "fan-ipam", **params})
        (conf if plugin == "fan" else conf["ipam"])[key] = value
        before = _node_state(lab)
        pod_links = run_ip_links(pod.name)
        outcome = lab.call("ADD", pod.cid, pod.path, conf, plugin=plugin, server=server)
        assert outcome.code != 0, outcome
        err = json.loads(outcome.stdout)  # exactly one JSON object on stdout
        assert err["code"] == INVALID_CONFIG, outcome
        named = key if plugin == "fan" else f"ipam.{key}"
        assert named in err["msg"] and repr(value) in err["msg"], err
        assert "Traceback" not in outcome.stderr
        assert _node_state(lab) == before
        assert run_ip_links(pod.name) == pod_links
    finally:
        lab.delete_netns([pod])


def run_ip_links(netns: str) -> str:
    return run(["ip", "-n", netns, "link", "show"]).stdout


def test_a_route_destination_listed_twice_is_refused() -> None:
    """The pod can hold one route per destination: the second would fail at ADD, after the veth is made."""
    routes = [{"dst": "10.0.0.0/8"}, {"dst": "10.1.0.0/8", "gw": "250.0.28.1"}]  # the same network, spelled twice
    for parse, raw, named in ((FanConfig.from_dict, _fan_with("routes", routes), "routes[1].dst"),
                              (parse_ipam_config, _ipam_with("routes", routes), "ipam.routes[1].dst")):
        err = refused(raw, parse)
        assert named in err.msg and "10.0.0.0/8" in err.msg, err.msg
