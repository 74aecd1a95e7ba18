"""An attachment's address in CNI terms, for both plugins' verbs.

`fan` and `fan-ipam` take, release, check and collect addresses the same
way and answer the same CNI errors; both import this module, and neither
imports the other's verbs. Pool and store exceptions become CNI errors
here, with codes an operator can look up.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from cni_fan.cni.errors import ADDRESS_UNAVAILABLE, CHECK_FAILED, CniError, IO_FAILURE, POOL_FULL
from cni_fan.cni.request import CniRequest
from cni_fan.cni.result import IPConfig, Route
from cni_fan.config import FanParams
from cni_fan.ipam.pool import AddressUnavailable, PoolError, PoolFull
from cni_fan.local_slice import address_pool, requested_address, valid_attachments
from cni_fan.plan import SlicePlan


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


def pod_routes(params: FanParams, pods: SlicePlan) -> tuple[Route, ...]:
    if params.routes is None:
        return (Route(dst="0.0.0.0/0", gw=str(pods.gateway)),)
    return tuple(Route(dst=r.dst, gw=r.gw or str(pods.gateway)) for r in params.routes)


def allocate(req: CniRequest, params: FanParams, pods: SlicePlan) -> IPConfig:
    with pool_errors():
        addr = address_pool(params, pods).allocate(req.container_id, req.ifname, requested_address(req))
    return IPConfig(address=f"{addr}/{pods.slice.prefixlen}", gateway=str(pods.gateway))


def release(req: CniRequest, params: FanParams) -> None:
    """Always possible, even when the node's underlay address is gone (no pod range needed)."""
    with pool_errors():
        address_pool(params).release(req.container_id, req.ifname)


def gc(req: CniRequest, params: FanParams) -> None:
    """Works without the underlay address, like `release`."""
    with pool_errors():
        address_pool(params).gc(valid_attachments(req.config))


def check_reservation(req: CniRequest, params: FanParams, address: str | None) -> None:
    with pool_errors():
        held = address_pool(params).lookup(req.container_id, req.ifname)
    if held is None:
        raise CniError(CHECK_FAILED, f"no address is reserved for container {req.container_id} ({req.ifname})")
    if address is not None and str(held) != address.split("/")[0]:
        raise CniError(CHECK_FAILED, f"container {req.container_id} ({req.ifname}) holds {held}, "
                                     f"not {address} as prevResult says")
