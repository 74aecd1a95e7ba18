"""Kernel settings the Fan needs, per network namespace, with undo.

`node up` records each value it changes (in the node state file) so that
`node down` can put back exactly what was there before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("cni_fan.node")
# In a container /proc/sys is read-only; the DaemonSet mounts the host's
# /proc/sys/net elsewhere and names it here.
PROC = Path(os.environ.get("CNI_FAN_PROC_SYS", "/proc/sys"))
_warned: set[str] = set()


def _path(key: str) -> Path:
    return PROC / key.replace(".", "/")


def read(key: str) -> str | None:
    try:
        return _path(key).read_text().strip()
    except OSError:
        return None


def write(key: str, value: str) -> bool:
    try:
        _path(key).write_text(value + "\n")
        return True
    except OSError as exc:
        if key not in _warned:  # once, not every reconcile
            _warned.add(key)
            log.warning("cannot set %s=%s: %s", key, value, exc.strerror)
        return False


def wanted(bridge: str, tunnel: str) -> dict[str, str]:
    """Forwarding on; bridged pod traffic visible to iptables (kube-proxy);
    loose reverse-path filtering where tunnelled traffic comes and goes."""
    return {
        "net.ipv4.ip_forward": "1",
        "net.bridge.bridge-nf-call-iptables": "1",
        f"net.ipv4.conf.{tunnel}.rp_filter": "2",
        f"net.ipv4.conf.{bridge}.rp_filter": "2",
    }


def apply(settings: dict[str, str], saved: dict[str, str]) -> list[str]:
    """Set each value; remember the old one in `saved` the first time.
    Returns the keys that could not be set (br_netfilter not loaded, say)."""
    failed = []
    for key, value in settings.items():
        current = read(key)
        if current is None:
            failed.append(key)
            continue
        if current != value:
            saved.setdefault(key, current)
            if not write(key, value):
                failed.append(key)
    return failed


def differences(settings: dict[str, str]) -> list[str]:
    out = []
    for key, value in settings.items():
        current = read(key)
        if current is not None and current != value:
            out.append(f"sysctl {key} is {current}, want {value}")
    return out


def restore(saved: dict[str, str]) -> None:
    for key, value in saved.items():
        if read(key) is not None:
            write(key, value)
