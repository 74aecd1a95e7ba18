"""find_underlay against a real kernel, IPv6 beside IPv4: which address is the node's.

A namespace with veths `u0`, `u1` (peers `u0p`, `u1p` in the same namespace,
as harness.netlab.make_node builds them). Addresses the tests mean to be
usable are added with `nodad`, so they are not tentative.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from netaddr import IPAddress, IPNetwork

from cni_fan.net.errors import UnderlayAmbiguous, UnderlayMissing
from cni_fan.net.rtnl import Rtnl
from cni_fan.net.underlay import find_underlay
from harness.netlab import Netns
from harness.system import require_kernel_lab

pytestmark = pytest.mark.kernel

NET6 = IPNetwork("fd00:198:18::/112")
NET4 = IPNetwork("198.18.0.0/16")
# family -> (underlay, the node's address, a second node address, a VIP)
FAMILIES = {
    4: (NET4, "198.18.1.28", "198.18.1.29", "198.18.1.99"),
    6: (NET6, "fd00:198:18::1c", "fd00:198:18::1d", "fd00:198:18::99"),
}


@pytest.fixture
def node() -> Iterator[Netns]:
    """A namespace with veths u0 (MTU 1400) and u1, both ends up, no underlay address yet."""
    require_kernel_lab(plugins=False)
    ns = Netns("underlay")
    try:
        for ifname, mtu in (("u0", "1400"), ("u1", "1500")):
            ns.ip("link", "add", ifname, "mtu", mtu, "type", "veth", "peer", "name", f"{ifname}p")
            ns.ip("link", "set", ifname, "up")
            ns.ip("link", "set", f"{ifname}p", "up")
        yield ns
    finally:
        ns.delete()


def find(ns: Netns, underlay: IPNetwork, interface: str | None = None):  # type: ignore[no-untyped-def]
    with Rtnl.in_netns(ns.path) as sock:
        return find_underlay(sock, underlay, interface)


def add(ns: Netns, version: int, cidr: str, dev: str, *extra: str) -> None:
    nodad = ("nodad",) if version == 6 else ()
    ns.ip(f"-{version}", "addr", "add", cidr, "dev", dev, *nodad, *extra)


def flags_of(ns: Netns, dev: str, address: str) -> set[str]:
    """The flags `ip -j addr` shows for `address` (tentative, dadfailed, deprecated...)."""
    for link in ns.ip_json("-6", "addr", "show", "dev", dev):
        for info in link.get("addr_info", []):
            if info["local"] == address:
                return {key for key, value in info.items() if value is True}
    raise AssertionError(f"{address} is not on {dev}: {json.dumps(ns.ip_json('addr', 'show', 'dev', dev))}")


def test_ipv6_underlay_address_interface_index_and_mtu(node: Netns) -> None:
    add(node, 6, "fd00:198:18::1c/112", "u0")
    got = find(node, NET6)
    assert got.address == IPAddress("fd00:198:18::1c") and got.prefixlen == 112
    assert (got.interface, got.mtu) == ("u0", 1400)
    assert got.index == node.ip_json("link", "show", "u0")[0]["ifindex"]
    assert find(node, NET6, "u0") == got


@pytest.mark.parametrize("version", [4, 6])
def test_missing_ambiguous_and_chosen_alike_in_both_families(node: Netns, version: int) -> None:
    """The same errors and messages for IPv4 and IPv6: none, several, or the one on underlayInterface."""
    underlay, mine, other, _ = FAMILIES[version]
    prefix = underlay.prefixlen
    with pytest.raises(UnderlayMissing) as missing:
        find(node, underlay)
    assert missing.value.msg == f"no address in the underlay network {underlay} on this node"
    assert missing.value.details == 'set "underlayInterface" or fix "underlay"'
    add(node, version, f"{mine}/{prefix}", "u0")
    add(node, version, f"{other}/{prefix}", "u1")
    with pytest.raises(UnderlayAmbiguous) as several:
        find(node, underlay)
    assert several.value.msg == (f"several addresses in the underlay network {underlay} on this node: "
                                 f"{mine} on u0, {other} on u1")
    assert several.value.details == 'set "underlayInterface" to choose one'
    assert find(node, underlay, "u1").address == IPAddress(other)
    with pytest.raises(UnderlayMissing, match="underlayInterface 'u9' does not exist"):
        find(node, underlay, "u9")
    other_family = FAMILIES[10 - version][0]
    with pytest.raises(UnderlayMissing, match=f"no address in the underlay network {other_family}"):
        find(node, other_family)  # one family's addresses never answer for the other


@pytest.mark.parametrize("version", [4, 6])
def test_host_routes_look_like_vips_and_are_skipped(node: Netns, version: int) -> None:
    underlay, mine, _, vip = FAMILIES[version]
    host = 32 if version == 4 else 128
    add(node, version, f"{vip}/{host}", "u1")
    with pytest.raises(UnderlayMissing) as missing:
        find(node, underlay)
    assert f"skipped: {vip}/{host} on u1 (a /{host} looks like a VIP)" in missing.value.details
    add(node, version, f"{mine}/{underlay.prefixlen}", "u0")
    assert find(node, underlay).address == IPAddress(mine)


def test_tentative_ipv6_address_is_not_chosen(node: Netns) -> None:
    """Chosen: skip, not wait. A tentative address does not work yet; "missing" makes the runtime retry.

    u1's peer is down, so u1 has no carrier and duplicate address detection
    never completes: the address stays tentative for the whole test.
    """
    node.ip("link", "set", "u1p", "down")
    node.ip("-6", "addr", "add", "fd00:198:18::1d/112", "dev", "u1")  # with DAD
    assert "tentative" in flags_of(node, "u1", "fd00:198:18::1d")
    with pytest.raises(UnderlayMissing) as missing:
        find(node, NET6)
    assert ("skipped: fd00:198:18::1d on u1 (tentative: duplicate address detection has not finished)"
            in missing.value.details)
    add(node, 6, "fd00:198:18::1c/112", "u0")
    assert find(node, NET6).address == IPAddress("fd00:198:18::1c")  # not ambiguous: one real candidate


def test_dadfailed_ipv6_address_is_not_chosen(node: Netns) -> None:
    """u0p holds the address already, so u0's duplicate address detection fails."""
    node.ip("-6", "addr", "add", "fd00:198:18::1c/112", "dev", "u0p", "nodad")
    node.ip("-6", "addr", "add", "fd00:198:18::1c/112", "dev", "u0")  # with DAD
    deadline = time.monotonic() + 30  # a wait for a state, not a timing assertion
    while "dadfailed" not in flags_of(node, "u0", "fd00:198:18::1c"):
        assert time.monotonic() < deadline, flags_of(node, "u0", "fd00:198:18::1c")
        time.sleep(0.1)
    with pytest.raises(UnderlayMissing) as missing:
        find(node, NET6, "u0")
    assert "fd00:198:18::1c on u0 (duplicate address detection failed" in missing.value.details


def test_deprecated_ipv6_address_is_not_chosen(node: Netns) -> None:
    add(node, 6, "fd00:198:18::1d/112", "u1", "preferred_lft", "0")
    assert "deprecated" in flags_of(node, "u1", "fd00:198:18::1d")
    with pytest.raises(UnderlayMissing, match=r"fd00:198:18::1d on u1 \(deprecated\)"):
        find(node, NET6)
    add(node, 6, "fd00:198:18::1c/112", "u0")
    assert find(node, NET6).interface == "u0"


def test_link_local_ipv6_address_is_never_the_underlay(node: Netns) -> None:
    """Even an underlay network that covers fe80::/64 does not take the link's own address."""
    add(node, 6, "fe80::1c/64", "u0")
    with pytest.raises(UnderlayMissing) as missing:
        find(node, IPNetwork("fe80::/64"), "u0")
    assert "fe80::1c on u0 (link-local)" in missing.value.details
