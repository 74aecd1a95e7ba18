"""This node's place in the Fan: find its underlay address, build its plan.

The one place that asks the kernel which underlay address is this node's
and hands it to the pure plan (`cni_fan.plan`); the plugin, the IPAM, the
STATUS probe and the node agent all start here.
"""
from __future__ import annotations

from typing import Any, Mapping

import netaddr
from pyroute2 import IPRoute

from cni_fan.cni.errors import CniError, INVALID_ENVIRONMENT
from cni_fan.cni.request import CniRequest
from cni_fan.config import CIDR6_RE, CIDR_RE, IPV4_RE, IPV6_RE, FanConfig, FanParams
from cni_fan.ipam.pool import AddressPool
from cni_fan.net.underlay import UnderlayAddress, find_underlay
from cni_fan.plan import NodePlan, SlicePlan, make_plan, slice_plan


def node_underlay(ipr: IPRoute, params: FanParams) -> UnderlayAddress:
    return find_underlay(ipr, params.underlay_net, params.underlay_interface)


def find_slices(ipr: IPRoute, params: FanParams) -> tuple[SlicePlan, ...]:
    """This node's slices, IPv4 first: what `fan-ipam` needs (it has no bridge, tunnel or MTU)."""
    host = node_underlay(ipr, params).address
    return tuple(slice_plan(fanmap, host) for fanmap in params.fanmaps)


def find_plan(ipr: IPRoute, cfg: FanConfig) -> NodePlan:
    """This node's whole plan, for `fan`, its STATUS and the node agent."""
    underlay = node_underlay(ipr, cfg.params)
    return make_plan(cfg, underlay.address, underlay.interface, underlay.index, underlay.mtu, underlay.prefixlen)


def address_pool(params: FanParams, pods: SlicePlan | None = None) -> AddressPool:
    """The network's pool; with `pods`, its range is this node's pod range
    (without, it can release, look up and collect, but not allocate).

    Its records are keyed by the first family's address: IPv4's, or IPv6's
    in an IPv6-only cluster (`pool_version`).
    """
    if pods is None:
        return AddressPool.open(params.state_dir, version=pool_version(params))
    return AddressPool.open(params.state_dir, pods.first_pod, pods.last_pod)


def pool_version(params: FanParams) -> int:
    """The family the allocation records are keyed by: IPv4, or IPv6 when pods have no IPv4 address."""
    return params.fanmaps[0].overlay.version


def requested_addresses(req: CniRequest) -> dict[int, netaddr.IPAddress]:
    """Static addresses from the `ips` capability or `IP=` in CNI_ARGS: at most one per family."""
    candidates: list[str] = []
    runtime: Mapping[str, Any] = req.config.get("runtimeConfig") or {}
    ips = runtime.get("ips") if isinstance(runtime, dict) else None
    if ips is None:
        args = req.config.get("args") or {}
        ips = ((args.get("cni") or {}).get("ips")) if isinstance(args, dict) else None
    if ips is not None:
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise CniError(INVALID_ENVIRONMENT, "runtimeConfig.ips must be a list of address strings", repr(ips)[:200])
        candidates.extend(ips)
    if "IP" in req.args:
        candidates.extend(req.args["IP"].split(","))
    wanted: dict[int, netaddr.IPAddress] = {}
    for text in candidates:
        # Exactly as written (netaddr alone would take "241.1.10.7\n" or "241.1.10.07").
        if IPV4_RE.fullmatch(text) or CIDR_RE.fullmatch(text):
            family = 4
        elif IPV6_RE.fullmatch(text) or CIDR6_RE.fullmatch(text):
            family = 6
        else:
            raise CniError(INVALID_ENVIRONMENT, f"requested address {text!r} is not an IPv4 address (dotted "
                                                "decimal) or an IPv6 address, optionally with /prefix")
        try:
            address = netaddr.IPNetwork(text).ip
        except (netaddr.AddrFormatError, ValueError):
            raise CniError(INVALID_ENVIRONMENT, f"requested address {text!r} is not an IPv{family} address") from None
        if family in wanted:
            raise CniError(INVALID_ENVIRONMENT, f"only one requested IPv{family} address per interface is supported",
                           f"got {candidates}")
        wanted[family] = address
    return wanted


def valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    """GC's `cni.dev/valid-attachments`: everything else may be released."""
    raw = config.get("cni.dev/valid-attachments", [])
    if not isinstance(raw, list):
        raise CniError(INVALID_ENVIRONMENT, "cni.dev/valid-attachments must be a list")
    out = set()
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("containerID"), str) \
                or not isinstance(entry.get("ifname"), str):
            raise CniError(INVALID_ENVIRONMENT, "each valid attachment needs a containerID and an ifname",
                           repr(entry)[:200])
        out.add((entry["containerID"], entry["ifname"]))
    return out
