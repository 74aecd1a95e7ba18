"""`cni-fan map`: show a host's slice, or which host owns an overlay address.

For people planning a fan and for scripts checking one: it prints JSON on
stdout and nothing else, and refuses bad input with one line on stderr and
exit code 2 (the usual code for a usage error), never a traceback. The
overlay may be IPv4 or IPv6 (over an IPv4 or IPv6 underlay); the keys are the
same for both, addresses in the overlay's family and `underlay_host` in the
underlay's.
"""
from __future__ import annotations

import argparse
import json
import sys

from cni_fan.fanmap import FanMap, FanMapError

PROG = "cni-fan map"
USAGE_ERROR = 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `map` on the `cni-fan` sub-command parser."""
    parser = subparsers.add_parser(
        "map",
        help="show a host's overlay slice, or the host owning an overlay address",
        description=(
            "Compute the Fan mapping. With --underlay HOST/PREFIX: the host's "
            "slice, gateway, pod range and capacity. With --reverse ADDRESS: "
            "the underlay host that owns an overlay address."
        ),
    )
    parser.add_argument("--overlay", required=True, help="overlay network, e.g. 250.0.0.0/8 or fd50::/48")
    parser.add_argument(
        "--underlay",
        required=True,
        help=("underlay as HOST/PREFIX, e.g. 172.30.0.28/16 or fd00:198:18::1c/112 "
              "(a network is enough with --reverse)"),
    )
    # Kept as text so a bad value gets our one-line message, not argparse's usage dump.
    parser.add_argument(
        "--host-reserve",
        default="1",
        metavar="N",
        help="addresses each host keeps at the start of its slice (default 1: the gateway)",
    )
    parser.add_argument(
        "--reverse",
        metavar="ADDRESS",
        help="print the underlay host owning this overlay address instead",
    )
    parser.set_defaults(func=run)


def _host_reserve(text: object) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        raise FanMapError(f"--host-reserve must be a whole number, got {text!r}") from None


def _describe_host(overlay: str, underlay: str, host_reserve: int) -> dict:
    fan, host = FanMap.parse_host(overlay, underlay, host_reserve)
    return {
        "overlay": str(fan.overlay),
        "underlay": str(fan.underlay),
        "host": str(host),
        "host_reserve": fan.host_reserve,
        "slice": str(fan.slice_for(host)),
        "slice_prefixlen": fan.slice_prefixlen,
        "gateway": str(fan.gateway_for(host)),
        "first": str(fan.first_pod(host)),
        "last": str(fan.last_pod(host)),
        "capacity": fan.capacity,
    }


def _describe_owner(overlay: str, underlay: str, host_reserve: int, address: str) -> dict:
    fan = FanMap.parse(overlay, underlay, host_reserve)
    host = fan.underlay_host_for(address)
    return {
        "overlay_address": address.strip(),
        "underlay_host": str(host),
        "slice": str(fan.slice_for(host)),
    }


def run(args: argparse.Namespace) -> int:
    """Print the mapping as JSON; 0 on success, 2 on input the Fan refuses."""
    try:
        host_reserve = _host_reserve(args.host_reserve)
        if args.reverse is not None:
            answer = _describe_owner(args.overlay, args.underlay, host_reserve, args.reverse)
        else:
            answer = _describe_host(args.overlay, args.underlay, host_reserve)
    except FanMapError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(answer, indent=2))
    return 0
