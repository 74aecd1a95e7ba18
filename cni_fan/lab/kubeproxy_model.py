"""What the lab's kube-proxy rules are rendered from: services, endpoints, the node's view. Pure.

kube-proxy runs one proxier per IP family (its meta-proxier hands each the
services of its family): a `NodeView` is one family's view of a node, and
a service or endpoint of the other family is not its business. The family
follows from the addresses (an IPv6 address has a colon).
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import netaddr

IPTABLES, NFTABLES = "iptables", "nftables"
MODES = (IPTABLES, NFTABLES)
FAMILIES = (4, 6)
MASQ_MARK = "0x4000"
PROTOCOLS = ("tcp", "udp")
# The lab's service ranges when a NodeView names none (kube-apiserver --service-cluster-ip-range).
DEFAULT_SERVICE_CIDRS = {4: "10.96.0.0/16", 6: "fd00:96::/112"}


def family_of(address: str) -> int:
    """4 or 6: the family of an address or prefix; ValueError for anything else."""
    try:
        return netaddr.IPNetwork(address).version
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError(f"not an IP address or prefix: {address!r}") from None


def host_port(ip: str, port: int) -> str:
    """`ip:port`, IPv6 in brackets (`[fd00::1]:80`), as DNAT targets write it."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def hash_suffix(text: str, length: int) -> str:
    """Chain-name suffix: base32 of SHA-256, as kube-proxy names its per-service chains."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:length]


@dataclass(frozen=True)
class Endpoint:
    """A ready endpoint of a service: a pod (or a host-network process) and the node it runs on."""
    ip: str
    port: int
    node_ip: str

    def __str__(self) -> str:
        return host_port(self.ip, self.port)

    @property
    def family(self) -> int:
        return family_of(self.ip)


@dataclass(frozen=True)
class Service:
    """One port of a Service (kube-proxy programs service *ports*), in the family of its ClusterIP."""
    name: str                        # "namespace/name"
    cluster_ip: str
    port: int
    protocol: str                    # "tcp" | "udp"
    endpoints: tuple[Endpoint, ...]
    node_port: int | None = None
    external_local: bool = False     # externalTrafficPolicy: Local

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"service {self.name}: protocol {self.protocol!r}, want one of {PROTOCOLS}")
        if self.name.count("/") != 1:
            raise ValueError(f"service {self.name!r}: want namespace/name")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        family = self.family
        stray = [str(ep) for ep in self.endpoints if ep.family != family]
        if stray:
            raise ValueError(f"service {self.name}: ClusterIP {self.cluster_ip} is IPv{family}, "
                             f"endpoints {', '.join(stray)} are not (a Service port has one family)")

    @property
    def family(self) -> int:
        return family_of(self.cluster_ip)

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName as text: `namespace/name:port-name`."""
        return f"{self.name}:p{self.port}"

    def local_endpoints(self, node_ip: str) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.endpoints if ep.node_ip == node_ip)


@dataclass(frozen=True)
class NodeView:
    """What one node's kube-proxy is configured with, for one family: the
    node's address of that family, --cluster-cidr of that family (the Fan's
    `overlay` or `overlay6`) and that family's service range."""
    node_ip: str
    cluster_cidr: str
    service_cidr: str | None = None

    def __post_init__(self) -> None:
        family = self.family
        if self.service_cidr is None:
            object.__setattr__(self, "service_cidr", DEFAULT_SERVICE_CIDRS[family])
        for key in ("cluster_cidr", "service_cidr"):
            value = getattr(self, key)
            if family_of(value) != family:
                raise ValueError(f"node view: {key} {value} is not IPv{family} like node_ip {self.node_ip}")

    @property
    def family(self) -> int:
        return family_of(self.node_ip)

    def services(self, services: "tuple[Service, ...] | list[Service]") -> list[Service]:
        """The services of this view's family, in order (what the family's proxier is handed)."""
        return [svc for svc in services if svc.family == self.family]


@dataclass(frozen=True)
class Rules:
    """Rendered rules for one node and family. `text` is iptables-restore
    (--noflush) or `nft -f` input; `jumps` (iptables mode only) are (table,
    built-in chain, rule arguments) kept at the top of the built-in chains."""
    mode: str
    text: str
    jumps: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    family: int = 4
