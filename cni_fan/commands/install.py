"""`cni-fan install`: the plugins into a CNI bin directory (init container, lab, tests)."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("install", help="install fan and fan-ipam into a CNI bin directory")
    p.add_argument("--bin-dir", default="/opt/cni/bin", help="CNI bin directory (default /opt/cni/bin)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cni_fan.install import install_plugins

    try:
        for path in install_plugins(args.bin_dir):
            print(f"installed {path}", file=sys.stderr)
    except OSError as exc:
        print(f"cni-fan install: {exc}", file=sys.stderr)
        return 1
    return 0
