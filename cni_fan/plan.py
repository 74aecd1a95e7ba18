"""The node plan: what one node's part of the Fan is, computed once.

Pure: from the config and the node's underlay address (with its link's
name, index and MTU) it derives every name, address, MAC and size the
node uses. The plugin, the IPAM, the node agent, `node show` and the
STATUS probe read it; nothing else derives a bridge name, an MTU or an
address of the node, so they cannot disagree. The same inputs always give
the same plan, so `node up` is idempotent, `node down` removes exactly
what `up` made, and every node derives the shared values (tunnel MAC,
next hop) without talking to any other node.

Addresses are per family: `SlicePlan` holds one family's slice, gateway,
pod range and overlay route (`NodePlan.ipv4`, and `NodePlan.ipv6` when the
config has `overlay6`); what the families share (bridge, tunnel, MTU) is
in `NodePlan` itself. Both slices are named by the node's underlay
address, so a pod's two addresses share their container index. In an
IPv6-only cluster (an IPv6 underlay) `ipv4` is None and the IPv6 slice is
named by the node's IPv6 underlay address.

The node's underlay *segment* (`NodePlan.segment`) is the connected prefix
of its underlay address, as the adapter found it on the interface: the
peers the node reaches without a router. With `directRouting` the eBPF
program sends packets for nodes in it unencapsulated (docs/datapath.md).
"""
from __future__ import annotations

from typing import NamedTuple

import netaddr

from cni_fan.cni.errors import CniError, INVALID_CONFIG
from cni_fan.config import MIN_IPV6_MTU, FanConfig
from cni_fan.fanmap import FanMap

TUNNEL_NAMES = {"vxlan": "fan-vxlan", "ipip": "fan-ipip"}
MIN_IPV4_MTU = 576  # RFC 791: every IPv4 host must accept datagrams this large


def shared_tunnel_mac(vni: int) -> str:
    """Every node's tunnel device carries this MAC (locally administered).

    The program sends inner frames to it, so no node needs a neighbour or
    FDB entry per peer.
    """
    return "02:fa:%02x:%02x:%02x:01" % ((vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF)


def inner_source_mac(vni: int) -> str:
    """Differs from the shared MAC: VXLAN drops frames from its own MAC."""
    return "02:fa:%02x:%02x:%02x:02" % ((vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF)


def peer_mac(host: netaddr.IPAddress) -> str:
    """The tunnel MAC of the node at `host` in `routes` mode (unique per node)."""
    return "02:fb:" + ":".join(f"{b:02x}" for b in int(host).to_bytes(4, "big"))


def bridge_mac_for(gateway: str | netaddr.IPAddress) -> str:
    """The fan bridge's MAC: locally administered, derived from the gateway
    (for an IPv6 one, the last group of its /64 prefix and of its interface
    identifier: fd50:0:0:1c::1 gives 02:fc:00:1c:00:01).

    Fixed, so the pods' neighbour entry for the gateway never changes when
    the bridge's ports come and go (a bridge otherwise takes its lowest port's).
    """
    value = int(netaddr.IPAddress(str(gateway)))
    low = value if value <= 0xFFFFFFFF else ((value >> 64) & 0xFFFF) << 16 | (value & 0xFFFF)
    return "02:fc:" + ":".join(f"{b:02x}" for b in low.to_bytes(4, "big"))


def bridge_name_for(slice_net: netaddr.IPNetwork) -> str:
    """`fan-250-0-28` for 250.0.28.0/24: the slice's significant octets.

    IFNAMSIZ allows 15 characters; slices whose dotted name is longer (a /28
    slice needs four octets) get the slice's network address in hex instead.
    An IPv6 slice (an IPv6-only node) is `fan6-` and the low 40 of its
    significant bits in hex: `fan6-1c` for fd50:0:0:1c::/64.
    """
    if slice_net.version == 6:
        significant = int(slice_net.network) >> (128 - slice_net.prefixlen)
        return f"fan6-{significant & ((1 << 40) - 1):x}"
    octets = str(slice_net.network).split(".")
    significant = max(1, (slice_net.prefixlen + 7) // 8)
    name = "fan-" + "-".join(octets[:significant])
    if len(name) <= 15:
        return name
    return f"fan-{int(slice_net.network):08x}"


def bridge_name(cfg: FanConfig, slice_net: netaddr.IPNetwork) -> str:
    """The fan bridge of the node that owns `slice_net`: the configured name or the slice's.

    For callers that know a pod's slice but not the node's underlay address
    (DEL after the node lost it); everyone else reads `NodePlan.bridge`.
    """
    return cfg.bridge or bridge_name_for(slice_net)


def pod_mtu(cfg: FanConfig, underlay_ifname: str, underlay_mtu: int) -> int:
    """The configured MTU, or the underlay's minus what encapsulation adds
    (more over an IPv6 underlay); never below 576, nor below 1280 when pods
    have IPv6 addresses."""
    mtu = cfg.mtu or underlay_mtu - cfg.encap_overhead
    family, minimum = ("IPv4", MIN_IPV4_MTU) if cfg.params.fanmap6 is None else ("IPv6", MIN_IPV6_MTU)
    if mtu < minimum:
        raise CniError(INVALID_CONFIG, f"pod MTU would be {mtu}, below the {family} minimum of {minimum}",
                       f"underlay {underlay_ifname} has MTU {underlay_mtu}; set \"mtu\"")
    return mtu


def partner_address(address: netaddr.IPAddress | str, source: FanMap, target: FanMap) -> netaddr.IPAddress:
    """The same pod's address in the other family: same node, same container index.

    Needs no underlay address of this node (the address names its node), so
    DEL, CHECK and GC can pair addresses on a node that lost its own.
    Raises FanMapError for an address that is not a pod's.
    """
    host = source.underlay_host_for(address)
    return target.pod_address(host, source.pod_index(host, address))


class SlicePlan(NamedTuple):
    """One address family's part of the node: its slice of the overlay and what hangs off it."""
    fanmap: FanMap
    host: netaddr.IPAddress            # this node's underlay address
    slice: netaddr.IPNetwork
    gateway: netaddr.IPAddress         # the bridge's address, the pods' default gateway
    first_pod: netaddr.IPAddress
    last_pod: netaddr.IPAddress
    next_hop: netaddr.IPAddress        # on-link next hop of the overlay route

    @property
    def overlay(self) -> netaddr.IPNetwork:
        return self.fanmap.overlay

    @property
    def underlay(self) -> netaddr.IPNetwork:
        return self.fanmap.underlay

    @property
    def overlay_route(self) -> str:
        return str(self.fanmap.overlay.cidr)

    @property
    def version(self) -> int:
        return self.slice.version

    @property
    def tunnel_address(self) -> netaddr.IPNetwork:
        """The gateway as a host route on the tunnel (/32, /128: no prefix
        route): traffic masqueraded into the tunnel (NodePort, host-network
        clients) then gets an overlay source, which the peer's reverse-path
        filter accepts."""
        return netaddr.IPNetwork(f"{self.gateway}/{32 if self.version == 4 else 128}")

    def pod_address(self, index: int) -> netaddr.IPAddress:
        """The pod at container index `index` (0 is the first pod); an index names the same offset in both families."""
        return self.fanmap.pod_address(self.host, index)

    def pod_index(self, address: netaddr.IPAddress | str) -> int:
        return self.fanmap.pod_index(self.host, address)


def node_segment(underlay: netaddr.IPNetwork, host: netaddr.IPAddress, prefixlen: int) -> netaddr.IPNetwork:
    """The connected prefix of the node's underlay address, never wider than the underlay (the peers are
    all in the underlay; an interface prefix shorter than it names no more of them)."""
    return netaddr.IPNetwork(f"{host}/{max(prefixlen, underlay.prefixlen)}").cidr


def segment_overlay(fanmap: FanMap, segment: netaddr.IPNetwork) -> netaddr.IPNetwork:
    """The overlay prefix whose addresses belong to nodes in `segment` (a prefix of the underlay):
    the slices of its hosts are contiguous, so this is one prefix, not one per peer."""
    first, _ = fanmap.slice_and_gateway_ints(int(segment.network))
    prefixlen = fanmap.overlay.prefixlen + segment.prefixlen - fanmap.underlay.prefixlen
    return netaddr.IPNetwork(f"{netaddr.IPAddress(first, fanmap.overlay.version)}/{prefixlen}")


def slice_plan(fanmap: FanMap, host: netaddr.IPAddress) -> SlicePlan:
    """The slice the node at `host` owns; all the IPAM needs of the plan."""
    return SlicePlan(
        fanmap=fanmap,
        host=host,
        slice=fanmap.slice_for(host),
        gateway=fanmap.gateway_for(host),
        first_pod=fanmap.first_pod(host),
        last_pod=fanmap.last_pod(host),
        # The overlay's network address: no host owns it (the underlay's
        # network address is never a node), so it can never be a pod.
        next_hop=netaddr.IPAddress(fanmap.overlay.first),
    )


class NodePlan(NamedTuple):
    ipv4: SlicePlan | None             # None in an IPv6-only cluster (an IPv6 underlay)
    ipv6: SlicePlan | None             # with `overlay6`: the same node's IPv6 slice
    underlay_ifname: str
    underlay_ifindex: int
    bridge: str
    bridge_mac: str
    mtu: int                           # pods, bridge and tunnel
    encap: str
    tunnel: str
    vni: int
    vxlan_port: int
    tunnel_mac: str
    inner_src_mac: str
    fanmap_mode: str
    ip_masq: bool
    segment: netaddr.IPNetwork | None = None  # the underlay interface's connected prefix (None: not known)
    direct_routing: bool = False               # `directRouting`: peers in `segment` get packets unencapsulated

    @property
    def direct(self) -> bool:
        """Direct routing is on and the segment is known (the program needs both)."""
        return self.direct_routing and self.segment is not None

    def segment_overlay(self, s: SlicePlan) -> netaddr.IPNetwork | None:
        """`s`'s family's overlay prefix of the nodes in this node's segment (None without a segment)."""
        return None if self.segment is None else segment_overlay(s.fanmap, self.segment)

    @property
    def bridge_gateways(self) -> tuple[tuple[str, int], ...]:
        """The bridge's addresses, (gateway, slice prefix length) per family, IPv4 first."""
        return tuple((str(s.gateway), s.slice.prefixlen) for s in self.slices)

    @property
    def slices(self) -> tuple[SlicePlan, ...]:
        """The families the node serves, IPv4 first; never empty."""
        return tuple(s for s in (self.ipv4, self.ipv6) if s is not None)

    @property
    def primary(self) -> SlicePlan:
        """The slice that names the bridge: IPv4's, or IPv6's on an IPv6-only node."""
        return self.slices[0]

    @property
    def host(self) -> netaddr.IPAddress:
        """This node's underlay address (IPv6 on an IPv6-only node)."""
        return self.primary.host

    @property
    def ipv6_underlay(self) -> bool:
        """The tunnel runs over IPv6 (VXLAN over UDP/IPv6)."""
        return self.host.version == 6


def make_plan(cfg: FanConfig, host: netaddr.IPAddress, underlay_ifname: str, underlay_ifindex: int,
              underlay_mtu: int, underlay_prefixlen: int | None = None) -> NodePlan:
    """The plan of the node at `host`; refuses (code 7) an MTU below the family's minimum.

    `underlay_prefixlen`: the prefix length of `host` on its interface, which names the node's
    segment (without it the plan has none, and direct routing stays off)."""
    ipv4 = None if cfg.fanmap is None else slice_plan(cfg.fanmap, host)
    ipv6 = None if cfg.params.fanmap6 is None else slice_plan(cfg.params.fanmap6, host)
    primary = ipv4 or ipv6
    assert primary is not None  # the config always has one overlay
    return NodePlan(
        ipv4=ipv4,
        ipv6=ipv6,
        underlay_ifname=underlay_ifname,
        underlay_ifindex=underlay_ifindex,
        bridge=bridge_name(cfg, primary.slice),
        bridge_mac=bridge_mac_for(primary.gateway),
        mtu=pod_mtu(cfg, underlay_ifname, underlay_mtu),
        encap=cfg.encap,
        tunnel=TUNNEL_NAMES[cfg.encap],
        vni=cfg.vni,
        vxlan_port=cfg.vxlan_port,
        tunnel_mac=shared_tunnel_mac(cfg.vni) if cfg.fanmap_mode == "bpf" else peer_mac(host),
        inner_src_mac=inner_source_mac(cfg.vni),
        fanmap_mode=cfg.fanmap_mode,
        ip_masq=cfg.ip_masq,
        segment=None if underlay_prefixlen is None else node_segment(primary.underlay, host, underlay_prefixlen),
        direct_routing=cfg.direct_routing,
    )
