"""`cni-fan node run`, the node agent, on real network namespaces (kernel tests).

A lab of its own (harness/nodelab.py, prefix `tna<hex>`): two nodes (198.18.1.11
and 198.18.2.12 on 198.18.0.0/16, overlay 241.0.0.0/8) with a pod each,
plus a node that starts without its underlay address.

Covered: repair under traffic (the tunnel, the tc filter and qdisc, the
overlay route and the permanent neighbour deleted one at a time; traffic
must resume within 5 s each time, the product's functional deadline, not
a benchmark); a changed conflist is applied (and existing pods keep their
traffic); `--cni-conf-dir` gets the conflist only once the node is up
(/healthz 503 until then); /metrics; SIGTERM under traffic (no packet
lost across an agent stop and restart, exit code 0, datapath left in
place).
"""
from __future__ import annotations

import signal
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import nodelab
from cni_fan.lab.probes import Pinger
from cni_fan.plan import shared_tunnel_mac

pytestmark = pytest.mark.kernel

PREFIX = nodelab.new_prefix("na")
REPAIR_DEADLINE = 5.0  # seconds: the agent repairs within ~1 s at --interval 1
NEXT_HOP = "241.0.0.0"
MAC = shared_tunnel_mac(0xF10000)


lab = nodelab.lab_fixture(PREFIX)


@pytest.fixture(scope="module")
def cluster(lab):
    """Two nodes up (by `node up`), one pod on each."""
    n1, n2, p1, p2 = nodelab.two_nodes_up(lab)
    assert p1.reaches(p2.address), p1.ping(p2.address).stdout
    return n1, n2, p1, p2


@pytest.fixture
def agent1(cluster):
    """The agent on node 1, stopped (SIGTERM, then SIGKILL) after the test."""
    n1 = cluster[0]
    agent = n1.start_agent("--interval", "1")
    try:
        agent.wait_health(200)
        yield agent
    finally:
        agent.stop()
        agent.kill()


def metrics(agent: nodelab.Agent) -> dict[str, list]:
    code, text = agent.http("/metrics")
    assert code == 200, text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(families: dict[str, list], name: str, **labels: str) -> float:
    for s in families.get(name.removesuffix("_total"), []) + families.get(name, []):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels} in {sorted(families)}")


# -- repair ---------------------------------------------------------------------------------

# (what, how to break it, how to see it is back: argv and a substring of its output)
BREAKAGES = [
    ("tunnel", ["ip", "link", "del", "fan-vxlan"], (["ip", "-d", "link", "show", "fan-vxlan"], "vxlan id")),
    ("tc filter", ["tc", "filter", "del", "dev", "fan-vxlan", "egress"],
     (["tc", "filter", "show", "dev", "fan-vxlan", "egress"], "cni-fan direct-action")),
    ("tc qdisc", ["tc", "qdisc", "del", "dev", "fan-vxlan", "clsact"],
     (["tc", "filter", "show", "dev", "fan-vxlan", "egress"], "cni-fan direct-action")),
    ("overlay route", ["ip", "route", "del", "241.0.0.0/8"],
     (["ip", "route", "show", "241.0.0.0/8"], "via 241.0.0.0 dev fan-vxlan")),
    ("neighbour", ["ip", "neigh", "del", NEXT_HOP, "dev", "fan-vxlan"],
     (["ip", "neigh", "show", NEXT_HOP, "dev", "fan-vxlan"], f"lladdr {MAC} PERMANENT")),
]


def test_agent_repairs_the_datapath_under_traffic(cluster, agent1) -> None:
    n1, _n2, p1, p2 = cluster
    pinger = Pinger(p1.ns.path, p2.address, interval=0.05)
    resumed: dict[str, float] = {}
    try:
        assert pinger.wait_replies(5), "no replies before anything was broken"
        repairs_before = sample(metrics(agent1), "cni_fan_repairs_total")
        for what, argv, (check, want) in BREAKAGES:
            assert want in n1.ns.run(*check).stdout
            n1.ns.run(*argv)
            broken_at = time.time()
            # Replies still in flight when the command returned are not a resumption.
            first = pinger.first_reply_after(broken_at + 0.01, timeout=REPAIR_DEADLINE + 3)
            assert first is not None, f"{what}: traffic did not resume:\n{agent1.log[-2000:]}"
            resumed[what] = first - broken_at
            assert nodelab.wait_until(lambda: want in n1.ns.run(*check, check=False).stdout, timeout=3), \
                f"{what}: not back:\n{agent1.log[-2000:]}"
        # A deletion that lands between a round's check and its (idempotent)
        # re-apply is fixed without being counted, so not every one is.
        assert sample(metrics(agent1), "cni_fan_repairs_total") > repairs_before
        assert "repaired: " in agent1.log
        assert n1.show()["up"] is True
    finally:
        pinger.stop()
    slow = {what: round(t, 2) for what, t in resumed.items() if t > REPAIR_DEADLINE}
    assert not slow, f"traffic resumed later than {REPAIR_DEADLINE} s: {slow} (all: {resumed})"
    assert p2.reaches(p1.address)
    print("resumed after (s):", {what: round(t, 2) for what, t in resumed.items()})


def test_agent_repairs_a_pods_port_guard(cluster) -> None:
    """Someone removes a pod's anti-spoofing program and FDB entry and turns flooding back on its port."""
    n1, _n2, p1, p2 = cluster
    agent = n1.start_agent("--interval", "0.5", "--guard-interval", "0.5")
    try:
        agent.wait_health(200)
        links = json.loads(n1.ns.run("ip", "-j", "-d", "link", "show").stdout)
        [port] = [link for link in links if (link.get("ifalias") or "").startswith(f"cni-fan {p1.address} ")]
        veth, mac = port["ifname"], port["ifalias"].split()[2]
        guard = (["tc", "filter", "show", "dev", veth, "ingress"], "cni-fan-guard")
        fdb = (["bridge", "fdb", "show", "dev", veth], f"{mac} master")
        assert guard[1] in n1.ns.run(*guard[0]).stdout and fdb[1] in n1.ns.run(*fdb[0]).stdout
        before = sample(metrics(agent), "cni_fan_repairs_total")
        n1.ns.run("tc", "filter", "del", "dev", veth, "ingress")
        n1.ns.run("bridge", "fdb", "del", mac, "dev", veth, "master")
        n1.ns.run("ip", "link", "set", veth, "type", "bridge_slave", "flood", "on", "learning", "on")

        def back() -> bool:
            flags = json.loads(n1.ns.run("ip", "-j", "-d", "link", "show", veth).stdout)[0]["linkinfo"]["info_slave_data"]
            return (guard[1] in n1.ns.run(*guard[0]).stdout and fdb[1] in n1.ns.run(*fdb[0]).stdout
                    and flags["flood"] is False and flags["learning"] is False)

        assert nodelab.wait_until(back, timeout=REPAIR_DEADLINE), f"guard not repaired:\n{agent.log[-2000:]}"
        assert f"repaired port guard: {veth} ({p1.address})" in agent.log
        assert nodelab.wait_until(lambda: sample(metrics(agent), "cni_fan_repairs_total") >= before + 3, timeout=3)
        assert p1.reaches(p2.address)
        # Repaired means repaired: nothing more to do on the next sweeps.
        logged = agent.log.count("repaired port guard")
        time.sleep(1.5)
        assert agent.log.count("repaired port guard") == logged
    finally:
        agent.stop()
        agent.kill()


# -- configuration --------------------------------------------------------------------------

def test_conflist_is_installed_only_once_the_node_is_up(lab) -> None:
    node = lab.add_node(None, write_conflist=False)
    node.cidr = "198.18.3.13/16"
    node.write_conflist()
    kubelet_dir = node.dir / "kubelet-net.d"
    agent = node.start_agent("--interval", "1", "--cni-conf-dir", kubelet_dir)
    try:
        code, body = 0, ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and code != 503:
            assert agent.alive(), agent.log
            code, body = agent.http("/healthz")
            time.sleep(0.1)
        assert code == 503, f"/healthz without an underlay address: {code} {body}\n{agent.log[-2000:]}"
        time.sleep(1.5)  # more reconcile rounds: still nothing installed
        assert not kubelet_dir.exists() or not any(kubelet_dir.iterdir())
        assert agent.http("/healthz")[0] == 503
        assert sample(metrics(agent), "cni_fan_datapath_up") == 0

        node.ns.ip("addr", "add", node.cidr, "dev", "eth0")
        installed = kubelet_dir / node.conflist.name
        assert nodelab.wait_until(installed.exists, timeout=10), agent.log[-2000:]
        assert installed.read_bytes() == node.conflist.read_bytes()
        assert oct(installed.stat().st_mode & 0o777) == "0o644"
        assert agent.http("/healthz")[0] == 200
        assert sample(metrics(agent), "cni_fan_datapath_up") == 1
        assert node.show()["up"] is True
        assert [p.name for p in kubelet_dir.iterdir()] == [installed.name], "temporary files left behind"
    finally:
        assert agent.stop() == 0
        agent.kill()
        node.down(check=False)


def test_metrics(cluster, agent1) -> None:
    _n1, _n2, p1, p2 = cluster
    assert p1.reaches(p2.address, count=3)
    families = metrics(agent1)
    assert sample(families, "cni_fan_datapath_up") == 1
    assert sample(families, "cni_fan_slice_capacity") == 253
    pods = sample(families, "cni_fan_pods")
    assert pods == len(cluster[0].show()["pods"]) >= 1
    assert sample(families, "cni_fan_slice_use_ratio") == pytest.approx(pods / 253)
    for verdict in ("passed", "encapsulated", "dropped", "punted"):
        sample(families, "cni_fan_program_packets_total", verdict=verdict)
    assert sample(families, "cni_fan_program_packets_total", verdict="encapsulated") >= 3
    sample(families, "cni_fan_foreign_tunnel_dropped_packets_total")
    assert agent1.http("/nonexistent")[0] == 404


# -- SIGTERM ---------------------------------------------------------------------------------

def test_sigterm_under_traffic_loses_nothing_and_leaves_the_datapath(cluster) -> None:
    n1, n2, p1, p2 = cluster
    first = n1.start_agent("--interval", "1")
    pinger = None
    try:
        first.wait_health(200)
        pinger = Pinger(p1.ns.path, p2.address, interval=0.02)
        assert pinger.wait_replies(20), "no replies before the SIGTERM"
        assert first.stop(signal.SIGTERM) == 0, first.log[-2000:]
        assert "the datapath stays in place" in first.log
        # Nobody runs the node now: the datapath is still there and still carries traffic.
        info = n1.show()
        assert info["up"] is True and info["program"] is not None, info["problems"]
        seen = len(pinger.replies)
        assert nodelab.wait_until(lambda: len(pinger.replies) >= seen + 10, timeout=3)

        second = n1.start_agent("--interval", "1")
        second.wait_health(200)
        time.sleep(1.5)  # a reconcile round or two under traffic
        assert second.stop(signal.SIGTERM) == 0, second.log[-2000:]
        time.sleep(0.3)
        transmitted, received = pinger.stop()
        missing = pinger.missing()
        pinger = None
    finally:
        if pinger is not None:
            pinger.stop()
        first.kill()
    assert received >= 100, (transmitted, received)
    assert transmitted - received <= 1  # at most one in flight when the pinger stopped
    assert missing == [], f"{len(missing)} of {transmitted} packets lost across the restart: icmp_seq {missing[:20]}"
    assert n1.show()["up"] is True
    assert p1.reaches(p2.address)


# -- configuration change (last: a failure here would break the pods of the tests above) --

def test_changed_conflist_is_applied_and_pods_keep_their_traffic(cluster, agent1) -> None:
    n1, n2, p1, p2 = cluster
    try:
        n1.write_conflist(mtu=1400)
        applied = nodelab.wait_until(
            lambda: (n1.ns.link("fan-vxlan") or {}).get("mtu") == 1400
            and (n1.ns.link("fan-241-1-11") or {}).get("mtu") == 1400, timeout=5)
        assert applied, f"mtu 1400 not applied:\n{agent1.log[-2000:]}"
        agent1.wait_health(200, timeout=5)
        assert n1.show()["mtu"] == 1400 and n1.show()["up"] is True
        # Pods that were there before keep their traffic, both ways.
        assert p1.reaches(p2.address, count=3), f"existing pod lost its traffic:\n{agent1.log[-2000:]}"
        assert p2.reaches(p1.address, count=3)
        # A new pod gets the new MTU, and full-size packets fit.
        p3 = n1.add_pod()
        assert p3.mtu == 1400
        assert p3.reaches(p2.address, size=1400 - 28, dont_fragment=True)
        assert p3.reaches(p1.address)
    finally:
        n1.write_conflist()
        assert nodelab.wait_until(lambda: (n1.ns.link("fan-vxlan") or {}).get("mtu") == 1450, timeout=5)
    assert nodelab.wait_until(lambda: p1.reaches(p2.address), timeout=5)
