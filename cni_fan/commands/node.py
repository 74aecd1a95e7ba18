"""`cni-fan node up|down|show|run`: fanctl for CNI users, and the agent."""
from __future__ import annotations

import argparse
import json
import sys
import time

from cni_fan.node.conf import DEFAULT_CONFLIST


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("node", help="set up, inspect, tear down or keep up this node's fan datapath")
    sub = p.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    for name, helptext in (("up", "set up the datapath (idempotent)"),
                           ("down", "remove exactly what `up` set up"),
                           ("show", "print the slice, devices, program state, counters and pods"),
                           ("run", "the agent: bring the node up and keep it up")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--conflist", default=DEFAULT_CONFLIST,
                       help=f"conflist holding the fan parameters (default {DEFAULT_CONFLIST})")
        q.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        if name == "show":
            q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "run":
            q.add_argument("--cni-conf-dir", default=None,
                           help="install the conflist here (write, then rename) once the node is up")
            q.add_argument("--interval", type=float, default=1.0, help="seconds between checks (default 1)")
            q.add_argument("--guard-interval", type=float, default=10.0,
                           help="seconds between sweeps of the pods' port guards (default 10)")
            q.add_argument("--no-plugin-server", action="store_true",
                           help="do not start the plugin server (plugins then run standalone)")
        q.set_defaults(func=run)


def _setup_logging(level: str) -> None:
    from cni_fan.node.logfmt import setup

    setup(level)


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from cni_fan.net.errors import UnderlayError
    from cni_fan.node.conf import NodeConfigError, load_conflist

    try:
        conf = load_conflist(args.conflist)
        if args.node_command == "run":
            from cni_fan.node.agent import Agent

            return Agent(args.conflist, cni_conf_dir=args.cni_conf_dir, interval=args.interval,
                         plugin_server=not args.no_plugin_server, guard_interval=args.guard_interval).run()
        from cni_fan.node.datapath import NodeDatapath

        datapath = NodeDatapath(conf.fan)
    except (NodeConfigError, UnderlayError) as exc:
        print(f"cni-fan node {args.node_command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.node_command == "up":
            started = time.monotonic()
            fixed = datapath.up()
            remaining = datapath.problems()
            slices = ", ".join(str(s.slice) for s in datapath.plan.slices)
            print(f"node up: slice {slices} on {datapath.plan.bridge}, tunnel {datapath.plan.tunnel}, "
                  f"{'set up' if fixed else 'already up'} in {time.monotonic() - started:.2f}s", file=sys.stderr)
            for problem in remaining:
                print(f"  still wrong: {problem}", file=sys.stderr)
            return 0 if not [p for p in remaining if not p.startswith("sysctl ")] else 1
        if args.node_command == "down":
            for item in datapath.down():
                print(f"removed {item}", file=sys.stderr)
            return 0
        from cni_fan.node.show import describe, render

        info = describe(datapath, conf)
        print(json.dumps(info, indent=1) if args.json else render(info))
        return 0
    finally:
        datapath.close()
