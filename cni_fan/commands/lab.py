"""`cni-fan lab`: emulated nodes and pods in network namespaces on this machine.

    cni-fan lab up --nodes N --pods-per-node M [--encap vxlan|ipip] [--fanmap bpf|routes]
                   [--overlay CIDR] [--overlay6 CIDR6] [--ipv6-only] [--prefix P] [--force] [--timeout S]
                   [--segments N] [--direct-routing] [--keep-on-error]
    cni-fan lab check [--prefix P] [--json] [--ascii]
    cni-fan lab down [--prefix P]

Exit codes: 0 success; 1 the lab failed (up could not finish, a check
failed, down left something behind); 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from cni_fan.lab.segments import MAX_SEGMENTS
from cni_fan.lab.topology import (DEFAULT_OVERLAY, DEFAULT_OVERLAY6_ONLY, DEFAULT_PREFIX, ENCAPS, FANMAPS,
                                  TopologyError)

PROG = "cni-fan lab"
USAGE_ERROR = 2


def _positive(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `lab` (with `up`, `check`, `down`) on the `cni-fan` parser."""
    parser = subparsers.add_parser(
        "lab",
        help="a cluster of emulated nodes and pods in network namespaces (root)",
        description=("Emulated nodes in network namespaces joined by an underlay bridge, each running the real "
                     "node agent, with pods added by the real fan plugin; plus 'ext', a host outside the cluster."),
    )
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = sub.add_parser("up", help="build a lab", description="Build a lab and print what it holds.")
    up.add_argument("--nodes", type=_positive, default=3, help="number of nodes (default 3)")
    up.add_argument("--pods-per-node", type=_positive, default=2, help="pods on each node (default 2)")
    up.add_argument("--encap", choices=ENCAPS, default="vxlan", help="encapsulation (default vxlan)")
    up.add_argument("--fanmap", choices=FANMAPS, default="bpf", help="how nodes map the fan (default bpf)")
    up.add_argument("--overlay", default=DEFAULT_OVERLAY, help=f"overlay network (default {DEFAULT_OVERLAY})")
    up.add_argument("--overlay6", default=None, metavar="PREFIX",
                    help="IPv6 overlay for a dual-stack lab (e.g. fd00:50::/48): pods get an IPv6 address too, "
                         "nodes and ext an IPv6 underlay address, and `lab check` tests both families; with "
                         f"--ipv6-only the only overlay (default {DEFAULT_OVERLAY6_ONLY})")
    up.add_argument("--ipv6-only", action="store_true",
                    help="an IPv6-only lab: nodes and ext have only IPv6 underlay addresses (the fan's underlay "
                         "is an IPv6 /104), pods only an IPv6 address; `lab check` tests IPv6 (pings, NAT66, "
                         "per-peer state)")
    up.add_argument("--segments", type=_positive, default=1,
                    help="underlay L2 segments (default 1: one switch); with N >= 2 the nodes spread round-robin "
                         f"over N segments (198.18.<s>.0/24, up to {MAX_SEGMENTS}) joined by a router namespace, "
                         "and ext sits behind the router")
    up.add_argument("--direct-routing", action="store_true",
                    help="directRouting: true in every node's config: peers on the node's own segment are reached "
                         "unencapsulated; `lab check` verifies each node pair's path on the wire")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"prefix of the lab's names (default {DEFAULT_PREFIX})")
    up.add_argument("--force", action="store_true", help="replace a lab with the same prefix")
    up.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for the node agents to report up "
                         "(default 60; 300 with --fanmap routes, which installs a table for every possible host)")
    up.add_argument("--keep-on-error", action="store_true",
                    help="leave a half-built lab in place for inspection instead of tearing it down")
    up.add_argument("--json", action="store_true", help="print the lab's state as JSON")
    up.set_defaults(func=run)

    check = sub.add_parser("check", help="ping everything, check NAT and per-peer state",
                           description=("Ping every pod from every pod and node, ext from every pod; check that ext "
                                        "sees a pod as its node's underlay address; check that no node holds "
                                        "per-peer overlay state. A dual-stack lab: all of it in IPv6 too (NAT66 "
                                        "towards ext). Exit 0 only if all of that holds."))
    check.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"the lab's prefix (default {DEFAULT_PREFIX})")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--ascii", action="store_true", help="ok/FAIL instead of ✓/✗")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds per probe round (default 3)")
    check.set_defaults(func=run)

    down = sub.add_parser("down", help="remove a lab (fine if it is gone)",
                          description="Stop the node agents, remove the lab's namespaces and files.")
    down.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"the lab's prefix (default {DEFAULT_PREFIX})")
    down.set_defaults(func=run)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _ascii_terminal() -> bool:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return encoding not in ("utf8", "utf_8")


def run(args: argparse.Namespace) -> int:
    from cni_fan.lab import run as lab
    from cni_fan.lab.agents import agent_timeout
    from cni_fan.lab.errors import LabError
    from cni_fan.lab.report import describe, format_report
    from cni_fan.lab.topology import LabSpec, check_prefix

    try:
        check_prefix(args.prefix)
        spec = (LabSpec(prefix=args.prefix, nodes=args.nodes, pods_per_node=args.pods_per_node,
                        encap=args.encap, fanmap=args.fanmap, overlay=args.overlay,
                        overlay6=args.overlay6 or (DEFAULT_OVERLAY6_ONLY if args.ipv6_only else None),
                        ipv6_only=args.ipv6_only, segments=args.segments, direct_routing=args.direct_routing)
                if args.lab_command == "up" else None)
    except TopologyError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if os.geteuid() != 0:
        print(f"{PROG}: needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        if spec is not None:
            # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so `up` tears down what it built.
            signal.signal(signal.SIGTERM, _terminated)
            timeout = args.timeout if args.timeout is not None else agent_timeout(spec)
            state = lab.up(spec, force=args.force, timeout=timeout, keep_on_error=args.keep_on_error)
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                print(describe(state))
                print(f"up in {state.get('seconds')} s; next: `cni-fan lab check --prefix {spec.prefix}`, "
                      f"a shell in a pod: `ip netns exec {spec.node(1).netns}p1 bash`, "
                      f"`cni-fan lab down --prefix {spec.prefix}`")
            return 0
        if args.lab_command == "check":
            report = lab.check(args.prefix, timeout=args.timeout)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(format_report(report, ascii_only=args.ascii or _ascii_terminal()))
            return 0 if report["ok"] else 1
        if args.lab_command == "down":
            return 0 if lab.down(args.prefix) else 1
    except LabError as exc:
        print(f"{PROG} {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.lab_command)
