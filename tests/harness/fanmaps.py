"""Random valid FanMaps for the property tests, one strategy per overlay family.

- `fans`: an IPv4 overlay over an IPv4 underlay;
- `fans6`: an IPv6 overlay over an IPv4 (dual-stack) or an IPv6 (IPv6-only) underlay;
- `fans_of(family)`: the one of the two that a test parametrized by family wants;
- `hosts`, `addresses_of`, `block_in`: a host of a fan, the addresses of a
  slice worth checking, an aligned network inside a region.

Every fan is built valid (the overlay and the underlay drawn from regions that
neither overlap each other nor touch a refused range), so Hypothesis need not
discard most draws.
"""
from __future__ import annotations

from typing import Literal

from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from cni_fan.fanmap import FanMap

Family = Literal["IPv4", "IPv6"]


def block_in(draw: st.DrawFn, region: IPNetwork, prefixlen: int) -> IPNetwork:
    """A random aligned /prefixlen network inside region (in region's family)."""
    offset = draw(st.integers(0, region.size - 1))
    return IPNetwork((region.first + offset, prefixlen), version=region.version).cidr


def _host_reserve(draw: st.DrawFn, slice_size: int) -> int:
    """A reserve that leaves at least one pod; capped so small and big slices both come up."""
    return draw(st.integers(1, min(slice_size - 3, 64)))


@st.composite
def fans(draw: st.DrawFn) -> FanMap:
    """Any valid IPv4 fan: random widths, positions and host reserves.

    The overlay lies in 128.0.0.0/2 or 240.0.0.0/4, the underlay elsewhere.
    """
    overlay_region = draw(st.sampled_from([IPNetwork("128.0.0.0/2"), IPNetwork("240.0.0.0/4")]))
    overlay_len = draw(st.integers(overlay_region.prefixlen, 28))
    underlay_len = draw(st.integers(overlay_len + 2, 30))
    underlay_regions = [IPNetwork("0.0.0.0/1")]
    if overlay_region.prefixlen == 4:
        underlay_regions.append(IPNetwork("128.0.0.0/2"))
    underlay_region = draw(st.sampled_from(underlay_regions))
    overlay = block_in(draw, overlay_region, overlay_len)
    underlay = block_in(draw, underlay_region, underlay_len)
    slice_size = 1 << (32 - (overlay.prefixlen + 32 - underlay.prefixlen))
    return FanMap(overlay, underlay, _host_reserve(draw, slice_size))


def _underlay6_regions() -> dict[IPNetwork, list[IPNetwork]]:
    """Each IPv6 overlay region with the IPv6 underlay regions that stay clear of it."""
    return {
        IPNetwork("fd00::/9"): [IPNetwork("fd80::/9"), IPNetwork("2000::/3")],
        IPNetwork("2000::/4"): [IPNetwork("fd00::/8"), IPNetwork("3000::/4")],
        IPNetwork("fc00::/7"): [IPNetwork("2000::/3")],
    }


@st.composite
def fans6(draw: st.DrawFn) -> FanMap:
    """Any valid fan with an IPv6 overlay, over an IPv4 or an IPv6 underlay."""
    regions = _underlay6_regions()
    overlay_region = draw(st.sampled_from(list(regions)))
    if draw(st.booleans()):  # dual-stack: an IPv4 underlay anywhere
        underlay_len = draw(st.integers(1, 30))
        host_bits = 32 - underlay_len
        underlay = block_in(draw, IPNetwork("0.0.0.0/0"), underlay_len)
    else:  # IPv6-only
        host_bits = draw(st.integers(2, 120 - overlay_region.prefixlen))
        region = draw(st.sampled_from(regions[overlay_region]))
        underlay = block_in(draw, region, 128 - host_bits)
    overlay_len = draw(st.integers(overlay_region.prefixlen, 120 - host_bits))
    overlay = block_in(draw, overlay_region, overlay_len)
    return FanMap(overlay, underlay, _host_reserve(draw, 1 << (128 - overlay_len - host_bits)))


def fans_of(family: Family) -> st.SearchStrategy[FanMap]:
    """The strategy for fans whose overlay is of `family`."""
    return {"IPv4": fans, "IPv6": fans6}[family]()


def hosts(fan: FanMap, draw: st.DrawFn) -> IPAddress:
    """Any address of the underlay a host can hold (not its first or last)."""
    offset = draw(st.integers(1, (1 << fan.host_bits) - 2))
    return IPAddress(fan.underlay.first + offset, fan.underlay.version)


def addresses_of(network: IPNetwork, data: st.DataObject) -> list[IPAddress]:
    """Every address of a small network; the edges and a random sample of a big one."""
    if network.size <= 256:
        values = range(network.first, network.last + 1)
    else:
        offsets = data.draw(st.lists(st.integers(0, network.size - 1), max_size=32))
        values = [network.first + o for o in [0, 1, network.size - 2, network.size - 1, *offsets]]
    return [IPAddress(v, network.version) for v in values]
