"""Prometheus metrics of the agent: program counters, pods, slice use.

The program's verdicts are `cni_fan_program_packets{verdict}`: passed,
encapsulated, dropped, punted, and with direct routing direct (sent
unencapsulated) and fallback (in the segment but encapsulated: the peer's
MAC was not known yet, inner IPv6 over an IPv4 underlay).

The existing series keep their names and (no) labels, so dashboards that
read them see one series as before: pods and slice use count container
indexes, which both families share. What differs per family, the slice
and its gateway, is `cni_fan_slice_info{family,slice,gateway}` (value 1),
one series per family the node serves.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cni_fan.ipam.pool import AddressPool
from cni_fan.plan import NodePlan

if TYPE_CHECKING:
    from cni_fan.node.agent import Agent


class _DatapathCollector:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def collect(self):
        agent = self.agent
        up = GaugeMetricFamily("cni_fan_datapath_up", "1 when the node's datapath matches the plan")
        up.add_metric([], 1.0 if agent.healthy else 0.0)
        yield up
        datapath = agent.datapath
        if datapath is None or agent.conf is None:
            return
        packets = CounterMetricFamily("cni_fan_program_packets", "Packets seen by the fan program, by verdict",
                                      labels=["verdict"])
        for verdict, value in datapath.fanmap.counters().items():
            packets.add_metric([verdict], value)
        yield packets
        foreign = CounterMetricFamily("cni_fan_foreign_tunnel_dropped_packets",
                                      "Encapsulated packets dropped because their source is outside the underlay")
        foreign.add_metric([], datapath.firewall.dropped_foreign())
        yield foreign
        spoofed = CounterMetricFamily("cni_fan_direct_source_dropped_packets",
                                      "Unencapsulated overlay packets on the underlay interface dropped because "
                                      "their source is this node's slice or a node's outside its segment "
                                      "(direct routing)")
        spoofed.add_metric([], datapath.firewall.dropped_direct())
        yield spoofed
        direct = GaugeMetricFamily("cni_fan_direct_routing_info",
                                   "1 when direct routing is on, with the node's underlay segment",
                                   labels=["segment"])
        direct.add_metric([str(datapath.plan.segment or "")], 1.0 if datapath.plan.direct else 0.0)
        yield direct
        pods_plan = datapath.plan.primary  # the family the IPAM keys allocations by
        pool = AddressPool.existing(agent.conf.fan.params.state_dir, pods_plan.first_pod, pods_plan.last_pod)
        used = pool.used() if pool is not None else 0
        capacity = pods_plan.fanmap.capacity
        pods = GaugeMetricFamily("cni_fan_pods", "Pod addresses allocated on this node")
        pods.add_metric([], used)
        yield pods
        slice_capacity = GaugeMetricFamily("cni_fan_slice_capacity", "Pod addresses in this node's slice")
        slice_capacity.add_metric([], capacity)
        yield slice_capacity
        use = GaugeMetricFamily("cni_fan_slice_use_ratio", "Allocated / capacity of this node's slice")
        use.add_metric([], used / capacity)
        yield use
        yield slice_info(datapath.plan)


def slice_info(plan: NodePlan) -> GaugeMetricFamily:
    """One series per family: which slice and gateway this node has (value 1)."""
    info = GaugeMetricFamily("cni_fan_slice_info", "This node's slice and gateway, per address family",
                             labels=["family", "slice", "gateway"])
    for s in plan.slices:
        info.add_metric([f"ipv{s.version}", str(s.slice), str(s.gateway)], 1.0)
    return info


class AgentMetrics:
    def __init__(self, agent: "Agent") -> None:
        self.registry = CollectorRegistry()
        self.repairs = Counter("cni_fan_repairs", "Datapath items the agent had to repair", registry=self.registry)
        self.registry.register(_DatapathCollector(agent))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
