"""This node's place in the Fan: its underlay address and the slice it owns.

Every verb and the node agent start from here, so the slice is computed in
exactly one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import netaddr
from pyroute2 import IPRoute

from cni_fan.cni.errors import CniError, INVALID_ENVIRONMENT
from cni_fan.cni.request import CniRequest
from cni_fan.config import CIDR_RE, IPV4_RE, FanParams
from cni_fan.ipam.pool import AddressPool
from cni_fan.ipam.store import AllocationStore
from cni_fan.net.underlay import UnderlayAddress, find_underlay



@dataclass(frozen=True)
class LocalSlice:
    underlay: UnderlayAddress
    slice: netaddr.IPNetwork
    gateway: netaddr.IPAddress
    first: netaddr.IPAddress
    last: netaddr.IPAddress

    @property
    def host(self) -> netaddr.IPAddress:
        return self.underlay.address


def local_slice(ipr: IPRoute, params: FanParams) -> LocalSlice:
    underlay = find_underlay(ipr, params.fanmap.underlay, params.underlay_interface)
    fanmap = params.fanmap
    host = underlay.address
    return LocalSlice(underlay=underlay, slice=fanmap.slice_for(host), gateway=fanmap.gateway_for(host),
                      first=fanmap.first_pod(host), last=fanmap.last_pod(host))


def allocation_store(params: FanParams) -> AllocationStore:
    return AllocationStore(Path(params.state_dir))


def address_pool(params: FanParams, local: LocalSlice) -> AddressPool:
    return AddressPool(allocation_store(params), local.first, local.last)


def requested_address(req: CniRequest) -> netaddr.IPAddress | None:
    """A static address from the `ips` capability or `IP=` in CNI_ARGS."""
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
    if not candidates:
        return None
    if len(candidates) > 1:
        raise CniError(INVALID_ENVIRONMENT, "only one requested IPv4 address per interface is supported",
                       f"got {candidates}")
    # Exactly as written (netaddr alone would take "241.1.10.7\n" or "241.1.10.07").
    text = candidates[0]
    if not (IPV4_RE.fullmatch(text) or CIDR_RE.fullmatch(text)):
        raise CniError(INVALID_ENVIRONMENT, f"requested address {text!r} is not an IPv4 address "
                                            "(dotted decimal, optionally with /prefix)")
    return netaddr.IPNetwork(text).ip


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
