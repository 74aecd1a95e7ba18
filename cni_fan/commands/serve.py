"""`cni-fan serve`: the plugin server on its own (the agent also starts it)."""
from __future__ import annotations

import argparse

from cni_fan.entry import DEFAULT_SOCKET


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the plugin server that answers fan/fan-ipam calls quickly")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"UNIX socket path (default {DEFAULT_SOCKET})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this one exits, even if it was killed (for a "
                        "server a script starts; the agent stops the server it starts itself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cni_fan.server import PluginServer

    from cni_fan.node.logfmt import setup

    setup(args.log_level)
    PluginServer(args.socket, exit_with_parent=args.exit_with_parent).serve_forever()
    return 0
