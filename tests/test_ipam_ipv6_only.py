"""The IPAM of an IPv6-only cluster (an IPv6 underlay): records keyed by the pod's IPv6 address.

Pure apart from a temporary state directory: allocation, static requests,
CHECK's reservation test, release and GC through `cni_fan.ipam.attachments`,
as `fan` and `fan-ipam` call them.
"""
from __future__ import annotations

from pathlib import Path

import netaddr
import pytest

from cni_fan.cni.errors import ADDRESS_UNAVAILABLE, CHECK_FAILED, INVALID_ENVIRONMENT, CniError
from cni_fan.cni.request import CniRequest
from cni_fan.config import parse_fan_params
from cni_fan.ipam import attachments
from cni_fan.local_slice import address_pool, pool_version
from cni_fan.plan import slice_plan

HOST = netaddr.IPAddress("fd00:198:18::1c")


@pytest.fixture
def params(tmp_path: Path):
    return parse_fan_params({"underlay": "fd00:198:18::/112", "overlay6": "fd50::/48",
                             "dataDir": str(tmp_path)}, "fan6")


def request(cid: str = "ctr-1", args: dict | None = None, config: dict | None = None) -> CniRequest:
    return CniRequest(command="ADD", cni_version="1.1.0", config=config or {"name": "fan6"}, container_id=cid,
                      ifname="eth0", args=args or {})


def slices(params) -> tuple:
    return tuple(slice_plan(m, HOST) for m in params.fanmaps)


def test_records_are_keyed_by_the_ipv6_address(params) -> None:
    assert pool_version(params) == 6
    (ip,) = attachments.allocate(request(), params, slices(params))
    assert (ip.address, ip.gateway) == ("fd50:0:0:1c::2/64", "fd50:0:0:1c::1")
    assert address_pool(params).lookup("ctr-1", "eth0") == netaddr.IPAddress("fd50:0:0:1c::2")
    (again,) = attachments.allocate(request(), params, slices(params))
    assert again == ip  # idempotent per attachment


def test_default_route_is_ipv6_only(params) -> None:
    (route,) = attachments.pod_routes(params, slices(params))
    assert (route.dst, route.gw) == ("::/0", "fd50:0:0:1c::1")


def test_a_static_ipv6_address_is_taken_and_an_ipv4_one_refused(params) -> None:
    (ip,) = attachments.allocate(request(args={"IP": "fd50:0:0:1c::9"}), params, slices(params))
    assert ip.address == "fd50:0:0:1c::9/64"
    with pytest.raises(CniError) as caught:
        attachments.allocate(request("ctr-2", args={"IP": "250.0.28.9"}), params, slices(params))
    assert caught.value.code == INVALID_ENVIRONMENT and "IPv6-only" in caught.value.msg
    with pytest.raises(CniError) as caught:
        attachments.allocate(request("ctr-3", args={"IP": "fd50:0:0:1d::9"}), params, slices(params))
    assert caught.value.code == ADDRESS_UNAVAILABLE and "fd50:0:0:1c::/64" in caught.value.msg


def test_check_compares_prevresult_with_the_ipv6_record(params) -> None:
    attachments.allocate(request(), params, slices(params))
    attachments.check_reservation(request(), params, ("fd50:0:0:1c::2/64",))
    with pytest.raises(CniError) as caught:
        attachments.check_reservation(request(), params, ("fd50:0:0:1c::3/64",))
    assert caught.value.code == CHECK_FAILED and "holds fd50:0:0:1c::2" in caught.value.msg


def test_release_and_gc_need_no_underlay_address(params) -> None:
    attachments.allocate(request("a"), params, slices(params))
    attachments.allocate(request("b"), params, slices(params))
    attachments.release(request("a"), params)
    attachments.release(request("a"), params)  # again: still fine
    assert address_pool(params).lookup("a", "eth0") is None
    gc = request(config={"name": "fan6", "cni.dev/valid-attachments": []})
    attachments.gc(gc, params)
    assert address_pool(params).lookup("b", "eth0") is None
