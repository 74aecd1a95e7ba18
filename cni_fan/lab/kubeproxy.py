"""kube-proxy-shaped Service NAT for one lab node, in both of kube-proxy's Linux modes this kernel has.

The lab has no API server and no kube-proxy binary; what a datapath must
carry is kube-proxy's *rules*, so this module writes them from the shapes
kube-proxy documents and writes (pkg/proxy/iptables, pkg/proxy/nftables and
its README):

- **iptables mode**: `iptables-restore --noflush` input for the nat and
  filter tables (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-EXT-*,
  KUBE-SVL-*, KUBE-NODEPORTS, KUBE-MARK-MASQ, KUBE-POSTROUTING,
  KUBE-FORWARD, KUBE-EXTERNAL-SERVICES) plus the jumps from the built-in
  chains, which kube-proxy keeps at their top one rule at a time.
- **nftables mode**: the whole `table ip kube-proxy` (base chains
  `filter-*` / `nat-*`, the `service-ips` and `service-nodeports` verdict
  maps, per-service chains choosing an endpoint chain with `numgen random`,
  endpoint chains, `mark-for-masquerade` and `masquerading`).

The same decisions in both: DNAT in prerouting (pods, outside) and output
(host-network clients); mark 0x4000 for masquerade when the client is
outside `clusterCIDR` (the Fan overlay), when a pod reaches itself
(hairpin), and for NodePorts with the Cluster policy; MASQUERADE in
postrouting of what is marked. The Local policy keeps the client's address
and uses only this node's endpoints. Not modelled: session affinity,
LoadBalancer and external IPs, IPv6.

Rendering is pure; `apply`, `remove` and `check` run the tools inside a
node's namespace through a caller-supplied argv wrapper (`nsenter --net=...`).
"""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

IPTABLES, NFTABLES = "iptables", "nftables"
MODES = (IPTABLES, NFTABLES)
MASQ_MARK = "0x4000"
NFT_TABLE = "kube-proxy"
PROTOCOLS = ("tcp", "udp")
# kube-proxy names its base chains' priorities `dstnat` (-100) and `srcnat` (100);
# nft 1.0.6 (Debian 12) accepts those names in fewer hooks than newer nft, so numbers.
DSTNAT, SRCNAT = -100, 100

# argv -> the same argv run inside the node's namespace (e.g. Netns.argv).
ArgvWrapper = Callable[[Sequence[str]], list[str]]


class KubeProxyError(Exception):
    """Rules could not be loaded, checked or removed."""


@dataclass(frozen=True)
class Endpoint:
    """A ready endpoint of a service: a pod (or a host-network process) and the node it runs on."""
    ip: str
    port: int
    node_ip: str

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Service:
    """One port of a Service (kube-proxy programs service *ports*)."""
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

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName as text: `namespace/name:port-name`."""
        return f"{self.name}:p{self.port}"

    def local_endpoints(self, node_ip: str) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.endpoints if ep.node_ip == node_ip)


@dataclass(frozen=True)
class NodeView:
    """What one node's kube-proxy is configured with."""
    node_ip: str
    cluster_cidr: str                # --cluster-cidr: the Fan overlay
    service_cidr: str = "10.96.0.0/16"


@dataclass(frozen=True)
class Rules:
    """Rendered rules for one node. `text` is iptables-restore (--noflush) or
    `nft -f` input; `jumps` (iptables mode only) are (table, built-in chain,
    rule arguments) kept at the top of the built-in chains."""
    mode: str
    text: str
    jumps: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def _hash(text: str, length: int) -> str:
    """Chain-name suffix: base32 of SHA-256, as kube-proxy names its per-service chains."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:length]


# -- iptables mode -----------------------------------------------------------------------------

IPTABLES_JUMPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                         "kubernetes externally-visible service portals", "-j", "KUBE-EXTERNAL-SERVICES")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                           "kubernetes externally-visible service portals", "-j", "KUBE-EXTERNAL-SERVICES")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                           "kubernetes service portals", "-j", "KUBE-SERVICES")),
    ("filter", "OUTPUT", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                          "kubernetes service portals", "-j", "KUBE-SERVICES")),
    ("filter", "FORWARD", ("-m", "comment", "--comment", "kubernetes forwarding rules", "-j", "KUBE-FORWARD")),
    ("nat", "PREROUTING", ("-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")),
    ("nat", "OUTPUT", ("-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")),
    ("nat", "POSTROUTING", ("-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING")),
)
# Per-service chains kube-proxy deletes when their service goes.
_SERVICE_CHAIN = re.compile(r"^KUBE-(SVC|SVL|SEP|EXT)-[A-Z2-7]{16}$")


def iptables_chains(svc: Service) -> dict[str, str]:
    """KUBE-SVC/SVL/EXT names of a service port (hash of port name and protocol)."""
    suffix = _hash(svc.port_name + svc.protocol, 16)
    return {kind: f"KUBE-{kind}-{suffix}" for kind in ("SVC", "SVL", "EXT")}


def iptables_endpoint_chain(svc: Service, ep: Endpoint) -> str:
    return "KUBE-SEP-" + _hash(svc.port_name + svc.protocol + str(ep), 16)


def _q(text: str) -> str:
    return f'"{text}"' if " " in text else text


def _spread(chain: str, svc: Service, endpoints: Sequence[Endpoint]) -> list[str]:
    """`-m statistic --mode random` rules that pick each endpoint with equal chance."""
    lines = []
    for i, ep in enumerate(endpoints):
        left = len(endpoints) - i
        chance = f" -m statistic --mode random --probability {1 / left:.10f}" if left > 1 else ""
        lines.append(f"-A {chain} -m comment --comment {_q(f'{svc.port_name} -> {ep}')}{chance}"
                     f" -j {iptables_endpoint_chain(svc, ep)}")
    return lines


def render_iptables(services: Sequence[Service], node: NodeView) -> Rules:
    """kube-proxy's iptables-mode nat and filter rules for `node`."""
    nat_chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODEPORTS"]
    nat = [f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
           f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
           '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
           " -j MASQUERADE --random-fully",
           f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"]
    filter_chains = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD"]
    filt: list[str] = []
    for svc in services:
        chains = iptables_chains(svc)
        match = f"-m {svc.protocol} -p {svc.protocol}"
        if not svc.endpoints:
            filt.append(f"-A KUBE-SERVICES -m comment --comment {_q(f'{svc.port_name} has no endpoints')} {match}"
                        f" -d {svc.cluster_ip} --dport {svc.port} -j REJECT")
            if svc.node_port:
                filt.append(f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {_q(f'{svc.port_name} has no endpoints')}"
                            f" -m addrtype --dst-type LOCAL {match} --dport {svc.node_port} -j REJECT")
            continue
        svc_chain = chains["SVC"]
        nat_chains.append(svc_chain)
        nat.append(f"-A KUBE-SERVICES -m comment --comment {_q(f'{svc.port_name} cluster IP')} {match}"
                   f" -d {svc.cluster_ip} --dport {svc.port} -j {svc_chain}")
        nat.append(f"-A {svc_chain} -m comment --comment {_q(f'{svc.port_name} cluster IP')} {match}"
                   f" -d {svc.cluster_ip} --dport {svc.port} ! -s {node.cluster_cidr} -j KUBE-MARK-MASQ")
        nat += _spread(svc_chain, svc, svc.endpoints)
        for ep in svc.endpoints:
            sep = iptables_endpoint_chain(svc, ep)
            nat_chains.append(sep)
            nat.append(f"-A {sep} -m comment --comment {svc.port_name} -s {ep.ip} -j KUBE-MARK-MASQ")
            nat.append(f"-A {sep} -m comment --comment {svc.port_name} {match} -j DNAT --to-destination {ep}")
        if svc.node_port:
            nat_chains.append(chains["EXT"])
            nat.append(f"-A KUBE-NODEPORTS -m comment --comment {svc.port_name} {match}"
                       f" --dport {svc.node_port} -j {chains['EXT']}")
            nat += _external_iptables(svc, node, chains, nat_chains, filt)
    nat.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last'
               ' rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    filt += ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
             f" -m mark --mark {MASQ_MARK}/{MASQ_MARK}"
             " -j ACCEPT",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
             " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    text = "\n".join(["*filter", *(f":{c} - [0:0]" for c in filter_chains), *filt, "COMMIT",
                      "*nat", *(f":{c} - [0:0]" for c in dict.fromkeys(nat_chains)), *nat, "COMMIT"]) + "\n"
    return Rules(IPTABLES, text, IPTABLES_JUMPS)


def _external_iptables(svc: Service, node: NodeView, chains: dict[str, str], nat_chains: list[str],
                       filt: list[str]) -> list[str]:
    """KUBE-EXT-*: Cluster policy masquerades everything; Local policy sends
    pods and the node itself to the cluster-wide chain, everything else to
    this node's endpoints (KUBE-SVL-*) without masquerade."""
    ext, svc_chain = chains["EXT"], chains["SVC"]
    if not svc.external_local:
        return [f"-A {ext} -m comment --comment {_q(f'masquerade traffic for {svc.port_name} external destinations')}"
                " -j KUBE-MARK-MASQ",
                f"-A {ext} -j {svc_chain}"]
    lines = [f"-A {ext} -m comment --comment {_q(f'pod traffic for {svc.port_name} external destinations')}"
             f" -s {node.cluster_cidr} -j {svc_chain}",
             f"-A {ext} -m comment"
             f" --comment {_q(f'masquerade LOCAL traffic for {svc.port_name} external destinations')}"
             " -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
             f"-A {ext} -m comment --comment {_q(f'route LOCAL traffic for {svc.port_name} external destinations')}"
             f" -m addrtype --src-type LOCAL -j {svc_chain}"]
    local = svc.local_endpoints(node.node_ip)
    if not local:
        filt.append(f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {_q(f'{svc.port_name} has no local endpoints')}"
                    f" -m addrtype --dst-type LOCAL -m {svc.protocol} -p {svc.protocol}"
                    f" --dport {svc.node_port} -j DROP")
        return lines
    nat_chains.append(chains["SVL"])
    return lines + [f"-A {ext} -j {chains['SVL']}"] + _spread(chains["SVL"], svc, local)


def stale_iptables_chains(saved: str, rules: Rules) -> list[str]:
    """Per-service chains in `iptables-save -t nat` output that `rules` no longer declares."""
    wanted = set(re.findall(r"^:(\S+)", rules.text, re.M))
    return [c for c in re.findall(r"^:(\S+)", saved, re.M) if _SERVICE_CHAIN.match(c) and c not in wanted]


def iptables_removal(saved_nat: str, saved_filter: str) -> str:
    """iptables-restore input that empties and deletes every KUBE-* chain in the saved tables."""
    out = []
    for table, saved in (("filter", saved_filter), ("nat", saved_nat)):
        chains = [c for c in re.findall(r"^:(\S+)", saved, re.M) if c.startswith("KUBE-")]
        out += [f"*{table}", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains), "COMMIT"]
    return "\n".join(out) + "\n"


# -- nftables mode -----------------------------------------------------------------------------

def nft_chain_base(svc: Service) -> str:
    """`HASH-namespace/name/protocol/port-name`, the base of a service port's nftables chains."""
    readable = f"{svc.name}/{svc.protocol}/p{svc.port}"
    return f"{_hash(readable, 8)}-{readable}"


def nft_endpoint_chain(svc: Service, ep: Endpoint) -> str:
    readable = f"{svc.name}/{svc.protocol}/p{svc.port}__{ep.ip}/{ep.port}"
    return f"endpoint-{_hash(readable, 8)}-{readable}"


def _nft_elements(items: Sequence[str]) -> list[str]:
    return [f"    elements = {{ {', '.join(items)} }}"] if items else []


def _nft_pick(svc: Service, endpoints: Sequence[Endpoint]) -> str:
    """The rule that sends a new connection to one of `endpoints`' chains, each with equal chance."""
    choices = ", ".join(f"{i} : goto {nft_endpoint_chain(svc, ep)}" for i, ep in enumerate(endpoints))
    return f"    numgen random mod {len(endpoints)} vmap {{ {choices} }}"


def render_nftables(services: Sequence[Service], node: NodeView) -> Rules:
    """kube-proxy's nftables-mode `table ip kube-proxy` for `node`, replacing any earlier one atomically."""
    service_ips, nodeports, no_endpoints, no_endpoint_nodeports, cluster_ips = [], [], [], [], []
    chains: list[str] = []
    for svc in services:
        base = nft_chain_base(svc)
        cluster_ips.append(svc.cluster_ip)
        key = f"{svc.cluster_ip} . {svc.protocol} . {svc.port}"
        if not svc.endpoints:
            no_endpoints.append(f'{key} comment "{svc.port_name}" : goto reject-chain')
            if svc.node_port:
                no_endpoint_nodeports.append(f"{svc.protocol} . {svc.node_port} : goto reject-chain")
            continue
        service_ips.append(f"{key} : goto service-{base}")
        chains += [f"  chain service-{base} {{",
                   f"    ip daddr {svc.cluster_ip} {svc.protocol} dport {svc.port} ip saddr != {node.cluster_cidr}"
                   " jump mark-for-masquerade",
                   _nft_pick(svc, svc.endpoints), "  }"]
        for ep in svc.endpoints:
            chains += [f"  chain {nft_endpoint_chain(svc, ep)} {{",
                       f"    ip saddr {ep.ip} jump mark-for-masquerade",
                       f"    meta l4proto {svc.protocol} dnat to {ep}",
                       "  }"]
        if svc.node_port:
            nodeports.append(f"{svc.protocol} . {svc.node_port} : goto external-{base}")
            chains += _external_nftables(svc, node, base, no_endpoint_nodeports)
    text = "\n".join([
        f"add table ip {NFT_TABLE}",
        f"delete table ip {NFT_TABLE}",
        f"table ip {NFT_TABLE} {{",
        '  comment "rules for kube-proxy"',
        "  set cluster-ips {", "    type ipv4_addr", '    comment "Active ClusterIPs"',
        *_nft_elements(sorted(set(cluster_ips))), "  }",
        "  map service-ips {", "    type ipv4_addr . inet_proto . inet_service : verdict",
        '    comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"', *_nft_elements(service_ips), "  }",
        "  map service-nodeports {", "    type inet_proto . inet_service : verdict", '    comment "NodePort traffic"',
        *_nft_elements(nodeports), "  }",
        "  map no-endpoint-services {", "    type ipv4_addr . inet_proto . inet_service : verdict",
        '    comment "vmap to drop or reject packets to services with no endpoints"',
        *_nft_elements(no_endpoints), "  }",
        "  map no-endpoint-nodeports {", "    type inet_proto . inet_service : verdict",
        '    comment "vmap to drop or reject packets to service nodeports with no endpoints"',
        *_nft_elements(no_endpoint_nodeports), "  }",
        *_nft_base_chain("filter-input", "filter", "input", DSTNAT - 10,
                         "ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"),
        *_nft_base_chain("filter-forward", "filter", "forward", DSTNAT - 10,
                         "ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"),
        *_nft_base_chain("filter-output", "filter", "output", DSTNAT - 10,
                         "ct state new jump service-endpoints-check"),
        *_nft_base_chain("filter-output-post-dnat", "filter", "output", DSTNAT + 10,
                         "ct state new jump cluster-ips-check"),
        *_nft_base_chain("nat-prerouting", "nat", "prerouting", DSTNAT, "jump services"),
        *_nft_base_chain("nat-output", "nat", "output", DSTNAT, "jump services"),
        *_nft_base_chain("nat-postrouting", "nat", "postrouting", SRCNAT, "jump masquerading"),
        "  chain service-endpoints-check {", "    ip daddr . meta l4proto . th dport vmap @no-endpoint-services", "  }",
        "  chain nodeport-endpoints-check {",
        "    ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports", "  }",
        "  chain cluster-ips-check {",
        '    ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
        f'    ip daddr {{ {node.service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"', "  }",
        "  chain reject-chain {", '    comment "helper for @no-endpoint-services / @no-endpoint-nodeports"',
        "    reject", "  }",
        "  chain mark-for-masquerade {", f"    mark set mark or {MASQ_MARK}", "  }",
        "  chain masquerading {", f"    mark and {MASQ_MARK} == 0 return", f"    mark set mark xor {MASQ_MARK}",
        "    masquerade fully-random", "  }",
        "  chain services {", "    ip daddr . meta l4proto . th dport vmap @service-ips",
        "    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports", "  }",
        *chains,
        "}"]) + "\n"
    return Rules(NFTABLES, text)


def _nft_base_chain(name: str, kind: str, hook: str, priority: int, *rules: str) -> list[str]:
    return [f"  chain {name} {{", f"    type {kind} hook {hook} priority {priority}; policy accept;",
            *(f"    {r}" for r in rules), "  }"]


def _external_nftables(svc: Service, node: NodeView, base: str, no_endpoint_nodeports: list[str]) -> list[str]:
    """external-*: as KUBE-EXT-* in iptables mode; the Local policy's endpoints in local-*."""
    ext, cluster = f"external-{base}", f"service-{base}"
    if not svc.external_local:
        return [f"  chain {ext} {{", "    jump mark-for-masquerade", f"    goto {cluster}", "  }"]
    lines = [f"  chain {ext} {{",
             f'    ip saddr {node.cluster_cidr} goto {cluster} comment "short-circuit pod traffic"',
             '    fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
             f'    fib saddr type local goto {cluster} comment "short-circuit local traffic"']
    local = svc.local_endpoints(node.node_ip)
    if not local:
        no_endpoint_nodeports.append(f"{svc.protocol} . {svc.node_port} : drop")
        return lines + ["  }"]
    return lines + [f"    goto local-{base}", "  }", f"  chain local-{base} {{", _nft_pick(svc, local), "  }"]


# -- rendering, loading, removing -------------------------------------------------------------------

def render(mode: str, services: Sequence[Service], node: NodeView) -> Rules:
    if mode == IPTABLES:
        return render_iptables(services, node)
    if mode == NFTABLES:
        return render_nftables(services, node)
    raise ValueError(f"kube-proxy mode {mode!r}: want one of {MODES}")


def _run(in_node: ArgvWrapper, argv: Sequence[str], stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(in_node(list(argv)), input=stdin, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise KubeProxyError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}")
    return proc


def _iptables_save(in_node: ArgvWrapper, table: str) -> str:
    return _run(in_node, ["iptables-save", "-t", table], check=False).stdout


def check(in_node: ArgvWrapper, rules: Rules) -> None:
    """Have the tools parse the rules without loading them (`iptables-restore --test`, `nft -c`)."""
    if rules.mode == IPTABLES:
        _run(in_node, ["iptables-restore", "--noflush", "--test"], rules.text)
    else:
        _run(in_node, ["nft", "-c", "-f", "-"], rules.text)


def apply(in_node: ArgvWrapper, rules: Rules) -> None:
    """Load `rules` into the node, replacing what an earlier `apply` loaded, as kube-proxy's sync does."""
    if rules.mode == NFTABLES:
        _run(in_node, ["nft", "-f", "-"], rules.text)
        return
    stale = stale_iptables_chains(_iptables_save(in_node, "nat"), rules)
    text = rules.text
    if stale:  # flushed by their declaration, then deleted, in the same transaction
        head, _, _ = text.rpartition("COMMIT")
        text = head + "".join(f":{c} - [0:0]\n" for c in stale) + "".join(f"-X {c}\n" for c in stale) + "COMMIT\n"
    _run(in_node, ["iptables-restore", "--noflush", "--wait"], text)
    for table, chain, args in reversed(rules.jumps):  # each inserted first: they end up in this order
        if _run(in_node, ["iptables", "-w", "-t", table, "-C", chain, *args], check=False).returncode != 0:
            _run(in_node, ["iptables", "-w", "-t", table, "-I", chain, "1", *args])


def remove(in_node: ArgvWrapper, mode: str) -> None:
    """Remove everything `apply` loaded in `mode` (nothing there is fine)."""
    if mode == NFTABLES:
        proc = _run(in_node, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            raise KubeProxyError(f"nft delete table ip {NFT_TABLE} failed: {proc.stderr.strip()}")
        return
    for table, chain, args in IPTABLES_JUMPS:
        while _run(in_node, ["iptables", "-w", "-t", table, "-C", chain, *args], check=False).returncode == 0:
            _run(in_node, ["iptables", "-w", "-t", table, "-D", chain, *args])
    _run(in_node, ["iptables-restore", "--noflush", "--wait"],
         iptables_removal(_iptables_save(in_node, "nat"), _iptables_save(in_node, "filter")))

