"""The node agent's sweep over the pods' port guards: put back the node side of what is missing.

A pod port is a port of the fan bridge whose alias names its pod
(`cni-fan <ip> <mac>`, then the IPv6 address for a dual-stack pod, set at ADD). Someone deleting a pod's tc filter,
FDB or neighbour entry, or turning flooding back on, would otherwise
silently undo anti-spoofing or neighbour suppression until the pod is
re-created. Judged with CHECK's own `observe` and `missing`, re-installed
with ADD's own batch (`install_host`, idempotent).
"""
from __future__ import annotations

import os

from cni_fan.net.portguard import alias_ip6, gateway_mac, install_host, load_program, parse_alias, pin_bridge_mac
from cni_fan.net.portguard_check import missing, observe
from cni_fan.net.rtnl import Rtnl
from cni_fan.net.rtnl_links import link_info, port_links


def repair(cfg, *, bridge_index: int, gateway: str) -> list[str]:
    """Put back the node side of every pod port's guard; returns what was wrong, one phrase each.

    The pod side (the gateway entry in the pod) is CHECK's to report: the
    agent does not enter pods. The caller holds the attachment lock of the
    whole network, so no ADD or DEL is half done while this looks.
    """
    suppress, spoof = cfg.neigh_suppress, cfg.anti_spoof
    if not (suppress or spoof):
        return []
    with Rtnl() as host:
        ports = [(link, claimed, alias_ip6(link.alias)) for link in port_links(host, bridge_index)
                 if (claimed := parse_alias(link.alias)) is not None]
    found: list[str] = []
    for link, (ip, mac), ip6 in ports:
        state = observe(link.name or "", suppress=suppress, spoof=spoof, pod_ip=ip, pod_mac=mac, gateway=gateway,
                        pod_ip6=ip6)
        if state.veth_index is None:
            continue  # deleted since the dump: nothing to guard
        wrong = missing(state, suppress=suppress, spoof=spoof, pod_ip=ip, pod_mac=mac, gateway=gateway, pod_ip6=ip6)
        if not wrong:
            continue
        prog_fd = load_program(mac, ip, ip6) if spoof else None
        try:
            with Rtnl() as host:
                replies = install_host(host, bridge_index, link.index, ip, mac, suppress, prog_fd, ip6)
                if suppress and link_info(replies[1].body).address != gateway_mac(gateway):
                    pin_bridge_mac(host, bridge_index, gateway_mac(gateway))
        finally:
            if prog_fd is not None:
                os.close(prog_fd)
        found += [f"{link.name} ({ip or ip6}): {w.removeprefix('port guard: ')}" for w in wrong]
    return found
