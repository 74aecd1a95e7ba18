"""The per-peer audit: does a node hold kernel state about individual peers?

The Fan's promise is constant per-node state: a node knows the overlay and
its own slice, never the other nodes. `peer_state` reads a node's routes
(IPv4 and IPv6), nexthops, neighbours (both families), FDB and links
(iproute2's JSON) and sorts what names a remote node into counted per-peer
state, tables built for every possible host (not counted) and ordinary
underlay ARP and neighbour discovery (reported). In a dual-stack lab a
remote node is also named by its IPv6 slice and its IPv6 underlay address.
"""
from __future__ import annotations

import concurrent.futures
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import netaddr

from cni_fan.lab.ipjson import ip_json
from cni_fan.lab.topology import NODE_UNDERLAY_IF, PHANTOM_HOST, PHANTOM_HOST6, LabSpec, Node

# The name the audit gives the phantom host (an underlay address where no node is).
PHANTOM = "phantom"


def _v4(text: Any) -> tuple[int, int] | None:
    """(address as int, prefix length) of "a.b.c.d" or "a.b.c.d/n"; None otherwise."""
    if not isinstance(text, str) or not text or text == "default" or ":" in text:
        return None
    address, _, length = text.partition("/")
    try:
        value = struct.unpack("!I", socket.inet_aton(address))[0]
        bits = int(length) if length else 32
    except (OSError, ValueError):
        return None
    return (value, bits) if 0 <= bits <= 32 and address.count(".") == 3 else None


def _v6(text: Any) -> tuple[int, int] | None:
    """(address as int, prefix length) of an IPv6 address or prefix (a zone
    index dropped); None otherwise."""
    if not isinstance(text, str) or ":" not in text:
        return None
    address, _, length = text.partition("/")
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address.split("%")[0]), "big")
        bits = int(length) if length else 128
    except (OSError, ValueError):
        return None
    return (value, bits) if 0 <= bits <= 128 else None


class PeerIndex:
    """Which remote node (or the phantom host) an address or prefix names:
    its underlay address, or anything inside its slice. One dict look-up
    per entry, so the 65,533-entry tables of `fanmap: routes` stay cheap."""

    def __init__(self, spec: LabSpec, node: Node) -> None:
        fan = spec.fan if spec.has_ipv4 else None  # an IPv6-only lab: IPv6 hosts and slices only
        self.slice_len = fan.slice_prefixlen if fan is not None else 33
        self.by_address: dict[int, str] = {}
        self.by_slice: dict[int, str] = {}
        self.address_of: dict[str, str] = {}
        fan6 = spec.fan6
        self.slice6_len = fan6.slice_prefixlen if fan6 is not None else 129
        self.by_address6: dict[int, str] = {}
        self.by_slice6: dict[int, str] = {}
        remotes = [n for n in spec.all_nodes if n.index != node.index]
        hosts = [(n.short, n.address) for n in remotes]
        hosts.append((PHANTOM, netaddr.IPAddress(PHANTOM_HOST if fan is not None else PHANTOM_HOST6)))
        for name, address in hosts:
            if fan is not None:
                self.by_address[int(address)] = name
                self.by_slice[int(fan.slice_for(address).network) >> (32 - self.slice_len)] = name
            else:
                self.by_address6[int(address)] = name
            self.address_of[name] = str(address)
            if fan6 is not None:
                self.by_slice6[int(fan6.slice_for(address).network) >> (128 - self.slice6_len)] = name
        for n in remotes:
            if n.address6 is not None:
                self.by_address6[int(n.address6)] = n.short

    def peer(self, text: Any) -> str | None:
        """The remote node an address or prefix names (its underlay address or
        inside its slice, in either family)."""
        parsed = _v4(text)
        if parsed is None:
            return self._peer6(text)
        value, bits = parsed
        if bits == 32 and value in self.by_address:
            return self.by_address[value]
        if bits >= self.slice_len:
            return self.by_slice.get(value >> (32 - self.slice_len))
        return None

    def _peer6(self, text: Any) -> str | None:
        parsed = _v6(text)
        if parsed is None:
            return None
        value, bits = parsed
        if bits == 128 and value in self.by_address6:
            return self.by_address6[value]
        if bits >= self.slice6_len:
            return self.by_slice6.get(value >> (128 - self.slice6_len))
        return None

    def underlay_peer(self, text: Any) -> str | None:
        """The remote node whose underlay address (IPv4, or IPv6 in a dual-stack
        lab) this is (a bare address or a /32 or /128)."""
        parsed = _v4(text)
        if parsed is not None:
            return self.by_address.get(parsed[0]) if parsed[1] == 32 else None
        parsed = _v6(text)
        return self.by_address6.get(parsed[0]) if parsed and parsed[1] == 128 else None


@dataclass
class NodeState:
    """What the audit found on one node; `ok` when no per-peer state is counted."""
    node: str
    counted: dict[str, list[str]] = field(default_factory=dict)   # per-peer state, by kind
    static: dict[str, int] = field(default_factory=dict)          # kind -> entries for remote nodes, also held for the phantom
    underlay_neigh: list[str] = field(default_factory=list)       # ordinary L2 state: reported, not counted
    entries: dict[str, int] = field(default_factory=dict)         # sizes of what was read

    @property
    def ok(self) -> bool:
        return not any(self.counted.values())


def peer_state(spec: LabSpec, node: Node) -> NodeState:
    """Look for per-peer overlay state on `node`.

    Per-peer state is kernel state about one remote node R (underlay address
    U_R, slice S_R; in a dual-stack lab also its IPv6 slice and IPv6
    underlay address, counted the same way) that the node holds because R
    exists. Counted, in the node's namespace:

    - routes (every table, IPv4 as `routes`, IPv6 as `routes6`) whose
      destination lies inside S_R (a prefix at least as long as the
      slice's), or whose gateway, next hop or encap destination is U_R or
      inside S_R; nexthop objects likewise;
    - neighbour entries (every state, `nud all`, both families) for U_R or
      any address in S_R on any device but the node's underlay interface
      (so: the tunnel device, the fan bridge, anything else);
    - FDB entries whose VXLAN destination (`dst`) is U_R, on any device;
    - tunnel devices whose fixed `remote` is U_R.

    Not counted: the overlay-wide route and its next hop (they name no
    node), the node's own slice, and neighbour entries for U_R on the
    underlay interface (ordinary ARP of the underlay; reported under
    `underlay_neigh`).

    A table built for every possible host is not per-peer: if the node holds
    the same kind of state for an underlay address where no node is
    (PHANTOM_HOST), that kind is reported under `static` (with how many
    entries name remote nodes), not counted. Example: `fanmap: routes`,
    which installs a route, a neighbour and an FDB entry per possible host.
    """
    index = PeerIndex(spec, node)
    found: dict[str, dict[str, list[str]]] = {}  # kind -> peer -> entries
    result = NodeState(node.short)

    def note(kind: str, peer: str, text: str) -> None:
        found.setdefault(kind, {}).setdefault(peer, []).append(text)

    dumps = {"routes": ("-4", "route", "show", "table", "all"), "routes6": ("-6", "route", "show", "table", "all"),
             "nexthops": ("nexthop", "show"),
             "neighbours": ("neigh", "show", "nud", "all"), "fdb": ("fdb", "show"), "links": ("-d", "link", "show")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(dumps)) as pool:
        futures = {kind: pool.submit(ip_json, node.netns, *args, tool="bridge" if kind == "fdb" else "ip")
                   for kind, args in dumps.items()}
        tables = {kind: f.result() for kind, f in futures.items()}
    result.entries = {kind: len(rows) for kind, rows in tables.items()}
    for kind in ("routes", "routes6"):
        for route in tables[kind]:
            dst, gateway, encap_dst = route.get("dst"), route.get("gateway"), route.get("encap_dst")
            hops = [hop.get("gateway") for hop in route.get("nexthops") or [] if isinstance(hop, dict)]
            peer = next(filter(None, map(index.peer, (dst, gateway, encap_dst, *hops))), None)
            if peer:
                note(kind, peer, f"{dst} dev {route.get('dev')} table {route.get('table') or 'main'}"
                     + (f" via {gateway}" if gateway else "") + (f" encap dst {encap_dst}" if encap_dst else ""))
    for hop in tables["nexthops"]:
        peer = next(filter(None, map(index.peer, (hop.get("gateway"), hop.get("encap_dst")))), None)
        if peer:
            note("nexthops", peer, f"nexthop id {hop.get('id')} via {hop.get('gateway')}")
    for entry in tables["neighbours"]:
        dst, dev = entry.get("dst"), entry.get("dev")
        peer = index.peer(dst)
        if not peer:
            continue
        text = f"{dst} dev {dev} {' '.join(entry.get('state') or [])}".rstrip()
        if dev == NODE_UNDERLAY_IF and index.underlay_peer(dst):
            if peer != PHANTOM:
                result.underlay_neigh.append(text)
            continue
        note("neighbours", peer, text)
    for entry in tables["fdb"]:
        peer = index.underlay_peer(entry.get("dst"))
        if peer:
            note("fdb", peer, f"{entry.get('mac')} dev {entry.get('ifname')} dst {entry.get('dst')}")
    for link in tables["links"]:
        info = link.get("linkinfo") or {}
        data = info.get("info_data") if isinstance(info, dict) else None
        peer = index.underlay_peer(data.get("remote")) if isinstance(data, dict) else None
        if peer:
            note("tunnels", peer, f"{link.get('ifname')} ({info.get('info_kind')}) remote {index.address_of[peer]}")
    for kind, by_peer in found.items():
        entries = [f"{name}: {text}" for name, texts in sorted(by_peer.items()) if name != PHANTOM for text in texts]
        if not entries:
            continue
        if PHANTOM in by_peer:
            result.static[kind] = len(entries)
        else:
            result.counted[kind] = entries
    return result


