"""The lab's per-peer audit (cni_fan/lab/audit.py) on canned `ip -j` output: no kernel.

What counts as per-peer state and what does not, in IPv4 and, for a
dual-stack lab, in IPv6 (a remote node's IPv6 slice and IPv6 underlay
address name it too). The audit on a real lab is in tests/test_lab.py.
"""
from __future__ import annotations

import netaddr

from cni_fan.lab import topology
from cni_fan.lab.topology import LabSpec

# -- what counts as per-peer state (canned `ip -j` output, no kernel) ---------------

ROUTES = """[
 {"dst":"241.0.0.0/8","gateway":"241.0.0.0","dev":"fan-vxlan","flags":["onlink"]},
 {"dst":"241.1.11.0/24","dev":"fan-241-1-11","protocol":"kernel","scope":"link","prefsrc":"241.1.11.1"},
 {"dst":"198.18.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"198.18.1.11"},
 {"type":"local","dst":"241.1.11.1","dev":"fan-241-1-11","table":"local"},
 %s
]"""
NEIGH = """[
 {"dst":"198.18.2.12","dev":"eth0","lladdr":"02:00:00:00:00:02","state":["REACHABLE"]},
 {"dst":"241.0.0.0","dev":"fan-vxlan","lladdr":"02:fa:f1:00:00:01","state":["PERMANENT"]},
 {"dst":"241.1.11.2","dev":"fan-241-1-11","lladdr":"02:00:00:00:00:07","state":["REACHABLE"]},
 {"dst":"fe80::1","dev":"eth0","lladdr":"02:00:00:00:00:02","state":["STALE"]},
 %s
]"""
FDB = """[
 {"mac":"33:33:00:00:00:01","ifname":"eth0","flags":["self"],"state":"permanent"},
 %s
]"""
LINKS = """[
 {"ifname":"eth0","linkinfo":{"info_kind":"veth"}},
 {"ifname":"fan-vxlan","linkinfo":{"info_kind":"vxlan","info_data":{"id":241,"port":4789,"learning":false}}},
 %s
]"""


def _canned(monkeypatch, routes: list[str], neigh: list[str], fdb: list[str], links: list[str],
            routes6: list[str] = ()) -> None:
    from cni_fan.lab import audit, ipjson

    texts = {"route": ROUTES % ",".join(routes or ['{"dst":"127.0.0.0/8","dev":"lo","table":"local"}']),
             "route6": "[" + ",".join(routes6) + "]",
             "neigh": NEIGH % ",".join(neigh or ['{"dst":"127.0.0.2","dev":"lo","state":["NOARP"]}']),
             "fdb": FDB % ",".join(fdb or ['{"mac":"01:00:5e:00:00:01","ifname":"eth0","state":"permanent"}']),
             "link": LINKS % ",".join(links or ['{"ifname":"lo","linkinfo":null}']), "nexthop": "[]"}

    def fake(ns, *args, tool="ip"):
        kind = next(k for k in ("route", "neigh", "fdb", "link", "nexthop") if k in args)
        return ipjson.parse_ip_json(texts["route6" if kind == "route" and "-6" in args else kind])

    monkeypatch.setattr(audit, "ip_json", fake)


def test_flannel_style_state_is_counted_and_the_fan_style_is_not(monkeypatch) -> None:
    from cni_fan.lab.audit import peer_state

    spec = LabSpec(prefix="tu-", nodes=3)
    _canned(monkeypatch, [], [], [], [])
    clean = peer_state(spec, spec.node(1))
    assert clean.ok and clean.counted == {} and clean.static == {}
    assert clean.underlay_neigh == ["198.18.2.12 dev eth0 REACHABLE"]  # reported, not counted

    _canned(monkeypatch,
            ['{"dst":"241.2.12.0/24","gateway":"241.2.12.1","dev":"fan-vxlan","flags":["onlink"]}',
             # iproute2 prints "dst" twice for an encap route; the first is the route's
             '{"dst":"241.3.13.0/24","encap":"ip","id":241,"src":"0.0.0.0","dst":"198.18.3.13","dev":"fan-vxlan"}',
             '{"dst":"241.0.0.0/8","gateway":"198.18.2.12","dev":"eth0","table":"7"}'],
            ['{"dst":"241.2.12.1","dev":"fan-vxlan","lladdr":"02:00:00:00:00:03","state":["PERMANENT"]}',
             '{"dst":"198.18.3.13","dev":"fan-241-1-11","state":["FAILED"]}'],
            ['{"mac":"00:00:00:00:00:00","ifname":"fan-vxlan","dst":"198.18.3.13","state":"permanent"}'],
            ['{"ifname":"p2p","linkinfo":{"info_kind":"vxlan","info_data":{"id":9,"remote":"198.18.2.12"}}}'])
    dirty = peer_state(spec, spec.node(1))
    assert not dirty.ok
    assert dirty.counted["routes"] == [
        "n2: 241.2.12.0/24 dev fan-vxlan table main via 241.2.12.1",
        "n2: 241.0.0.0/8 dev eth0 table 7 via 198.18.2.12",
        "n3: 241.3.13.0/24 dev fan-vxlan table main encap dst 198.18.3.13"]
    assert dirty.counted["neighbours"] == ["n2: 241.2.12.1 dev fan-vxlan PERMANENT",
                                           "n3: 198.18.3.13 dev fan-241-1-11 FAILED"]
    assert dirty.counted["fdb"] == ["n3: 00:00:00:00:00:00 dev fan-vxlan dst 198.18.3.13"]
    assert dirty.counted["tunnels"] == ["n2: p2p (vxlan) remote 198.18.2.12"]


def test_a_table_for_every_possible_host_is_static_not_per_peer(monkeypatch) -> None:
    from cni_fan.lab.audit import peer_state

    spec = LabSpec(prefix="tu-", nodes=2)
    hosts = [("241.2.12", "198.18.2.12"), ("241.254.254", topology.PHANTOM_HOST), ("241.9.9", "198.18.9.9")]
    _canned(monkeypatch,
            [f'{{"dst":"{s}.0/24","gateway":"{s}.1","dev":"fan-vxlan","flags":["onlink"]}}' for s, _ in hosts],
            [f'{{"dst":"{s}.1","dev":"fan-vxlan","lladdr":"02:00:00:00:00:03","state":["PERMANENT"]}}'
             for s, _ in hosts],
            [f'{{"mac":"02:00:00:00:00:03","ifname":"fan-vxlan","dst":"{u}","state":"permanent"}}' for _, u in hosts],
            [])
    state = peer_state(spec, spec.node(1))
    assert state.ok
    assert state.static == {"routes": 1, "neighbours": 1, "fdb": 1}


def test_ipv6_per_peer_state_is_counted_and_the_fan_style_is_not(monkeypatch) -> None:
    """Dual-stack: a remote node's IPv6 slice and IPv6 underlay address name it too."""
    from cni_fan.lab.audit import peer_state

    spec = LabSpec(prefix="tu-", nodes=3, overlay6="fd00:50::/48")
    n2, n3 = spec.node(2), spec.node(3)
    assert (str(n2.slice6), str(n3.address6)) == ("fd00:50:0:20c::/64", "fd00:198:18::3:d")
    fan_style = ['{"dst":"fd00:50::/48","gateway":"fd00:50::","dev":"fan-vxlan","flags":["onlink"]}',
                 '{"dst":"fd00:50:0:10b::/64","dev":"fan-241-1-11","protocol":"kernel"}',
                 '{"dst":"fd00:198:18::/64","dev":"eth0","protocol":"kernel"}',
                 '{"dst":"fe80::/64","dev":"eth0","protocol":"kernel"}']
    underlay_nd = '{"dst":"fd00:198:18::2:c","dev":"eth0","lladdr":"02:00:00:00:00:02","state":["REACHABLE"]}'
    _canned(monkeypatch, [], [underlay_nd], [], [], routes6=fan_style)
    clean = peer_state(spec, spec.node(1))
    assert clean.ok and clean.entries["routes6"] == 4
    assert "fd00:198:18::2:c dev eth0 REACHABLE" in clean.underlay_neigh   # neighbour discovery: reported only

    _canned(monkeypatch, [],
            ['{"dst":"fd00:50:0:20c::1","dev":"fan-vxlan","lladdr":"02:00:00:00:00:03","state":["PERMANENT"]}',
             '{"dst":"fd00:198:18::3:d","dev":"fan-241-1-11","state":["FAILED"]}'], [], [],
            routes6=[*fan_style, '{"dst":"fd00:50:0:20c::/64","gateway":"fd00:50:0:20c::1","dev":"fan-vxlan"}',
                     '{"dst":"fd00:50:0:30d::5","dev":"fan-vxlan","table":"7"}',
                     '{"dst":"fd00:50::/48","gateway":"fd00:198:18::2:c","dev":"eth0","table":"8"}'])
    dirty = peer_state(spec, spec.node(1))
    assert not dirty.ok
    assert dirty.counted["routes6"] == ["n2: fd00:50:0:20c::/64 dev fan-vxlan table main via fd00:50:0:20c::1",
                                        "n2: fd00:50::/48 dev eth0 table 8 via fd00:198:18::2:c",
                                        "n3: fd00:50:0:30d::5 dev fan-vxlan table 7"]
    assert dirty.counted["neighbours"] == ["n2: fd00:50:0:20c::1 dev fan-vxlan PERMANENT",
                                           "n3: fd00:198:18::3:d dev fan-241-1-11 FAILED"]


def test_an_ipv6_table_for_every_possible_host_is_static_not_per_peer(monkeypatch) -> None:
    from cni_fan.lab.audit import peer_state

    spec = LabSpec(prefix="tu-", nodes=2, overlay6="fd00:50::/48")
    fan6 = spec.fan6
    slices = [fan6.slice_for(netaddr.IPAddress(h)) for h in ("198.18.2.12", topology.PHANTOM_HOST, "198.18.9.9")]
    _canned(monkeypatch, [], [], [], [],
            routes6=[f'{{"dst":"{s}","gateway":"{s.network + 1}","dev":"fan-vxlan"}}' for s in slices])
    state = peer_state(spec, spec.node(1))
    assert state.ok and state.static == {"routes6": 1}
