"""`cni-fan`: the operator's command. Each sub-command lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("map", "install", "serve", "node", "lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cni-fan", description="Fan overlay networking for Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"cni_fan.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cni_fan.commands.{name}":
                raise
            continue  # not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)
