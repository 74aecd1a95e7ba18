"""Which firewall backend the node agent writes its rules with, and the rules themselves.

The agent's container has its own `iptables` binary, which says nothing
about the host; the backend is chosen from what the kernel's tables hold.
The kernel tests run in namespaces of their own (iptables-legacy and
nftables both work in a network namespace here) and touch nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess

import pytest

from cni_fan.net.netns import entered
from cni_fan.node import firewall
from cni_fan.node.firewall import LEGACY, NFT, FirewallRules, choose_backend
from harness.frames import ETH_P_IP, ETH_P_IPV6, eth, ipv4_udp, ipv6
from harness.netlab import Netns

LEGACY_WITH_HINT = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
NFT_WITH_HINT = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
NFT_RULES = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n"
LEGACY_RULES = "*filter\n:INPUT ACCEPT [0:0]\n" + "-A INPUT -s 198.18.0.1/32 -j ACCEPT\n" * 3 + "COMMIT\n"


@pytest.mark.parametrize("legacy, nft, previous, expected", [
    ("", "", "", NFT),                                # nothing anywhere: nftables
    (LEGACY_WITH_HINT, "", "", LEGACY),               # the kubelet chose legacy
    ("", NFT_WITH_HINT, "", NFT),
    (LEGACY_WITH_HINT, NFT_RULES, "", LEGACY),        # the hint beats a rule count
    (LEGACY_RULES, NFT_RULES, "", LEGACY),            # more rules in legacy
    (NFT_RULES, LEGACY_RULES.replace("*filter", "*nat"), "", NFT),  # 2 legacy rules, 3 in nft
    (LEGACY_RULES, "", NFT, NFT),                     # what we used before wins: never rules in both
    ("", NFT_WITH_HINT, LEGACY, LEGACY),
    ("", "", "something else", NFT),                  # an unknown earlier name is ignored
])
def test_choose_backend(legacy: str, nft: str, previous: str, expected: str) -> None:
    name, why = choose_backend(legacy, nft, previous)
    assert name == expected
    assert why  # the reason goes to the log


def test_hint_chain_name_must_match_exactly() -> None:
    text = "*mangle\n:KUBE-IPTABLES-HINT-NOT - [0:0]\nCOMMIT\n"
    assert choose_backend(text, "", "")[0] == NFT


# -- in a namespace of our own -------------------------------------------------------

need_tools = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("iptables-legacy") and shutil.which("nft")
                                                           and shutil.which("iptables-nft")),
                                reason="needs root, iptables-legacy, iptables-nft and nft")


@pytest.fixture
def netns_fd():
    ns = Netns("fw")
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)
        ns.delete()


RULES = FirewallRules(slice="241.1.10.0/24", overlay="241.0.0.0/8", underlay="198.18.0.0/16",
                      vxlan_port=4789, masquerade=True)


@pytest.mark.kernel
@need_tools
@pytest.mark.parametrize("kubelet_backend, expected", [("iptables-legacy", firewall.IptablesFirewall),
                                                        ("iptables-nft", firewall.NftFirewall),
                                                        (None, firewall.NftFirewall)])
def test_detect_follows_the_kubelets_backend(netns_fd: int, kubelet_backend: str | None, expected: type) -> None:
    with entered(netns_fd):
        if kubelet_backend:
            subprocess.run([kubelet_backend, "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"], check=True)
        chosen = firewall.detect()
        assert type(chosen) is expected
        chosen.apply(RULES)
        listing = chosen.current()
        assert listing and "198.18.0.0/16" in listing and "241.1.10.0/24" in listing
        assert chosen.apply(RULES) is None and chosen.current() == listing  # idempotent
        # Later runs stay with it even when the hint is gone (rules in two backends would be a mess).
        if kubelet_backend:
            subprocess.run([kubelet_backend, "-t", "mangle", "-X", "KUBE-IPTABLES-HINT"], check=True)
        assert type(firewall.detect(previous=chosen.name)) is expected
        assert chosen.remove()
        assert chosen.current() is None
        assert not chosen.remove()


@pytest.mark.kernel
@need_tools
def test_legacy_rules_drop_tunnel_traffic_from_outside_and_count_it(netns_fd: int) -> None:
    """The legacy variant really filters: a VXLAN packet from outside the underlay is dropped and counted."""
    with entered(netns_fd):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "addr", "add", "203.0.113.7/32", "dev", "lo"], check=True)  # not in the underlay
        fw = firewall.IptablesFirewall()
        fw.apply(RULES)
        try:
            assert fw.dropped_foreign() == 0
            code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "s.bind(('203.0.113.7', 0)); s.sendto(b'x', ('203.0.113.7', 4789))")
            subprocess.run(["python3", "-c", code], check=True)
            assert fw.dropped_foreign() == 1
        finally:
            fw.remove()


RULES6 = FirewallRules(slice="241.1.10.0/24", overlay="241.0.0.0/8", underlay="198.18.0.0/16", vxlan_port=4789,
                       masquerade=True, slice6="fd41:0:0:10a::/64", overlay6="fd41::/48")


@pytest.mark.kernel
@need_tools
@pytest.mark.parametrize("backend", [firewall.NftFirewall, firewall.IptablesFirewall])
def test_nat66_in_both_backends_is_applied_listed_and_removed(netns_fd: int, backend: type) -> None:
    """Dual-stack: the NAT66 rule beside the IPv4 ones (table ip6 cni-fan, or
    ip6tables-legacy's CNI-FAN-POSTROUTING), in the listing the agent compares,
    idempotent, removed by `remove`; a plan without IPv6 afterwards drops it."""
    if backend is firewall.IptablesFirewall and not shutil.which("ip6tables-legacy"):
        pytest.skip("needs ip6tables-legacy")
    with entered(netns_fd):
        fw = backend()
        fw.apply(RULES6)
        listing = fw.current()
        assert listing and "fd41:0:0:10a::/64" in listing and "fd41::/48" in listing
        assert "241.1.10.0/24" in listing
        assert fw.apply(RULES6) is None and fw.current() == listing
        if backend is firewall.NftFirewall:
            fw.apply(RULES)  # the plan lost overlay6: its table goes in the same transaction
            assert "fd41" not in fw.current()
            fw.apply(RULES6)
        assert fw.remove()
        assert fw.current() is None
        assert "fd41" not in subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        legacy6 = subprocess.run(["ip6tables-legacy", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert "CNI-FAN" not in legacy6


RULES_DIRECT = FirewallRules(slice="241.1.10.0/24", overlay="241.0.0.0/8", underlay="198.18.0.0/16",
                             vxlan_port=4789, masquerade=True, slice6="fd41:0:0:10a::/64", overlay6="fd41::/48",
                             underlay_interface="under0", direct_sources="241.1.0.0/16",
                             direct_sources6="fd41:0:0:100::/56")


def _send_on_underlay(src: str) -> None:
    """A UDP packet from overlay address `src` to this node (198.18.1.10 or fd41:0:0:10a::1), arriving on
    under0 from its veth peer."""
    link = subprocess.run(["ip", "-j", "link", "show", "under0"], capture_output=True, text=True, check=True)
    mac = json.loads(link.stdout)[0]["address"]
    if ":" in src:
        udp = struct.pack("!HHHH", 40000, 9, 13, 0) + b"spoof"
        frame = eth(mac, "02:00:00:00:00:99", ETH_P_IPV6) + ipv6(src, "fd41:0:0:10a::1", udp)
    else:
        frame = eth(mac, "02:00:00:00:00:99", ETH_P_IP) + ipv4_udp(src, "198.18.1.10", b"spoof")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("under1", 0))
        sock.send(frame)


@pytest.mark.kernel
@need_tools
@pytest.mark.parametrize("backend", [firewall.NftFirewall, firewall.IptablesFirewall])
def test_direct_routing_sources_in_both_backends(netns_fd: int, backend: type) -> None:
    """Direct routing: unencapsulated overlay packets on the underlay interface are dropped and
    counted when their source is the node's own slice or outside the segment's overlay prefix,
    accepted from the segment; the chain is listed, idempotent and removed."""
    if backend is firewall.IptablesFirewall and not shutil.which("ip6tables-legacy"):
        pytest.skip("needs ip6tables-legacy")
    with entered(netns_fd):
        for argv in (["link", "add", "under0", "type", "veth", "peer", "name", "under1"],
                     ["link", "set", "under0", "up"], ["link", "set", "under1", "up"],
                     ["addr", "add", "198.18.1.10/24", "dev", "under0"]):
            subprocess.run(["ip", *argv], check=True)
        fw = backend()
        fw.apply(RULES_DIRECT)
        try:
            listing = fw.current()
            assert listing and "241.1.0.0/16" in listing and "fd41:0:0:100::/56" in listing
            assert fw.apply(RULES_DIRECT) is None and fw.current() == listing
            assert fw.dropped_direct() == 0
            _send_on_underlay("241.1.20.7")      # a node's pod in the segment: accepted
            _send_on_underlay("fd41:0:0:114::7")
            assert fw.dropped_direct() == 0
            _send_on_underlay("241.2.20.7")      # outside the segment
            _send_on_underlay("241.1.10.7")      # the node's own slice
            assert fw.dropped_direct() == 2
            _send_on_underlay("fd41:0:0:214::7")
            _send_on_underlay("fd41:0:0:10a::7")
            assert fw.dropped_direct() == 4
        finally:
            assert fw.remove()
        assert fw.current() is None
        assert "CNI-FAN" not in subprocess.run(["iptables-legacy", "-t", "raw", "-S"], capture_output=True,
                                               text=True).stdout
