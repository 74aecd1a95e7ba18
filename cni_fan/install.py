"""Put `fan` and `fan-ipam` into a CNI bin directory, atomically.

A kubelet may run a plugin at any moment, so each file is written beside
its final name and renamed over it: the runtime sees the old file or the
new one, never half of one.

Two layouts: from a PyInstaller bundle (`sys.frozen`), the bundle's
executables are copied; from a Python environment, a small launcher is
written that starts Python with `-S` (skipping `site` saves about 20 ms a
call) and puts exactly the package's directories on the path.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import cni_fan

PLUGINS = {"fan": "fan_main", "fan-ipam": "fan_ipam_main"}


def _write_atomically(dest: Path, data: bytes | None = None, copy_from: Path | None = None) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            tmp.write_bytes(data or b"")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def launcher(function: str) -> bytes:
    package_parent = str(Path(cni_fan.__file__).resolve().parent.parent)
    paths = [package_parent, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths = list(dict.fromkeys(paths))
    return (f"#!{sys.executable} -S\n"
            f"# cni-fan {cni_fan.__version__} launcher, written by `cni-fan install`\n"
            f"import sys\nsys.path[:0] = {paths!r}\n"
            f"from cni_fan.entry import {function}\n{function}()\n").encode()


def install_plugins(bin_dir: str) -> list[Path]:
    dest_dir = Path(bin_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, function in PLUGINS.items():
        dest = dest_dir / name
        if getattr(sys, "frozen", False):
            _write_atomically(dest, copy_from=Path(sys.executable).with_name(name))
        else:
            _write_atomically(dest, data=launcher(function))
        written.append(dest)
    return written
