"""`fan-ipam`: the Fan's address management as a standalone CNI IPAM plugin.

Used under other plugins (the reference `bridge`, say): it returns the
address and routes for the pod, and the main plugin wires the interfaces.
"""
from __future__ import annotations

from cni_fan.adapter_errors import verb_table
from cni_fan.attach_lock import serialized
from cni_fan.cni.call import CallContext, PluginVerbs
from cni_fan.cni.errors import CniError, PLUGIN_NOT_AVAILABLE
from cni_fan.cni.request import CniRequest
from cni_fan.cni.result import Result
from cni_fan.config import FanParams, parse_ipam_config
from cni_fan.ipam.attachments import allocate, check_reservation, gc, pod_routes, pool_errors, release
from cni_fan.local_slice import address_pool, find_slices
from cni_fan.net.errors import UnderlayError
from cni_fan.net.rtnl import Rtnl
from cni_fan.plan import SlicePlan


def _prev_addresses(req: CniRequest) -> tuple[str, ...]:
    from cni_fan.cni.result import parse_result

    prev = req.config.get("prevResult")
    if prev is None:
        return ()
    return tuple(ip.address for ip in parse_result(prev).ips)


def _find_slices(params: FanParams) -> tuple[SlicePlan, ...]:
    with Rtnl() as host:
        return find_slices(host, params)


def cmd_add(req: CniRequest, params: FanParams, ctx: CallContext) -> Result:
    pods = _find_slices(params)
    ips = allocate(req, params, pods)
    return Result(ips=ips, routes=pod_routes(params, pods), dns=req.config.get("dns") or {})


def cmd_del(req: CniRequest, params: FanParams, ctx: CallContext) -> None:
    release(req, params)


def cmd_check(req: CniRequest, params: FanParams, ctx: CallContext) -> None:
    check_reservation(req, params, _prev_addresses(req))


def cmd_gc(req: CniRequest, params: FanParams, ctx: CallContext) -> None:
    gc(req, params)


def cmd_status(req: CniRequest, params: FanParams, ctx: CallContext) -> None:
    try:
        pods = _find_slices(params)[0]
        pool = address_pool(params, pods)
        with pool_errors():
            full = pool.used() >= pool.capacity()
    except (CniError, UnderlayError) as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan-ipam is not ready on this node: {exc.msg}", exc.details) from None
    if full:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"fan-ipam is not ready: no free address left in {pods.slice}")


def _state_dir(params: FanParams) -> str:
    return params.state_dir


# ADD and DEL of one attachment never overlap, as in `fan`: an outer plugin
# killed mid-ADD leaves this call running in the plugin server's child, and
# the runtime's DEL must not slip in before it (the address would leak).
# The `ipam` object of the config is parsed once per call, before the verb.
PLUGIN = PluginVerbs(
    parse_config=parse_ipam_config,
    verbs=verb_table({"ADD": serialized(cmd_add, _state_dir), "DEL": serialized(cmd_del, _state_dir),
                      "CHECK": cmd_check, "GC": serialized(cmd_gc, _state_dir), "STATUS": cmd_status}),
)
