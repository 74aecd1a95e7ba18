"""The lab's kube-proxy rules (cni_fan/lab/kubeproxy.py): their shapes, and that the
real tools accept them, load them, replace them and remove them (in a scratch namespace).

Where the rules carry traffic is tests/test_k8s_services.py.
"""
from __future__ import annotations

import os
import re

import pytest

from harness import netlab
from cni_fan.lab import kubeproxy as kp

NODE1, NODE2 = "198.18.1.11", "198.18.2.12"
OVERLAY = "241.0.0.0/8"
VIEW = kp.NodeView(NODE1, OVERLAY)
P1, P2, P3, P4 = (kp.Endpoint("241.1.11.2", 8080, NODE1), kp.Endpoint("241.1.11.3", 8080, NODE1),
                  kp.Endpoint("241.2.12.2", 8080, NODE2), kp.Endpoint("241.2.12.3", 8080, NODE2))
WEB = kp.Service("default/web", "10.96.1.1", 80, "tcp", (P1, P2, P3, P4), node_port=30001)
LOCAL = kp.Service("default/local", "10.96.2.1", 80, "udp", (P1, P3), node_port=31001, external_local=True)
REMOTE_ONLY = kp.Service("default/far", "10.96.2.2", 80, "tcp", (P3,), node_port=31002, external_local=True)
EMPTY = kp.Service("default/empty", "10.96.3.1", 80, "tcp", (), node_port=30009)
ALL = (WEB, LOCAL, REMOTE_ONLY, EMPTY)


def chain_rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


# -- model ----------------------------------------------------------------------------------------

def test_service_rejects_an_unknown_protocol_and_a_name_without_namespace() -> None:
    with pytest.raises(ValueError, match="sctp"):
        kp.Service("default/x", "10.96.0.5", 80, "sctp", ())
    with pytest.raises(ValueError, match="namespace/name"):
        kp.Service("x", "10.96.0.5", 80, "tcp", ())
    with pytest.raises(ValueError, match="ipvs"):
        kp.render("ipvs", ALL, VIEW)


def test_chain_names_are_stable_and_distinct_per_protocol_and_endpoint() -> None:
    udp_web = kp.Service("default/web", "10.96.1.1", 80, "udp", (P1,))
    assert kp.iptables_chains(WEB) == kp.iptables_chains(kp.Service("default/web", "10.96.1.1", 80, "tcp", (P1,)))
    assert kp.iptables_chains(WEB)["SVC"] != kp.iptables_chains(udp_web)["SVC"]
    assert kp.iptables_endpoint_chain(WEB, P1) != kp.iptables_endpoint_chain(WEB, P2)
    for name in [*kp.iptables_chains(WEB).values(), kp.iptables_endpoint_chain(WEB, P1)]:
        assert re.fullmatch(r"KUBE-(SVC|SVL|EXT|SEP)-[A-Z2-7]{16}", name) and len(name) <= 28
    assert re.fullmatch(r"[A-Z2-7]{8}-default/web/tcp/p80", kp.nft_chain_base(WEB))
    assert kp.nft_endpoint_chain(WEB, P1).endswith("-default/web/tcp/p80__241.1.11.2/8080")


# -- iptables mode --------------------------------------------------------------------------------

def test_iptables_service_chain_masquerades_outside_cluster_cidr_and_spreads_evenly() -> None:
    text = kp.render_iptables(ALL, VIEW).text
    svc = kp.iptables_chains(WEB)["SVC"]
    rules = chain_rules(text, svc)
    assert f"-d 10.96.1.1 --dport 80 ! -s {OVERLAY} -j KUBE-MARK-MASQ" in rules[0]
    spread = rules[1:]
    assert [re.search(r"--probability (\S+)", r).group(1) if "statistic" in r else None for r in spread] == \
        ["0.2500000000", "0.3333333333", "0.5000000000", None]
    assert [r.rsplit(" ", 1)[1] for r in spread] == [kp.iptables_endpoint_chain(WEB, ep) for ep in WEB.endpoints]
    services = chain_rules(text[text.index("*nat"):], "KUBE-SERVICES")
    assert f"-m tcp -p tcp -d 10.96.1.1 --dport 80 -j {svc}" in services[0]
    assert services[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"), "nodeports must come last"


def test_iptables_endpoint_chain_marks_hairpin_then_dnats() -> None:
    text = kp.render_iptables(ALL, VIEW).text
    sep = kp.iptables_endpoint_chain(WEB, P3)
    rules = chain_rules(text, sep)
    assert len(rules) == 2
    assert rules[0].endswith("-s 241.2.12.2 -j KUBE-MARK-MASQ")
    assert rules[1].endswith("-m tcp -p tcp -j DNAT --to-destination 241.2.12.2:8080")


def test_iptables_masquerade_mark_postrouting_and_forward_rules() -> None:
    rules = kp.render_iptables(ALL, VIEW)
    assert chain_rules(rules.text, "KUBE-MARK-MASQ") == ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    post = chain_rules(rules.text, "KUBE-POSTROUTING")
    assert post[0] == "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    assert post[1] == "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000"
    assert post[2].endswith("-j MASQUERADE --random-fully")
    forward = chain_rules(rules.text, "KUBE-FORWARD")
    assert "--ctstate INVALID -j DROP" in forward[0]
    assert "--mark 0x4000/0x4000 -j ACCEPT" in forward[1]
    assert "--ctstate RELATED,ESTABLISHED -j ACCEPT" in forward[2]
    jumps = {(table, chain, args[-1]) for table, chain, args in rules.jumps}
    assert {("nat", "PREROUTING", "KUBE-SERVICES"), ("nat", "OUTPUT", "KUBE-SERVICES"),
            ("nat", "POSTROUTING", "KUBE-POSTROUTING"), ("filter", "FORWARD", "KUBE-FORWARD")} <= jumps
    assert rules.text.index("*filter") < rules.text.index("*nat") and rules.text.count("COMMIT") == 2


def test_iptables_nodeport_cluster_policy_marks_then_goes_to_the_service() -> None:
    text = kp.render_iptables(ALL, VIEW).text
    chains = kp.iptables_chains(WEB)
    assert any(r.endswith(f"--dport 30001 -j {chains['EXT']}") for r in chain_rules(text, "KUBE-NODEPORTS"))
    ext = chain_rules(text, chains["EXT"])
    assert ext[0].endswith("-j KUBE-MARK-MASQ") and ext[1] == f"-A {chains['EXT']} -j {chains['SVC']}"
    assert f":{chains['SVL']} " not in text


def test_iptables_nodeport_local_policy_uses_only_local_endpoints_without_masquerade() -> None:
    text = kp.render_iptables(ALL, VIEW).text
    chains = kp.iptables_chains(LOCAL)
    ext = chain_rules(text, chains["EXT"])
    assert f"-s {OVERLAY} -j {chains['SVC']}" in ext[0]
    assert ext[1].endswith("-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
    assert ext[2].endswith(f"-m addrtype --src-type LOCAL -j {chains['SVC']}")
    assert ext[3] == f"-A {chains['EXT']} -j {chains['SVL']}"
    svl = chain_rules(text, chains["SVL"])
    assert [r.rsplit(" ", 1)[1] for r in svl] == [kp.iptables_endpoint_chain(LOCAL, P1)]
    assert not any("KUBE-MARK-MASQ" in r for r in svl)
    # No local endpoint: dropped in the filter table, no SVL chain.
    far = kp.iptables_chains(REMOTE_ONLY)
    assert f":{far['SVL']} " not in text and not chain_rules(text, far["EXT"])[-1].endswith(far["SVL"])
    assert any("--dport 31002 -j DROP" in r for r in chain_rules(text, "KUBE-EXTERNAL-SERVICES"))


def test_iptables_service_without_endpoints_is_rejected_in_the_filter_table() -> None:
    text = kp.render_iptables(ALL, VIEW).text
    filt = text[:text.index("*nat")]
    assert '-A KUBE-SERVICES -m comment --comment "default/empty:p80 has no endpoints" -m tcp -p tcp -d 10.96.3.1' \
           ' --dport 80 -j REJECT' in filt
    assert "--dport 30009 -j REJECT" in filt
    assert kp.iptables_chains(EMPTY)["SVC"] not in text


def test_stale_chains_and_removal_text() -> None:
    rules = kp.render_iptables((WEB,), VIEW)
    gone = kp.iptables_chains(LOCAL)["SVC"]
    saved = f"*nat\n:PREROUTING ACCEPT [0:0]\n:{gone} - [0:0]\n:{kp.iptables_chains(WEB)['SVC']} - [0:0]\n" \
            ":CNI-HOSTPORT-DNAT - [0:0]\nCOMMIT\n"
    assert kp.stale_iptables_chains(saved, rules) == [gone]
    removal = kp.iptables_removal(saved, "*filter\n:KUBE-FORWARD - [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")
    assert f"-X {gone}" in removal and "-X KUBE-FORWARD" in removal
    assert "CNI-HOSTPORT-DNAT" not in removal and "-X PREROUTING" not in removal


# -- nftables mode --------------------------------------------------------------------------------

def nft_chain(text: str, name: str) -> list[str]:
    m = re.search(rf"^  chain {re.escape(name)} {{\n(.*?)\n  }}", text, re.M | re.S)
    assert m, f"chain {name} missing"
    return [line.strip() for line in m.group(1).splitlines()]


def test_nftables_table_base_chains_and_dispatch() -> None:
    text = kp.render_nftables(ALL, VIEW).text
    assert text.startswith("add table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {")
    assert nft_chain(text, "nat-prerouting") == ["type nat hook prerouting priority -100; policy accept;",
                                                 "jump services"]
    assert nft_chain(text, "nat-output")[1] == "jump services"
    assert nft_chain(text, "nat-postrouting") == ["type nat hook postrouting priority 100; policy accept;",
                                                  "jump masquerading"]
    assert nft_chain(text, "filter-forward")[0] == "type filter hook forward priority -110; policy accept;"
    assert nft_chain(text, "services") == [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"]
    assert f"10.96.1.1 . tcp . 80 : goto service-{kp.nft_chain_base(WEB)}" in text
    assert f"tcp . 30001 : goto external-{kp.nft_chain_base(WEB)}" in text
    assert nft_chain(text, "mark-for-masquerade") == ["mark set mark or 0x4000"]
    assert nft_chain(text, "masquerading") == ["mark and 0x4000 == 0 return", "mark set mark xor 0x4000",
                                               "masquerade fully-random"]


def test_nftables_service_endpoint_and_external_chains() -> None:
    text = kp.render_nftables(ALL, VIEW).text
    base = kp.nft_chain_base(WEB)
    service = nft_chain(text, f"service-{base}")
    assert service[0] == f"ip daddr 10.96.1.1 tcp dport 80 ip saddr != {OVERLAY} jump mark-for-masquerade"
    assert service[1].startswith("numgen random mod 4 vmap { 0 : goto endpoint-")
    assert service[1].count("goto endpoint-") == 4
    assert nft_chain(text, kp.nft_endpoint_chain(WEB, P3)) == ["ip saddr 241.2.12.2 jump mark-for-masquerade",
                                                               "meta l4proto tcp dnat to 241.2.12.2:8080"]
    assert nft_chain(text, f"external-{base}") == ["jump mark-for-masquerade", f"goto service-{base}"]
    local = kp.nft_chain_base(LOCAL)
    ext = nft_chain(text, f"external-{local}")
    assert ext[0].startswith(f"ip saddr {OVERLAY} goto service-{local}")
    assert ext[1].startswith("fib saddr type local jump mark-for-masquerade")
    assert ext[2].startswith(f"fib saddr type local goto service-{local}")
    assert ext[3] == f"goto local-{local}"
    assert nft_chain(text, f"local-{local}") == [
        f"numgen random mod 1 vmap {{ 0 : goto {kp.nft_endpoint_chain(LOCAL, P1)} }}"]
    assert "tcp . 31002 : drop" in text            # Local policy, no endpoint on this node
    assert "10.96.3.1 . tcp . 80 comment \"default/empty:p80\" : goto reject-chain" in text
    assert f"service-{kp.nft_chain_base(EMPTY)}" not in text


# -- the tools accept, load, replace and remove them ------------------------------------------------

@pytest.fixture
def scratch():
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    ns = netlab.Netns("kp")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.mark.kernel
@pytest.mark.parametrize("mode", kp.MODES)
def test_tools_accept_load_replace_and_remove_the_rules(scratch, mode) -> None:
    def in_ns(argv):
        return scratch.argv(*argv)

    def listing() -> str:
        if mode == kp.IPTABLES:
            return scratch.run("iptables-save").stdout
        return scratch.run("nft", "list", "ruleset").stdout

    rules = kp.render(mode, ALL, VIEW)
    kp.check(in_ns, rules)
    with pytest.raises(kp.KubeProxyError, match="failed"):
        kp.check(in_ns, kp.Rules(mode, rules.text.replace("0x4000", "0x4000 bogus", 1)))
    kp.apply(in_ns, rules)
    kp.apply(in_ns, rules)  # a second sync changes nothing
    loaded = listing()
    assert "10.96.1.1" in loaded and "241.2.12.3" in loaded
    if mode == kp.IPTABLES:
        assert loaded.count("-j KUBE-SERVICES") == 4, "jumps from built-in chains added twice"
    kp.apply(in_ns, kp.render(mode, (WEB,), VIEW))  # LOCAL, REMOTE_ONLY and EMPTY gone
    replaced = listing()
    assert "10.96.1.1" in replaced and "10.96.2.1" not in replaced and "10.96.3.1" not in replaced
    if mode == kp.IPTABLES:
        assert kp.iptables_chains(LOCAL)["SVC"] not in replaced
    kp.remove(in_ns, mode)
    kp.remove(in_ns, mode)  # nothing left: still fine
    assert "KUBE" not in listing() and "kube-proxy" not in listing()


# -- IPv6 (one proxier per family) ------------------------------------------------------------------

NODE1_6, NODE2_6 = "fd00:18::11", "fd00:18::12"
OVERLAY6 = "fd00:50::/48"
VIEW6 = kp.NodeView(NODE1_6, OVERLAY6, "fd00:96::/112")
Q1, Q3 = kp.Endpoint("fd00:50:0:10b::2", 8080, NODE1_6), kp.Endpoint("fd00:50:0:20c::2", 8080, NODE2_6)
WEB6 = kp.Service("default/web", "fd00:96::101", 80, "tcp", (Q1, Q3), node_port=30001)
LOCAL6 = kp.Service("default/local", "fd00:96::201", 80, "udp", (Q1, Q3), node_port=31001, external_local=True)
EMPTY6 = kp.Service("default/empty", "fd00:96::301", 80, "tcp", (), node_port=30009)
ALL6 = (WEB6, LOCAL6, EMPTY6)
DUAL = ALL + ALL6


def test_family_follows_the_addresses_and_mixing_families_is_refused() -> None:
    assert (WEB.family, WEB6.family, VIEW.family, VIEW6.family) == (4, 6, 4, 6)
    assert str(Q1) == "[fd00:50:0:10b::2]:8080" and str(P1) == "241.1.11.2:8080"
    with pytest.raises(ValueError, match="one family"):
        kp.Service("default/mixed", "fd00:96::9", 80, "tcp", (P1,))
    with pytest.raises(ValueError, match="cluster_cidr"):
        kp.NodeView(NODE1_6, OVERLAY)
    assert kp.NodeView(NODE1_6, OVERLAY6).service_cidr == "fd00:96::/112"
    assert kp.NodeView(NODE1, OVERLAY).service_cidr == "10.96.0.0/16"


@pytest.mark.parametrize("mode", kp.MODES)
def test_each_family_renders_only_its_own_services(mode) -> None:
    v4, v6 = kp.render(mode, DUAL, VIEW), kp.render(mode, DUAL, VIEW6)
    assert (v4.family, v6.family) == (4, 6)
    assert "10.96.1.1" in v4.text and "fd00:96::101" not in v4.text
    assert "fd00:96::101" in v6.text and "10.96.1.1" not in v6.text and "241." not in v6.text
    assert v4.text == kp.render(mode, ALL, VIEW).text, "IPv6 services changed the IPv4 rules"


def test_ip6tables_same_chains_bracketed_dnat_and_the_same_masquerade() -> None:
    text = kp.render_iptables(ALL6, VIEW6).text
    chains = kp.iptables_chains(WEB6)
    svc = chain_rules(text, chains["SVC"])
    assert f"-d fd00:96::101 --dport 80 ! -s {OVERLAY6} -j KUBE-MARK-MASQ" in svc[0]
    sep = chain_rules(text, kp.iptables_endpoint_chain(WEB6, Q3))
    assert sep[0].endswith("-s fd00:50:0:20c::2 -j KUBE-MARK-MASQ")
    assert sep[1].endswith("-m tcp -p tcp -j DNAT --to-destination [fd00:50:0:20c::2]:8080")
    assert chain_rules(text, "KUBE-MARK-MASQ") == ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    assert chain_rules(text, "KUBE-POSTROUTING") == chain_rules(kp.render_iptables(ALL, VIEW).text,
                                                                "KUBE-POSTROUTING")
    services = chain_rules(text[text.index("*nat"):], "KUBE-SERVICES")
    assert services[-1].endswith("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS")
    ext = chain_rules(text, kp.iptables_chains(LOCAL6)["EXT"])
    assert f"-s {OVERLAY6} -j {kp.iptables_chains(LOCAL6)['SVC']}" in ext[0]
    filt = text[:text.index("*nat")]
    assert "-d fd00:96::301 --dport 80 -j REJECT" in filt


def test_nftables_ip6_table_types_matches_and_endpoint_chain_names() -> None:
    text = kp.render_nftables(ALL6, VIEW6).text
    assert text.startswith("add table ip6 kube-proxy\ndelete table ip6 kube-proxy\ntable ip6 kube-proxy {")
    assert " ip " not in text.replace("table ip6", "") and "ip daddr" not in text and "ipv4_addr" not in text
    assert "type ipv6_addr . inet_proto . inet_service : verdict" in text
    assert nft_chain(text, "services") == [
        "ip6 daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports"]
    assert nft_chain(text, "nodeport-endpoints-check") == [
        "ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports"]
    endpoint = kp.nft_endpoint_chain(WEB6, Q3)
    assert endpoint.endswith("-default/web/tcp/p80__fd00.50.0.20c..2/8080") and ":" not in endpoint
    assert nft_chain(text, endpoint) == ["ip6 saddr fd00:50:0:20c::2 jump mark-for-masquerade",
                                         "meta l4proto tcp dnat to [fd00:50:0:20c::2]:8080"]
    base = kp.nft_chain_base(WEB6)
    assert nft_chain(text, f"service-{base}")[0] == (
        f"ip6 daddr fd00:96::101 tcp dport 80 ip6 saddr != {OVERLAY6} jump mark-for-masquerade")
    assert f"fd00:96::101 . tcp . 80 : goto service-{base}" in text
    assert 'ip6 daddr { fd00:96::/112 } drop comment "Drop traffic to unallocated ClusterIPs"' in text
    assert nft_chain(text, f"external-{kp.nft_chain_base(LOCAL6)}")[0].startswith(f"ip6 saddr {OVERLAY6} goto")
    assert nft_chain(text, "masquerading") == ["mark and 0x4000 == 0 return", "mark set mark xor 0x4000",
                                               "masquerade fully-random"]


@pytest.mark.kernel
@pytest.mark.parametrize("mode", kp.MODES)
def test_tools_load_both_families_side_by_side_and_remove_each(scratch, mode) -> None:
    """A dual-stack node: IPv4 and IPv6 rules loaded together, each family removed on its own."""
    def in_ns(argv):
        return scratch.argv(*argv)

    def listing(family: int) -> str:
        if mode == kp.IPTABLES:
            return scratch.run("iptables-save" if family == 4 else "ip6tables-save").stdout
        return scratch.run("nft", "list", "ruleset", "ip" if family == 4 else "ip6").stdout

    v4, v6 = kp.render(mode, DUAL, VIEW), kp.render(mode, DUAL, VIEW6)
    kp.check(in_ns, v6)
    for rules in (v4, v6, v6):
        kp.apply(in_ns, rules)
    assert "10.96.1.1" in listing(4) and "fd00:96::101" in listing(6) and "fd00:50:0:20c::2" in listing(6)
    if mode == kp.IPTABLES:
        assert listing(6).count("-j KUBE-SERVICES") == 4, "jumps from built-in chains added twice"
    kp.apply(in_ns, kp.render(mode, (WEB6,), VIEW6))
    assert "fd00:96::201" not in listing(6) and "10.96.2.1" in listing(4)
    kp.remove(in_ns, mode, 6)
    kp.remove(in_ns, mode, 6)
    assert "KUBE" not in listing(6) and "kube-proxy" not in listing(6)
    assert "10.96.1.1" in listing(4), "removing IPv6 rules removed IPv4 ones"
    kp.remove(in_ns, mode)
    assert "KUBE" not in listing(4) and "kube-proxy" not in listing(4)
