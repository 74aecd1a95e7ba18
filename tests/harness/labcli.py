"""`cni-fan lab ...` run as an operator runs it, for the lab tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

CNI_FAN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cni-fan"


def lab(*argv: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `cni-fan lab ARGV`; with `check`, a non-zero exit fails the test with both outputs."""
    proc = subprocess.run([str(CNI_FAN), "lab", *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"cni-fan lab {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
