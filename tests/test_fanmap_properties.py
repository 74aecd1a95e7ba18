"""FanMap properties over random fans of both overlay families (the strategies
are in harness.fanmaps): the mapping must be a bijection per slice, and a
dual-stack pod's index must name the same offset in both families. The worked
examples and refusals stay in test_fanmap.py (IPv4) and test_fanmap6.py (IPv6)."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from cni_fan.fanmap import FanMap, FanMapError
from harness.fanmaps import Family, addresses_of, block_in, fans_of, hosts

FAMILIES = pytest.mark.parametrize("family", ["IPv4", "IPv6"])


@FAMILIES
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_reverse_of_every_slice_address_is_its_host(family: Family, data: st.DataObject) -> None:
    fan = data.draw(fans_of(family))
    host = hosts(fan, data.draw)
    network = fan.slice_for(host)
    assert (network.version, network.prefixlen) == (fan.overlay.version, fan.slice_prefixlen)
    assert network in fan.overlay
    for address in addresses_of(network, data):
        assert fan.contains(address)
        owner = fan.underlay_host_for(address)
        assert owner == host and owner.version == fan.underlay.version


@FAMILIES
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_slices_of_different_hosts_never_overlap(family: Family, data: st.DataObject) -> None:
    fan = data.draw(fans_of(family))
    a, b = hosts(fan, data.draw), hosts(fan, data.draw)
    assume(a != b)
    slice_a, slice_b = fan.slice_for(a), fan.slice_for(b)
    assert slice_a.last < slice_b.first or slice_b.last < slice_a.first


@FAMILIES
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_pod_addresses_stay_inside_the_slice_and_round_trip(family: Family, data: st.DataObject) -> None:
    fan = data.draw(fans_of(family))
    host = hosts(fan, data.draw)
    network = fan.slice_for(host)
    reserved = set(fan.reserved_for(host))
    assert fan.gateway_for(host) in reserved and len(reserved) == fan.host_reserve
    assert fan.capacity == network.size - 2 - fan.host_reserve >= 1
    assert fan.last_pod(host) == IPAddress(network.last - 1, network.version)
    assert fan.pod_address(host, fan.capacity - 1) == fan.last_pod(host)
    indices = data.draw(st.lists(st.integers(0, fan.capacity - 1), min_size=1, max_size=16))
    for index in [0, fan.capacity - 1, *indices]:
        pod = fan.pod_address(host, index)
        assert pod.version == fan.overlay.version and pod in network
        assert pod.value not in (network.first, network.last)
        assert pod not in reserved
        assert fan.pod_index(host, pod) == index
        assert fan.underlay_host_for(pod) == host


@FAMILIES
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_integer_forms_agree_with_the_checked_queries(family: Family, data: st.DataObject) -> None:
    """`host_ints` and `slice_and_gateway_ints` (the routes mapping's loop) say what `slice_for` and
    `gateway_for` say, and `host_ints` is exactly the hosts those accept."""
    fan = data.draw(fans_of(family))
    hosts_range = fan.host_ints()
    assert (hosts_range.start, hosts_range.stop - 1) == (fan.underlay.first + 1, fan.underlay.last - 1)
    version = fan.underlay.version
    for host in (hosts_range.start, hosts_range.stop - 1, hosts(fan, data.draw).value):
        assert fan.slice_and_gateway_ints(host) == (fan.slice_for(IPAddress(host, version)).first,
                                                    fan.gateway_for(IPAddress(host, version)).value)
    for outside in (fan.underlay.first, fan.underlay.last):
        with pytest.raises(FanMapError):
            fan.slice_for(IPAddress(outside, version))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_dual_stack_pods_have_the_same_offset_in_both_slices(data: st.DataObject) -> None:
    """One IPv4 underlay, an IPv4 and an IPv6 overlay: index i is the same offset into both slices.
    (Both families at once, so not parametrized.)"""
    underlay_len = data.draw(st.integers(8, 28))
    underlay = block_in(data.draw, IPNetwork("0.0.0.0/1"), underlay_len)
    overlay4_len = data.draw(st.integers(4, underlay_len - 2))
    overlay4 = block_in(data.draw, IPNetwork("240.0.0.0/4"), overlay4_len)
    overlay6 = block_in(data.draw, IPNetwork("fd00::/8"), data.draw(st.integers(8, 120 - (32 - underlay_len))))
    reserve = data.draw(st.integers(1, min((1 << (underlay_len - overlay4_len)) - 3, 4)))
    fan4, fan6 = FanMap(overlay4, underlay, reserve), FanMap(overlay6, underlay, reserve)
    host = hosts(fan4, data.draw)
    first4, first6 = fan4.slice_for(host).first, fan6.slice_for(host).first
    shared = min(fan4.capacity, fan6.capacity)
    for index in {0, shared - 1, data.draw(st.integers(0, shared - 1))}:
        pod4, pod6 = fan4.pod_address(host, index), fan6.pod_address(host, index)
        assert pod4.value - first4 == pod6.value - first6
        assert fan6.pod_index(host, pod6) == fan4.pod_index(host, pod4) == index
