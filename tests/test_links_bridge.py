"""links.ensure_bridge on nodes whose defaults get in the way of a dual-stack bridge."""
from __future__ import annotations

import errno
import socket

import pytest

from cni_fan.net import errors, links
from cni_fan.net.netns import rtnl_in
from cni_fan.net.rtnl import AF_INET6, IFADDRMSG, Reply
from harness.netlab import Netns
from harness.system import inside


GATEWAYS = [("241.1.10.1", 24), ("fd00:241:0:10a::1", 64)]


@pytest.fixture
def node():
    ns = Netns("brv6")
    try:
        yield ns
    finally:
        ns.delete()


def _addresses(ns: Netns, name: str) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for link in ns.ip_json("addr", "show", "dev", name)
            for a in link.get("addr_info", [])}


@pytest.mark.kernel
def test_a_node_with_ipv6_off_by_default_still_gets_its_ipv6_gateway(node: Netns) -> None:
    """`net.ipv6.conf.default.disable_ipv6=1`: the new bridge inherits it and refuses IPv6
    addresses (EACCES); ensure_bridge turns IPv6 on for its own bridge and goes on."""
    node.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    with inside(node.path), rtnl_in(node.path, {}) as sock:
        links.ensure_bridge(sock, "fanbr6", GATEWAYS, 1450)
    assert {"241.1.10.1/24", "fd00:241:0:10a::1/64"} <= _addresses(node, "fanbr6")
    assert node.run("sysctl", "-n", "net.ipv6.conf.fanbr6.disable_ipv6").stdout.strip() == "0"
    assert node.run("sysctl", "-n", "net.ipv6.conf.default.disable_ipv6").stdout.strip() == "1", "left alone"


class _RefusingIPv6:
    """Stands in for a kernel booted with `ipv6.disable=1` (not something a test can boot): IPv6
    addresses are refused with EACCES, and the bridge has no /proc/sys/net/ipv6 entry to turn on."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def batch(self, requests) -> list[Reply]:
        """One RTM_NEWADDR at a time: refused for IPv6, taken for IPv4."""
        (_kind, _flags, body), = requests
        family = IFADDRMSG.unpack_from(body)[0]
        if family == AF_INET6:
            return [Reply(errno.EACCES)]
        self.added.append(family)
        return [Reply(0)]


def test_with_ipv6_off_for_good_the_error_says_why() -> None:
    sock = _RefusingIPv6()
    with pytest.raises(errors.LinkError) as info:
        links._add_gateways(sock, "fan-no-such-bridge", 7, GATEWAYS)
    assert sock.added == [socket.AF_INET]
    assert "fd00:241:0:10a::1/64" in str(info.value) and "overlay6 needs IPv6 on" in str(info.value)
