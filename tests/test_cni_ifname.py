"""One rule for interface names (cni_fan/cni/ifname.py), for CNI_IFNAME and the config's interface keys.

The unit part pins the rule (libcni's: 1 to 15 bytes, no '/', ':' or white
space, not '.' or '..'; and names the kernel would refuse). The kernel part
checks the rule against the kernel itself: every name it accepts can be
created, and the names it refuses for the kernel's sake cannot.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from cni_fan.cni import errors
from cni_fan.cni.errors import CniError
from cni_fan.cni.ifname import is_ifname
from cni_fan.cni.request import parse_request
from cni_fan.config import FanConfig, parse_ipam_config

ACCEPTED = ["eth0", "net1", "e", "a" * 15, "eth0.100", "veth-x_1", "net@1", "eth+0", "é" * 7, "€1", "eth\x01", "eth\x7f"]
REFUSED_BY_CNI = ["", ".", "..", "eth/0", "eth:0", "eth 0", " eth0", "eth0\n", "eth\t0", "eth\u00a00", "eth\u20280",
                  "eth\u30000", "eth\x85"]
# 16 bytes; byte 0xA0; a name template; not UTF-8; NUL
REFUSED_BY_THE_KERNEL = ["a" * 16, "é" * 8, "à", "eth%d", "x%1", "eth\udcff", "eth\x00"]


@pytest.mark.parametrize("name", ACCEPTED, ids=repr)
def test_names_the_rule_accepts(name: str) -> None:
    assert is_ifname(name)


@pytest.mark.parametrize("name", REFUSED_BY_CNI + REFUSED_BY_THE_KERNEL, ids=repr)
def test_names_the_rule_refuses(name: str) -> None:
    assert not is_ifname(name)


def _environ(ifname: str) -> dict[str, str]:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": ifname}


CONFIG = {"cniVersion": "1.1.0", "name": "fannet", "type": "fan", "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16"}


@pytest.mark.parametrize("name", ["net@1", "eth+0", "é" * 7])
def test_cni_ifname_and_the_config_keys_accept_the_same_names(name: str) -> None:
    """'@' used to pass as CNI_IFNAME but not as `bridge`: one rule now."""
    assert parse_request(_environ(name), json.dumps(CONFIG).encode()).ifname == name
    assert FanConfig.from_dict(dict(CONFIG, bridge=name, underlayInterface=name)).bridge == name
    ipam = {"type": "fan-ipam", "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16", "underlayInterface": name}
    assert parse_ipam_config({"name": "fannet", "ipam": ipam}).underlay_interface == name


@pytest.mark.parametrize("name", ["eth/0", "à", "a" * 16, "eth 0", "eth%d"], ids=repr)
def test_cni_ifname_and_the_config_keys_refuse_the_same_names(name: str) -> None:
    with pytest.raises(CniError) as info:
        parse_request(_environ(name), json.dumps(CONFIG).encode())
    assert info.value.code == errors.INVALID_ENVIRONMENT and "CNI_IFNAME" in info.value.msg
    for key in ("bridge", "underlayInterface"):
        with pytest.raises(CniError) as info:
            FanConfig.from_dict(dict(CONFIG, **{key: name}))
        assert info.value.code == errors.INVALID_CONFIG
        assert info.value.msg.startswith(f"{key}: {name!r} is not an interface name"), info.value.msg


@pytest.mark.kernel
def test_the_kernel_creates_every_accepted_name_and_refuses_the_kernels_refusals() -> None:
    """Names are tried as veths in a namespace of the test's own."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    from harness.netlab import Netns

    from pyroute2 import IPRoute

    ns = Netns("ifname")
    try:
        with contextlib.closing(IPRoute(netns=ns.name)) as ipr:
            for name in ACCEPTED:
                ipr.link("add", ifname=name, kind="veth", peer="ifname-peer")
                assert ipr.link_lookup(ifname=name), name
                ipr.link("del", ifname=name)
            for name in ["a" * 16, "é" * 8, "à", "x%1", "eth/0", "eth:0", "eth 0", "eth\t0", ".", ".."]:
                with pytest.raises((NetlinkError, ValueError, UnicodeEncodeError)):
                    ipr.link("add", ifname=name, kind="veth", peer="ifname-peer")
                assert not ipr.link_lookup(ifname=name), name
            # A template is no error to the kernel: it names the device itself.
            ipr.link("add", ifname="tpl%d", kind="veth", peer="ifname-peer")
            assert ipr.link_lookup(ifname="tpl0") and not ipr.link_lookup(ifname="tpl%d")
    finally:
        ns.delete()
