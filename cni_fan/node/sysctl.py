"""Kernel settings the Fan needs, per network namespace, with undo.

`node up` records each value it changes (in the node state file) so that
`node down` can put back exactly what was there before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pyroute2 import IPRoute

from cni_fan.node.state import NodeState
from cni_fan.plan import NodePlan

log = logging.getLogger("cni_fan.node")
# In a container /proc/sys is read-only; the DaemonSet mounts the host's
# /proc/sys/net elsewhere and names it here.
PROC = Path(os.environ.get("CNI_FAN_PROC_SYS", "/proc/sys"))


def _path(key: str) -> Path:
    return PROC / key.replace(".", "/")


def read(key: str) -> str | None:
    try:
        return _path(key).read_text().strip()
    except OSError:
        return None


def write(key: str, value: str) -> str | None:
    """None when written, else why not."""
    try:
        _path(key).write_text(value + "\n")
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


def wanted(plan: NodePlan) -> dict[str, str]:
    """Forwarding on; bridged pod traffic visible to iptables (kube-proxy);
    loose reverse-path filtering where tunnelled traffic comes and goes.

    With `overlay6` also: IPv6 forwarding (`all`, which every device
    follows); bridged IPv6 visible to ip6tables; IPv6 on for the bridge and
    the tunnel; no router advertisements taken on the bridge (a pod must not
    become the node's router); no DAD on the bridge: its link-local address
    appears with its carrier, when the first pod joins, and while it is
    tentative the node cannot send neighbour solicitations for the pods
    (their first packets would wait a retransmission); the bridge's MAC is
    the node's own, so the address is unique by construction. `all.forwarding=1` makes the kernel drop the
    default routes learnt from RAs on every interface whose accept_ra is not
    2, and ignore RAs there from then on: docs/install.md says what
    operators set on the underlay interface; it is not changed here.

    An IPv6-only node (no IPv4 slice) gets the IPv6 settings alone.

    With direct routing, overlay packets arrive unencapsulated on the
    underlay interface, with a source whose route back is the tunnel: its
    IPv4 `rp_filter` goes to loose (2), which wins over a strict `all`
    (the kernel uses the larger of the two); the firewall drops overlay
    sources that cannot come from there. On a dual-stack node IPv6 must be
    on for the underlay interface too, or the kernel drops the direct IPv6
    packets it receives.
    """
    out = {} if plan.ipv4 is None else {
        "net.ipv4.ip_forward": "1",
        "net.bridge.bridge-nf-call-iptables": "1",
        f"net.ipv4.conf.{plan.tunnel}.rp_filter": "2",
        f"net.ipv4.conf.{plan.bridge}.rp_filter": "2",
    }
    if plan.ipv6 is not None:
        out |= {
            "net.ipv6.conf.all.forwarding": "1",
            "net.bridge.bridge-nf-call-ip6tables": "1",
            f"net.ipv6.conf.{plan.bridge}.disable_ipv6": "0",
            f"net.ipv6.conf.{plan.tunnel}.disable_ipv6": "0",
            f"net.ipv6.conf.{plan.bridge}.accept_ra": "0",
            f"net.ipv6.conf.{plan.bridge}.accept_dad": "0",
        }
    if plan.direct and plan.ipv4 is not None:
        out[f"net.ipv4.conf.{plan.underlay_ifname}.rp_filter"] = "2"
        if plan.ipv6 is not None:
            out[f"net.ipv6.conf.{plan.underlay_ifname}.disable_ipv6"] = "0"
    return out


class Sysctls:
    """The settings of `wanted`; the values they replaced go to `state.saved_sysctls`.

    Last in the datapath's list: the per-device keys exist only once the
    bridge and the tunnel do.
    """
    role = "sysctls"

    def __init__(self, plan: NodePlan, state: NodeState) -> None:
        self.settings = wanted(plan)
        self.state = state
        self._warned: set[str] = set()  # a key that cannot be written is logged once, not every reconcile

    def problems(self, ipr: IPRoute) -> list[str]:
        out = []
        for key, value in self.settings.items():
            current = read(key)
            if current is not None and current != value:
                out.append(f"sysctl {key} is {current}, want {value}")
        return out

    def ensure(self, ipr: IPRoute) -> None:
        """Set each value, remembering the old one the first time; a key
        that cannot be set (br_netfilter not loaded, say) is logged, not fatal."""
        for key, value in self.settings.items():
            current = read(key)
            failed = current is None
            if current is not None and current != value:
                self.state.saved_sysctls.setdefault(key, current)
                error = write(key, value)
                if error is not None:
                    failed = True
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning("cannot set %s=%s: %s", key, value, error)
            if failed:
                log.warning("could not set %s (is br_netfilter loaded on the host?)", key)

    def remove(self, ipr: IPRoute) -> list[str]:
        saved = self.state.saved_sysctls
        for key, value in saved.items():
            if read(key) is not None:  # a device's key is gone with the device
                error = write(key, value)
                if error is not None:
                    log.warning("cannot restore %s=%s: %s", key, value, error)
        return ["sysctls restored: " + ", ".join(sorted(saved))] if saved else []
