"""Prometheus metrics of the agent: program counters, pods, slice use."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        params = agent.conf.fan.params
        used = 0
        state = Path(params.state_dir)
        if state.is_dir():
            used = sum(1 for p in state.iterdir() if p.name[:1].isdigit())
        pods = GaugeMetricFamily("cni_fan_pods", "Pod addresses allocated on this node")
        pods.add_metric([], used)
        yield pods
        capacity = GaugeMetricFamily("cni_fan_slice_capacity", "Pod addresses in this node's slice")
        capacity.add_metric([], params.fanmap.capacity)
        yield capacity
        use = GaugeMetricFamily("cni_fan_slice_use_ratio", "Allocated / capacity of this node's slice")
        use.add_metric([], used / params.fanmap.capacity)
        yield use


class AgentMetrics:
    def __init__(self, agent: "Agent") -> None:
        self.registry = CollectorRegistry()
        self.repairs = Counter("cni_fan_repairs", "Datapath items the agent had to repair", registry=self.registry)
        self.registry.register(_DatapathCollector(agent))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
