"""An attachment's address in CNI terms, for both plugins' verbs.

`fan` and `fan-ipam` take, release, check and collect addresses the same
way and answer the same CNI errors; both import this module, and neither
imports the other's verbs. Pool and store exceptions become CNI errors
here, with codes an operator can look up.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import netaddr

from cni_fan.cni.errors import (ADDRESS_UNAVAILABLE, CHECK_FAILED, CniError, INVALID_ENVIRONMENT, IO_FAILURE,
                                POOL_FULL)
from cni_fan.cni.request import CniRequest
from cni_fan.cni.result import IPConfig, Route
from cni_fan.config import FanParams
from cni_fan.ipam.pool import AddressUnavailable, PoolError, PoolFull
from cni_fan.fanmap import FanMapError
from cni_fan.local_slice import address_pool, requested_addresses, valid_attachments
from cni_fan.plan import SlicePlan, partner_address


@contextlib.contextmanager
def pool_errors() -> Iterator[None]:
    """Pool exceptions become CNI errors with codes an operator can look up."""
    try:
        yield
    except PoolFull as exc:
        raise CniError(POOL_FULL, str(exc)) from None
    except AddressUnavailable as exc:
        raise CniError(ADDRESS_UNAVAILABLE, str(exc)) from None
    except PoolError as exc:
        raise CniError(IO_FAILURE, str(exc)) from None
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot use the allocation records: {exc.strerror}",
                       str(exc.filename or "")) from None


def pod_routes(params: FanParams, pods: tuple[SlicePlan, ...]) -> tuple[Route, ...]:
    """A default route per family via its gateway, or the configured routes (each via its family's gateway)."""
    gateways = {p.version: str(p.gateway) for p in pods}
    if params.routes is None:
        return tuple(Route(dst="0.0.0.0/0" if p.version == 4 else "::/0", gw=str(p.gateway)) for p in pods)
    return tuple(Route(dst=r.dst, gw=r.gw or gateways[4 if "." in r.dst else 6]) for r in params.routes)


def allocate(req: CniRequest, params: FanParams, pods: tuple[SlicePlan, ...]) -> tuple[IPConfig, ...]:
    """The pod's address in every family, IPv4 first; one container index names them all.

    The store records the first family's address (IPv4, or IPv6 in an
    IPv6-only cluster); the IPv6 one of a dual-stack pod is its partner, so
    the two can never disagree or leak apart.
    """
    first = pods[0]
    with pool_errors():
        addr = address_pool(params, first).allocate(req.container_id, req.ifname, _requested(req, pods))
    out = [IPConfig(address=f"{addr}/{first.slice.prefixlen}", gateway=str(first.gateway))]
    for other in pods[1:]:
        partner = partner_address(addr, first.fanmap, other.fanmap)
        out.append(IPConfig(address=f"{partner}/{other.slice.prefixlen}", gateway=str(other.gateway)))
    return tuple(out)


def _requested(req: CniRequest, pods: tuple[SlicePlan, ...]) -> netaddr.IPAddress | None:
    """The address to record for a static request in either family or both (they must pair)."""
    wanted = requested_addresses(req)
    if pods[0].version == 6:
        return _requested_ipv6_only(wanted, pods[0])
    if 6 in wanted and len(pods) < 2:
        raise CniError(INVALID_ENVIRONMENT, f"requested IPv6 address {wanted[6]}, but this network has no "
                                            "\"overlay6\" (its pods get IPv4 addresses only)")
    if 6 not in wanted:
        return wanted.get(4)
    ipv4, ipv6 = pods[0], pods[1]
    if wanted[6] not in ipv6.slice:
        raise CniError(ADDRESS_UNAVAILABLE, f"requested address {wanted[6]} is not in this node's IPv6 slice "
                                            f"{ipv6.slice}")
    try:
        paired = ipv4.pod_address(ipv6.pod_index(wanted[6]))
    except FanMapError as exc:
        raise CniError(ADDRESS_UNAVAILABLE, f"requested address {wanted[6]} cannot be a pod's: {exc}") from None
    if 4 in wanted and wanted[4] != paired:
        raise CniError(INVALID_ENVIRONMENT, f"requested addresses {wanted[4]} and {wanted[6]} do not pair: a pod "
                                            f"takes the same index in both families, so {wanted[6]} goes with "
                                            f"{paired}")
    return paired


def _requested_ipv6_only(wanted: dict[int, netaddr.IPAddress], ipv6: SlicePlan) -> netaddr.IPAddress | None:
    if 4 in wanted:
        raise CniError(INVALID_ENVIRONMENT, f"requested IPv4 address {wanted[4]}, but this network is IPv6-only "
                                            "(an IPv6 underlay: its pods get IPv6 addresses only)")
    if 6 in wanted and wanted[6] not in ipv6.slice:
        raise CniError(ADDRESS_UNAVAILABLE, f"requested address {wanted[6]} is not in this node's IPv6 slice "
                                            f"{ipv6.slice}")
    return wanted.get(6)


def release(req: CniRequest, params: FanParams) -> None:
    """Always possible, even when the node's underlay address is gone (no pod range needed)."""
    with pool_errors():
        address_pool(params).release(req.container_id, req.ifname)


def gc(req: CniRequest, params: FanParams) -> None:
    """Works without the underlay address, like `release`."""
    with pool_errors():
        address_pool(params).gc(valid_attachments(req.config))


def check_reservation(req: CniRequest, params: FanParams, addresses: tuple[str, ...]) -> None:
    """The store holds this attachment's address (IPv4, or IPv6 in an IPv6-only cluster), and
    prevResult's addresses are it and its partners."""
    with pool_errors():
        held = address_pool(params).lookup(req.container_id, req.ifname)
    if held is None:
        raise CniError(CHECK_FAILED, f"no address is reserved for container {req.container_id} ({req.ifname})")
    expected = {held.version: held}
    if params.fanmap is not None and params.fanmap6 is not None:
        try:
            expected[6] = partner_address(held, params.fanmap, params.fanmap6)
        except FanMapError as exc:
            raise CniError(CHECK_FAILED, f"the reserved address {held} has no IPv6 partner: {exc}") from None
    for address in addresses:
        ip = netaddr.IPNetwork(address).ip
        if expected.get(ip.version) != ip:
            raise CniError(CHECK_FAILED, f"container {req.container_id} ({req.ifname}) holds "
                                         f"{expected.get(ip.version, 'no IPv' + str(ip.version) + ' address')}, "
                                         f"not {address} as prevResult says")
