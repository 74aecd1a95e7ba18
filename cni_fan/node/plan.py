"""What one node's datapath consists of, computed from config and slice.

Pure: the same inputs always give the same names, addresses and MACs, so
`node up` is idempotent, `node down` removes exactly what `up` made, and
every node derives the shared values (tunnel MAC, next hop) without
talking to any other node.
"""
from __future__ import annotations

from dataclasses import dataclass

import netaddr

from cni_fan.config import FanConfig, bridge_name_for

TUNNEL_NAMES = {"vxlan": "fan-vxlan", "ipip": "fan-ipip"}
NFT_TABLE = "cni-fan"


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


@dataclass(frozen=True)
class NodePlan:
    overlay: netaddr.IPNetwork
    underlay: netaddr.IPNetwork
    host: netaddr.IPAddress            # this node's underlay address
    underlay_ifname: str
    underlay_ifindex: int
    slice: netaddr.IPNetwork
    gateway: netaddr.IPAddress
    bridge: str
    mtu: int                           # pods, bridge and tunnel
    encap: str
    tunnel: str
    vni: int
    vxlan_port: int
    tunnel_mac: str
    inner_src_mac: str
    next_hop: netaddr.IPAddress        # on-link next hop of the overlay route
    fanmap_mode: str
    ip_masq: bool

    @property
    def overlay_route(self) -> str:
        return str(self.overlay.cidr)


def make_plan(cfg: FanConfig, host: netaddr.IPAddress, underlay_ifname: str, underlay_ifindex: int,
              underlay_mtu: int) -> NodePlan:
    fanmap = cfg.fanmap
    slice_net = fanmap.slice_for(host)
    return NodePlan(
        overlay=fanmap.overlay,
        underlay=fanmap.underlay,
        host=host,
        underlay_ifname=underlay_ifname,
        underlay_ifindex=underlay_ifindex,
        slice=slice_net,
        gateway=fanmap.gateway_for(host),
        bridge=cfg.bridge or bridge_name_for(slice_net),
        mtu=cfg.mtu or underlay_mtu - cfg.encap_overhead,
        encap=cfg.encap,
        tunnel=TUNNEL_NAMES[cfg.encap],
        vni=cfg.vni,
        vxlan_port=cfg.vxlan_port,
        tunnel_mac=shared_tunnel_mac(cfg.vni) if cfg.fanmap_mode == "bpf" else peer_mac(host),
        inner_src_mac=inner_source_mac(cfg.vni),
        # The overlay's network address: no host owns it (the underlay's
        # network address is never a node), so it can never be a pod.
        next_hop=netaddr.IPAddress(fanmap.overlay.first),
        fanmap_mode=cfg.fanmap_mode,
        ip_masq=cfg.ip_masq,
    )
