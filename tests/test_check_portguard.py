"""CHECK looks at the port guard (cni_fan/net/portguard_check.py) of the pod it is asked about.

What the config turns on (`neighSuppress`, `antiSpoof`) must be in place on
the pod's host veth: the anti-spoofing tc program, the static FDB entry,
the bridge's neighbour entry, the port flags, the alias DEL relies on, and
the permanent gateway entry in the pod. Each is removed or changed by hand
(`tc`, `bridge`, `ip` in the node's namespace); CHECK then fails with code
104 (CHECK_FAILED, the code of every CHECK failure here) naming what is
missing, and changes nothing itself.

The judging part (`portguard_check.missing`) is pure and tested without a kernel;
the rest runs the real executables on harness/podlab.py's Lab.
"""
from __future__ import annotations

import json
from typing import Callable, Iterator

import pytest

from cni_fan.net import portguard, portguard_check, rtnl, rtnl_mdb
from cni_fan.net.portguard import GUARD_NAME
from cni_fan.net.portguard_check import GuardFilter, GuardState
from cni_fan.net.rtnl_links import NeighEntry
from harness.podlab import module_lab, node_state, pod_state
from harness.system import run

CHECK_FAILED = 104
POD_IP, POD_MAC, GW = "241.1.10.5/24", "0a:00:00:00:00:05", "241.1.10.1"
GW_MAC = portguard.gateway_mac(GW)


# == pure: what `missing` says about a state ==================================================

def complete_state() -> GuardState:
    return GuardState(
        veth="fanv0", veth_index=7, master=3, alias=portguard.port_alias("241.1.10.5", POD_MAC),
        port_flags={kind: want for kind, want, _name in portguard.PORT_FLAGS}, fdb=(7, rtnl.NUD_NOARP),
        bridge_mac=GW_MAC, bridge_neigh=NeighEntry("241.1.10.5", POD_MAC, rtnl.NUD_PERMANENT, 0xFC),
        filters=(GuardFilter("bpf", GUARD_NAME, True, 42),), pod_looked_at=True,
        gateway_neigh=NeighEntry(GW, GW_MAC, rtnl.NUD_PERMANENT, None))


def judge(state: GuardState, suppress: bool = True, spoof: bool = True) -> list[str]:
    return portguard_check.missing(state, suppress=suppress, spoof=spoof, pod_ip=POD_IP, pod_mac=POD_MAC, gateway=GW)


def test_a_complete_guard_has_nothing_missing() -> None:
    assert judge(complete_state()) == []


def _without(**changes) -> GuardState:
    return complete_state()._replace(**changes)


PURE_CASES = {
    "no filter": (dict(filters=()), "anti-spoofing program (cni-fan-guard, tc ingress filter prio 1 handle 0xfc) "
                                    "on fanv0 is missing"),
    "another filter in the slot": (dict(filters=(GuardFilter("bpf", "other", True, 9),)), "holds bpf 'other'"),
    "not direct action": (dict(filters=(GuardFilter("bpf", GUARD_NAME, False, 42),)), "direct-action"),
    "no FDB entry": (dict(fdb=None), f"static FDB entry {POD_MAC} on fanv0 is missing"),
    "FDB entry on another port": (dict(fdb=(9, rtnl.NUD_NOARP)), "is on ifindex 9, not on fanv0"),
    "FDB entry learned": (dict(fdb=(7, 0x02)), "is not static"),
    "no bridge neighbour": (dict(bridge_neigh=None), "neighbour entry 241.1.10.5 lladdr 0a:00:00:00:00:05 on the "
                                                     "bridge is missing"),
    "bridge neighbour stale": (dict(bridge_neigh=NeighEntry("241.1.10.5", POD_MAC, 0x04, None)), "not permanent"),
    "learning on": (dict(port_flags={**complete_state().port_flags, rtnl.IFLA_BRPORT_LEARNING: 1}),
                    "learning is on, should be off"),
    "proxy_arp_wifi off": (dict(port_flags={**complete_state().port_flags, rtnl.IFLA_BRPORT_PROXYARP_WIFI: 0}),
                           "proxy_arp_wifi is off, should be on"),
    "alias gone": (dict(alias=None), "has alias None"),
    "bridge MAC changed": (dict(bridge_mac="0a:00:00:00:00:99"), f"say {GW_MAC}"),
    "gateway entry gone": (dict(gateway_neigh=None), f"{GW} lladdr {GW_MAC} (the gateway) in the pod is missing"),
    "no veth": (dict(veth_index=None), "host veth fanv0 is missing"),
}


@pytest.mark.parametrize("case", list(PURE_CASES))
def test_each_missing_piece_is_named(case: str) -> None:
    changes, phrase = PURE_CASES[case]
    found = judge(_without(**changes))
    assert len(found) == 1 and phrase in found[0], found


def test_only_what_the_config_turns_on_is_judged() -> None:
    bare = GuardState(veth="fanv0", veth_index=7, master=3)  # no guard at all
    assert judge(bare, suppress=False, spoof=False) == []
    assert [p for p in judge(bare, suppress=False, spoof=True)] == \
        ["port guard: anti-spoofing program (cni-fan-guard, tc ingress filter prio 1 handle 0xfc) on fanv0 is missing"]
    assert not any("anti-spoofing" in p for p in judge(bare, suppress=True, spoof=False))
    assert judge(_without(pod_looked_at=False, gateway_neigh=None)) == []  # the pod side was not looked at


# == pure: a dual-stack pod's guard (the IPv6 pieces) ==========================================

DUAL_IP, DUAL_IP6, DUAL_GW6 = "241.1.10.5", "fd50:0:0:1c::5", "fd50:0:0:1c::1"


def _dual_state(**changes) -> GuardState:
    """A complete dual-stack guard as `observe` would read it, with `changes`."""
    complete = dict(
        veth="fanv0", veth_index=7, master=3, alias=portguard.port_alias(DUAL_IP, POD_MAC, DUAL_IP6),
        port_flags={kind: want for kind, want, _name in portguard.PORT_FLAGS}, fdb=(7, rtnl.NUD_NOARP),
        bridge_mac=GW_MAC, bridge_neigh=NeighEntry(DUAL_IP, POD_MAC, rtnl.NUD_PERMANENT, 0xFC),
        filters=(GuardFilter("bpf", portguard.GUARD_NAME6, True, 42),), pod_looked_at=True,
        gateway_neigh=NeighEntry(GW, GW_MAC, rtnl.NUD_PERMANENT, None),
        bridge_neigh6=NeighEntry(DUAL_IP6, POD_MAC, rtnl.NUD_PERMANENT, 0xFC), mdb_state=rtnl_mdb.MDB_PERMANENT,
        querier=True, hash_max=portguard.BRIDGE_HASH_MAX, max_groups=portguard.POD_MAX_GROUPS,
        gateway6_neigh=NeighEntry(DUAL_GW6, GW_MAC, rtnl.NUD_PERMANENT, None))
    return GuardState(**{**complete, **changes})


DUAL_CASES = {
    "complete": ({}, None),
    "no IPv6 neighbour on the bridge": (dict(bridge_neigh6=None), f"neighbour entry {DUAL_IP6} on the bridge lladdr"),
    "no MDB entry": (dict(mdb_state=None), "MDB entry ff02::1:ff00:5 on fanv0 is missing"),
    "MDB entry learned": (dict(mdb_state=0), "is not permanent"),
    "querier off": (dict(querier=False), "snooping or querier is off"),
    "small MDB": (dict(hash_max=4096), "mcast_hash_max is 4096"),
    "port without a cap": (dict(max_groups=0), "mcast_max_groups of fanv0 is 0"),
    "kernel without port caps": (dict(max_groups=None), None),
    "no program": (dict(filters=()), "anti-spoofing program (cni-fan-guard6"),
    "alias without IPv6": (dict(alias=portguard.port_alias(DUAL_IP, POD_MAC)), "has alias"),
    "no IPv6 gateway entry in the pod": (dict(gateway6_neigh=None), f"gateway {DUAL_GW6} in the pod lladdr"),
}


@pytest.mark.parametrize("case", list(DUAL_CASES))
def test_check_judges_a_dual_stack_guard(case):
    changes, phrase = DUAL_CASES[case]
    found = portguard_check.missing(_dual_state(**changes), suppress=True, spoof=True, pod_ip=f"{DUAL_IP}/24",
                                    pod_mac=POD_MAC, gateway=GW, pod_ip6=f"{DUAL_IP6}/64", gateway6=DUAL_GW6)
    if phrase is None:
        assert found == []
    else:
        assert len(found) == 1 and phrase in found[0], found


def test_check_of_an_ipv4_only_pod_ignores_the_ipv6_fields():
    state = _dual_state(alias=portguard.port_alias(DUAL_IP, POD_MAC),
                        filters=(GuardFilter("bpf", GUARD_NAME, True, 42),), bridge_neigh6=None, mdb_state=None, querier=False, max_groups=0)
    assert portguard_check.missing(state, suppress=True, spoof=True, pod_ip=DUAL_IP, pod_mac=POD_MAC, gateway=GW) == []


# == the real executables ======================================================================

# Two pods: neighbours on the bridge, so one pod's entries are not all there is.
lab = module_lab("check-guard", pods=2)


class Added:
    def __init__(self, lab, conf: dict) -> None:
        [self.pod] = lab.new_pods(1)
        self.lab, self.conf = lab, conf
        outcome = lab.call("ADD", self.pod.cid, self.pod.path, conf)
        assert outcome.code == 0, outcome
        self.result = outcome.json
        self.veth = self.result["interfaces"][0]["name"]
        self.mac = self.result["interfaces"][1]["mac"].lower()
        self.ip = self.result["ips"][0]["address"].split("/")[0]

    def check(self, server: bool | None = None):
        conf = dict(self.conf, prevResult=self.result)
        return self.lab.call("CHECK", self.pod.cid, self.pod.path, conf, server=server)

    def remove(self) -> None:
        self.lab.call("DEL", self.pod.cid, self.pod.path, self.conf)
        self.lab.delete_netns([self.pod])


@pytest.fixture
def added(lab) -> Iterator[Added]:
    pod = Added(lab, lab.conf())
    try:
        yield pod
    finally:
        pod.remove()


def state(lab, added: Added) -> dict:
    return {"node": node_state(lab), "pod": pod_state(added.pod)}


def failed_check(outcome) -> str:
    assert outcome.code != 0, outcome
    err = json.loads(outcome.stdout)  # one JSON object
    assert err["code"] == CHECK_FAILED, outcome
    assert "Traceback" not in outcome.stderr
    return err["msg"]


@pytest.mark.kernel
@pytest.mark.parametrize("server", [False, True], ids=["standalone", "server"])
def test_check_passes_on_a_pod_just_added(lab, added: Added, server: bool) -> None:
    before = state(lab, added)
    outcome = added.check(server)
    assert outcome.code == 0 and outcome.stdout.strip() == "", outcome
    assert state(lab, added) == before


def _tc_del(lab, a: Added) -> None:
    run(["tc", "-n", lab.node, "filter", "del", "dev", a.veth, "ingress", "prio", "1", "handle", "0xfc", "bpf"])


def _in_node(*argv: str) -> Callable:
    def damage(lab, a: Added) -> None:
        words = [w.format(veth=a.veth, mac=a.mac, ip=a.ip, bridge=lab.bridge_name()) for w in argv]
        run([words[0], "-n", lab.node, *words[1:]])
    return damage


def _in_pod(*argv: str) -> Callable:
    def damage(lab, a: Added) -> None:
        run([argv[0], "-n", a.pod.name, *argv[1:]])
    return damage


KERNEL_CASES = {
    "tc filter deleted": (_tc_del, "anti-spoofing program (cni-fan-guard, tc ingress filter prio 1 handle 0xfc) "
                                   "on {veth} is missing"),
    "FDB entry deleted": (_in_node("bridge", "fdb", "del", "{mac}", "dev", "{veth}", "master"),
                          "static FDB entry {mac} on {veth} is missing"),
    "bridge neighbour deleted": (_in_node("ip", "neigh", "del", "{ip}", "dev", "{bridge}"),
                                 "neighbour entry {ip} lladdr {mac} on the bridge is missing"),
    "learning on": (_in_node("ip", "link", "set", "dev", "{veth}", "type", "bridge_slave", "learning", "on"),
                    "learning is on, should be off"),
    "bcast_flood on": (_in_node("ip", "link", "set", "dev", "{veth}", "type", "bridge_slave", "bcast_flood", "on"),
                       "bcast_flood is on, should be off"),
    "proxy_arp_wifi off": (_in_node("ip", "link", "set", "dev", "{veth}", "type", "bridge_slave",
                                    "proxy_arp_wifi", "off"), "proxy_arp_wifi is off, should be on"),
    "alias removed": (_in_node("ip", "link", "set", "dev", "{veth}", "alias", "someone else's"),
                      "has alias \"someone else's\""),
    "gateway entry in the pod deleted": (_in_pod("ip", "neigh", "del", "241.1.10.1", "dev", "eth0"),
                                         "241.1.10.1 lladdr 02:fc:f1:01:0a:01 (the gateway) in the pod is missing"),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_check_names_the_missing_piece_and_changes_nothing(lab, added: Added, case: str) -> None:
    damage, phrase = KERNEL_CASES[case]
    assert added.check().code == 0
    damage(lab, added)
    before = state(lab, added)

    msg = failed_check(added.check())

    assert phrase.format(veth=added.veth, mac=added.mac, ip=added.ip) in msg, msg
    assert f"CHECK of {added.pod.cid}/eth0 failed" in msg and msg.count("port guard") == 1, msg
    assert state(lab, added) == before, "CHECK changed something"


@pytest.mark.kernel
def test_check_of_a_pod_without_the_guard_ignores_it(lab) -> None:
    """neighSuppress and antiSpoof off: nothing of the guard is expected, CHECK passes."""
    plain = Added(lab, lab.conf(neighSuppress=False, antiSpoof=False))
    try:
        assert plain.check().code == 0
    finally:
        plain.remove()


@pytest.mark.kernel
def test_check_looks_only_at_what_the_config_turns_on(lab) -> None:
    """antiSpoof alone: the program is judged, FDB and neighbour entries (there are none) are not."""
    only = Added(lab, lab.conf(neighSuppress=False))
    try:
        assert only.check().code == 0
        _tc_del(lab, only)
        msg = failed_check(only.check())
        assert "anti-spoofing program" in msg and "FDB" not in msg and "neighbour" not in msg, msg
    finally:
        only.remove()


def test_a_veth_off_the_bridge_is_named_once_and_the_program_still_judged() -> None:
    found = judge(GuardState(veth="fanv0", veth_index=7, master=None))
    assert found == ["port guard: fanv0 is not a bridge port",
                     "port guard: anti-spoofing program (cni-fan-guard, tc ingress filter prio 1 handle 0xfc) "
                     "on fanv0 is missing"], found
