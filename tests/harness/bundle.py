"""The PyInstaller bundle the build and deploy tests run: dist/cni-fan/,
built from the sources as they are now.

`ensure_bundle` builds it (`make build`) only when it is missing or its
BUILD-ID says other sources; a lock keeps two runs of one tree from
building at once. Tests reach it through the `bundle` fixture
(conftest.py) and are marked `build`.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cni_fan.install import source_build_id
from harness.system import REPO

BUNDLE = REPO / "dist" / "cni-fan"
BUILD_TIMEOUT = 900


def ensure_bundle() -> Path:
    """dist/cni-fan/ built from the sources as they are now (builds it if not)."""
    want = source_build_id(REPO)
    id_file = BUNDLE / "BUILD-ID"
    lock_path = REPO / ".cache" / "build.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run of this tree may be building
        for _ in range(3):  # again if the sources changed while it built
            if id_file.exists() and id_file.read_text().strip() == want and (BUNDLE / "cni-fan").exists():
                return BUNDLE
            started = time.monotonic()
            argv = ["make", "-s", "build"]
            if os.geteuid() != 0:  # make build runs tools/setup.sh, which needs root
                pyinstaller = REPO / ".venv" / "bin" / "pyinstaller"
                if not pyinstaller.exists():
                    pytest.skip("no bundle, and building one needs root (make build) or PyInstaller in .venv")
                argv = [str(pyinstaller), "--noconfirm", "--clean", "--log-level", "WARN", "build.spec"]
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            print(f"built {BUNDLE} in {time.monotonic() - started:.0f}s", file=sys.stderr)
            want = source_build_id(REPO)
    pytest.fail("the sources keep changing while the bundle builds")
