"""The per-packet Fan mapping as an eBPF program on the tunnel's egress.

Attach point: tc egress of the tunnel device. Pod traffic for a remote
slice has then been through the kernel's forwarding (TTL, conntrack,
iptables FORWARD and kube-proxy's DNAT), and traffic the node itself sends
into the overlay takes the same route, so one program covers both and
nothing bypasses the firewall. The program encapsulates and hands the
packet to the underlay device (docs/datapath.md).

For IPIP the program only sets the tunnel key on a collect-metadata
device (`cni_fan.bpf.tunnelkey`); the device encapsulates.

The agent loads a fresh program (and counters map) when it starts and
atomically replaces whatever filter sits in our slot, unless that slot
already holds the same code (same tag, our filter name, direct action):
that program is kept, with its counters, so a second `node up` or an agent
restart changes nothing. It then watches that its program id stays
attached.
"""
from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute

from cni_fan.bpf import syscall
from cni_fan.bpf.fanprog import (COUNTER_SLOTS, Counter, FanDatapathParams, Hook, build_encap_program,
                                 counter_key)
from cni_fan.bpf.fanprog_u6 import Underlay6DatapathParams, build_underlay6_program
from cni_fan.bpf.tunnelkey import IpipKeyParams, build_ipip_key_program
from cni_fan.net import links, tc
from cni_fan.net.rtnl import Rtnl
from cni_fan.plan import NodePlan

log = logging.getLogger("cni_fan.node")
FILTER_NAME = "cni-fan"


DatapathParams = FanDatapathParams | Underlay6DatapathParams


def datapath_params(plan: NodePlan) -> DatapathParams:
    """The VXLAN program's parameters; with `overlay6` it maps inner IPv6 too (over the IPv4 underlay).

    The node's segment always goes in (encapsulated packets to a peer in it name the peer as next
    hop); with `directRouting` the program also sends them unencapsulated.

    On an IPv6-only node (an IPv6 underlay) the program is the one that
    writes outer IPv6 headers (`fanprog_u6`, VXLAN over UDP/IPv6).
    """
    device = dict(underlay_ifindex=plan.underlay_ifindex, vni=plan.vni, tunnel_mac=plan.tunnel_mac,
                  inner_src_mac=plan.inner_src_mac, hook=Hook.EGRESS, udp_port=plan.vxlan_port, direct=plan.direct)
    if plan.ipv4 is None:
        assert plan.ipv6 is not None
        return Underlay6DatapathParams(
            segment=None if plan.segment is None else ipaddress.IPv6Network(str(plan.segment)),
            overlay6=ipaddress.IPv6Network(str(plan.ipv6.overlay.cidr)),
            underlay=ipaddress.IPv6Network(str(plan.ipv6.underlay.cidr)),
            local_underlay=ipaddress.IPv6Address(str(plan.ipv6.host)), **device)
    return FanDatapathParams(
        segment=None if plan.segment is None else ipaddress.IPv4Network(str(plan.segment)),
        overlay=ipaddress.IPv4Network(str(plan.ipv4.overlay.cidr)),
        underlay=ipaddress.IPv4Network(str(plan.ipv4.underlay.cidr)),
        local_underlay=ipaddress.IPv4Address(str(plan.ipv4.host)),
        overlay6=None if plan.ipv6 is None else ipaddress.IPv6Network(str(plan.ipv6.overlay.cidr)), **device)


def ipip_params(plan: NodePlan) -> IpipKeyParams:
    assert plan.ipv4 is not None  # the config refuses IPIP without an IPv4 overlay
    return IpipKeyParams(overlay=ipaddress.IPv4Network(str(plan.ipv4.overlay.cidr)),
                         underlay=ipaddress.IPv4Network(str(plan.ipv4.underlay.cidr)),
                         local_underlay=ipaddress.IPv4Address(str(plan.ipv4.host)))


def attached_counters(prog_id: int) -> dict[str, int]:
    """The verdict counters of the attached program `prog_id` (another process loaded it: the agent,
    or `node up`), by name; {} when it has no counters map or is gone."""
    try:
        prog_fd = syscall.prog_fd_by_id(prog_id)
    except OSError:
        return {}
    try:
        map_ids = syscall.prog_map_ids(prog_fd)
        if len(map_ids) != 1:
            return {}
        map_fd = syscall.map_fd_by_id(map_ids[0])
        try:
            return {c.name.lower(): sum(syscall.read_percpu_u64(map_fd, counter_key(Hook.EGRESS, c)))
                    for c in Counter}
        finally:
            syscall.close(map_fd)
    except OSError:
        return {}
    finally:
        syscall.close(prog_fd)


class BpfFanmap:
    """One loaded program and its counters, owned by this process."""
    role = "fanmap"

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.prog_fd: int | None = None
        self.map_fd: int | None = None
        self.prog_id: int | None = None
        self.tag: str | None = None
        self.params: DatapathParams | IpipKeyParams | None = None

    def _load(self, params: DatapathParams | IpipKeyParams) -> None:
        self.close()
        if isinstance(params, IpipKeyParams):
            self.prog_fd = syscall.load_sched_cls(build_ipip_key_program(params), name="cni_fan_ipip")
        else:
            self.map_fd = syscall.create_percpu_array(8, COUNTER_SLOTS, name="cni_fan_cnt")
            build = build_underlay6_program if isinstance(params, Underlay6DatapathParams) else build_encap_program
            self.prog_fd = syscall.load_sched_cls(build(params, self.map_fd), name="cni_fan_encap")
        info = syscall.prog_info(self.prog_fd)
        self.prog_id, self.tag = info.id, info.tag
        self.params = params
        overlay = params.overlay6 if isinstance(params, Underlay6DatapathParams) else params.overlay
        direct = getattr(params, "direct", False)
        log.info("loaded the fan program (id %d) for %s over %s; direct routing %s", self.prog_id, overlay,
                 params.underlay, f"on in segment {params.segment}" if direct else "off")

    def ensure(self, ipr: IPRoute) -> None:
        plan = self.plan
        tunnel_index = links.link_index(ipr, plan.tunnel)
        params = datapath_params(plan) if plan.encap == "vxlan" else ipip_params(plan)
        if self.prog_fd is None or params != self.params:
            self._load(params)
        with Rtnl() as sock:
            if tc.is_attached(sock, tunnel_index, Hook.EGRESS, prog_id=self.prog_id):
                return
            if self._adopt(tc.find(sock, tunnel_index, Hook.EGRESS)):
                return
            tc.attach(sock, tunnel_index, self.prog_fd, Hook.EGRESS, name=FILTER_NAME)

    def _adopt(self, found: tc.AttachedProgram | None) -> bool:
        """Take over the attached program if it is ours and the same code.

        The kernel's tag hashes the instructions (with map references
        zeroed), and every parameter is an immediate: same tag, same
        behaviour. Replacing it with the copy just loaded would change only
        its id and reset its counters.
        """
        if (found is None or found.prog_id is None or found.prog_id == self.prog_id or not found.direct_action
                or found.name != FILTER_NAME or found.tag != self.tag):
            return False
        prog_fd = map_fd = None
        try:
            prog_fd = syscall.prog_fd_by_id(found.prog_id)
            if self.map_fd is not None:
                map_ids = syscall.prog_map_ids(prog_fd)
                if len(map_ids) != 1:
                    syscall.close(prog_fd)
                    return False
                map_fd = syscall.map_fd_by_id(map_ids[0])
        except OSError as exc:
            log.info("cannot take over program %d (%s); replacing it", found.prog_id, exc)
            if prog_fd is not None:
                syscall.close(prog_fd)
            return False
        params = self.params
        self.close()
        self.prog_fd, self.map_fd, self.prog_id, self.tag, self.params = prog_fd, map_fd, found.prog_id, found.tag, \
            params
        log.info("kept the attached fan program (id %d): same code as ours", found.prog_id)
        return True

    def problems(self, ipr: IPRoute) -> list[str]:
        plan = self.plan
        tunnel_index = links.link_index(ipr, plan.tunnel)
        if tunnel_index is None:
            return ["fan program: no tunnel to attach to"]
        with Rtnl() as sock:
            found = tc.find(sock, tunnel_index, Hook.EGRESS)
        if found is None:
            return [f"fan program is not attached to {plan.tunnel} egress"]
        if self.prog_id is not None and found.prog_id != self.prog_id:
            return [f"{plan.tunnel} egress holds program {found.prog_id}, not ours ({self.prog_id})"]
        if not found.direct_action:
            return [f"{plan.tunnel} egress filter is not in direct-action mode"]
        return []

    def remove(self, ipr: IPRoute) -> list[str]:
        tunnel_index = links.link_index(ipr, self.plan.tunnel)
        removed = False
        if tunnel_index is not None:
            with Rtnl() as sock:
                removed = tc.detach(sock, tunnel_index, Hook.EGRESS)
        self.close()
        return ["fan program"] if removed else []

    def counters(self) -> dict[str, int]:
        if self.map_fd is None:
            return {}
        return {c.name.lower(): sum(syscall.read_percpu_u64(self.map_fd, counter_key(Hook.EGRESS, c)))
                for c in Counter}

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            if fd is not None:
                syscall.close(fd)
        self.prog_fd = self.map_fd = self.prog_id = self.tag = None
        self.params = None
