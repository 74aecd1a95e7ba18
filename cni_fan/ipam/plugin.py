"""`fan-ipam`: the Fan's address management as a standalone CNI IPAM plugin.

Used under other plugins (the reference `bridge`, say): it returns the
address and routes for the pod, and the main plugin wires the interfaces.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from pyroute2 import IPRoute

from cni_fan.adapter_errors import verb_table
from cni_fan.attach_lock import serialized
from cni_fan.cni.errors import (ADDRESS_UNAVAILABLE, CHECK_FAILED, CniError, IO_FAILURE, PLUGIN_NOT_AVAILABLE,
                                POOL_FULL)
from cni_fan.cni.request import CniRequest
from cni_fan.cni.result import IPConfig, Result, Route
from cni_fan.config import FanParams, parse_ipam_config
from cni_fan.ipam.pool import AddressUnavailable, PoolError, PoolFull
from cni_fan.local_slice import address_pool, find_slice, requested_address, valid_attachments
from cni_fan.net.errors import UnderlayError
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


def _prev_address(req: CniRequest) -> str | None:
    from cni_fan.cni.result import parse_result

    prev = req.config.get("prevResult")
    if prev is None:
        return None
    ips = parse_result(prev).ips
    return ips[0].address if ips else None


def _find_slice(params: FanParams) -> SlicePlan:
    """Closed here: an IPRoute left to the garbage collector prints an asyncio traceback at exit."""
    host = IPRoute()
    try:
        return find_slice(host, params)
    finally:
        host.close()


def cmd_add(req: CniRequest) -> Result:
    params = parse_ipam_config(req.config)
    pods = _find_slice(params)
    ip = allocate(req, params, pods)
    return Result(ips=(ip,), routes=pod_routes(params, pods), dns=req.config.get("dns") or {})


def cmd_del(req: CniRequest) -> None:
    release(req, parse_ipam_config(req.config))


def cmd_check(req: CniRequest) -> None:
    check_reservation(req, parse_ipam_config(req.config), _prev_address(req))


def cmd_gc(req: CniRequest) -> None:
    gc(req, parse_ipam_config(req.config))


def cmd_status(req: CniRequest) -> None:
    params = parse_ipam_config(req.config)
    try:
        pods = _find_slice(params)
        pool = address_pool(params, pods)
        with pool_errors():
            full = pool.used() >= pool.capacity()
    except (CniError, UnderlayError) as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan-ipam is not ready on this node: {exc.msg}", exc.details) from None
    if full:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan-ipam is not ready: no free address left in {pods.slice}")


def _state_dir(req: CniRequest) -> str:
    return parse_ipam_config(req.config).state_dir


# ADD and DEL of one attachment never overlap, as in `fan`: an outer plugin
# killed mid-ADD leaves this call running in the plugin server's child, and
# the runtime's DEL must not slip in before it (the address would leak).
VERBS = verb_table({"ADD": serialized(cmd_add, _state_dir), "DEL": serialized(cmd_del, _state_dir),
                    "CHECK": cmd_check, "GC": serialized(cmd_gc, _state_dir), "STATUS": cmd_status})
