"""kube-proxy's nftables mode, rendered for one node and family. Pure.

kube-proxy's nftables proxier owns one table per family: `table ip
kube-proxy` for IPv4 and `table ip6 kube-proxy` for IPv6, the same chains
and maps in both, with the family's address matches (`ip daddr` / `ip6
daddr`), set types (`ipv4_addr` / `ipv6_addr`), localhost (127.0.0.0/8 /
::1) and bracketed IPv6 DNAT targets (`dnat to [fd00::5]:8080`). Base
chains `filter-*` / `nat-*`, the `service-ips` and `service-nodeports`
verdict maps, per-service chains choosing an endpoint chain with `numgen
random`, endpoint chains, `mark-for-masquerade` and `masquerading`.
"""
from __future__ import annotations

from typing import Sequence

from cni_fan.lab.kubeproxy_model import MASQ_MARK, NFTABLES, NodeView, Rules, Service, Endpoint, hash_suffix

NFT_TABLE = "kube-proxy"
# kube-proxy names its base chains' priorities `dstnat` (-100) and `srcnat` (100);
# nft 1.0.6 (Debian 12) accepts those names in fewer hooks than newer nft, so numbers.
DSTNAT, SRCNAT = -100, 100
# Per family: the nft table family, the address match keyword, the set type, localhost.
NFT_FAMILY = {4: ("ip", "ip", "ipv4_addr", "127.0.0.0/8"), 6: ("ip6", "ip6", "ipv6_addr", "::1")}


def nft_table_family(family: int) -> str:
    """`ip` or `ip6`: the nft family of kube-proxy's table for an IP family."""
    return NFT_FAMILY[family][0]


def nft_chain_base(svc: Service) -> str:
    """`HASH-namespace/name/protocol/port-name`, the base of a service port's nftables chains."""
    readable = f"{svc.name}/{svc.protocol}/p{svc.port}"
    return f"{hash_suffix(readable, 8)}-{readable}"


def nft_endpoint_chain(svc: Service, ep: Endpoint) -> str:
    """`endpoint-HASH-...__IP/PORT`; an IPv6 address's colons become dots (as kube-proxy writes them)."""
    readable = f"{svc.name}/{svc.protocol}/p{svc.port}__{ep.ip.replace(':', '.')}/{ep.port}"
    return f"endpoint-{hash_suffix(readable, 8)}-{readable}"


def _elements(items: Sequence[str]) -> list[str]:
    return [f"    elements = {{ {', '.join(items)} }}"] if items else []


def _pick(svc: Service, endpoints: Sequence[Endpoint]) -> str:
    """The rule that sends a new connection to one of `endpoints`' chains, each with equal chance."""
    choices = ", ".join(f"{i} : goto {nft_endpoint_chain(svc, ep)}" for i, ep in enumerate(endpoints))
    return f"    numgen random mod {len(endpoints)} vmap {{ {choices} }}"


def render_nftables(services: Sequence[Service], node: NodeView) -> Rules:
    """kube-proxy's nftables-mode table of the node view's family (`ip` or
    `ip6 kube-proxy`), replacing any earlier one atomically. Services of the
    other family are left out, as kube-proxy's other proxier handles them."""
    table, ipx, addr_type, localhost = NFT_FAMILY[node.family]
    service_ips, nodeports, no_endpoints, no_endpoint_nodeports, cluster_ips = [], [], [], [], []
    chains: list[str] = []
    for svc in node.services(services):
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
                   f"    {ipx} daddr {svc.cluster_ip} {svc.protocol} dport {svc.port} {ipx} saddr != "
                   f"{node.cluster_cidr} jump mark-for-masquerade",
                   _pick(svc, svc.endpoints), "  }"]
        for ep in svc.endpoints:
            chains += [f"  chain {nft_endpoint_chain(svc, ep)} {{",
                       f"    {ipx} saddr {ep.ip} jump mark-for-masquerade",
                       f"    meta l4proto {svc.protocol} dnat to {ep}",
                       "  }"]
        if svc.node_port:
            nodeports.append(f"{svc.protocol} . {svc.node_port} : goto external-{base}")
            chains += _external(svc, node, base, no_endpoint_nodeports)
    text = "\n".join([
        f"add table {table} {NFT_TABLE}",
        f"delete table {table} {NFT_TABLE}",
        f"table {table} {NFT_TABLE} {{",
        '  comment "rules for kube-proxy"',
        "  set cluster-ips {", f"    type {addr_type}", '    comment "Active ClusterIPs"',
        *_elements(sorted(set(cluster_ips))), "  }",
        "  map service-ips {", f"    type {addr_type} . inet_proto . inet_service : verdict",
        '    comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"', *_elements(service_ips), "  }",
        "  map service-nodeports {", "    type inet_proto . inet_service : verdict", '    comment "NodePort traffic"',
        *_elements(nodeports), "  }",
        "  map no-endpoint-services {", f"    type {addr_type} . inet_proto . inet_service : verdict",
        '    comment "vmap to drop or reject packets to services with no endpoints"',
        *_elements(no_endpoints), "  }",
        "  map no-endpoint-nodeports {", "    type inet_proto . inet_service : verdict",
        '    comment "vmap to drop or reject packets to service nodeports with no endpoints"',
        *_elements(no_endpoint_nodeports), "  }",
        *_base_chain("filter-input", "filter", "input", DSTNAT - 10,
                     "ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"),
        *_base_chain("filter-forward", "filter", "forward", DSTNAT - 10,
                     "ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"),
        *_base_chain("filter-output", "filter", "output", DSTNAT - 10,
                     "ct state new jump service-endpoints-check"),
        *_base_chain("filter-output-post-dnat", "filter", "output", DSTNAT + 10,
                     "ct state new jump cluster-ips-check"),
        *_base_chain("nat-prerouting", "nat", "prerouting", DSTNAT, "jump services"),
        *_base_chain("nat-output", "nat", "output", DSTNAT, "jump services"),
        *_base_chain("nat-postrouting", "nat", "postrouting", SRCNAT, "jump masquerading"),
        "  chain service-endpoints-check {", f"    {ipx} daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "  }",
        "  chain nodeport-endpoints-check {",
        f"    {ipx} daddr != {localhost} meta l4proto . th dport vmap @no-endpoint-nodeports", "  }",
        "  chain cluster-ips-check {",
        f'    {ipx} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
        f'    {ipx} daddr {{ {node.service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"', "  }",
        "  chain reject-chain {", '    comment "helper for @no-endpoint-services / @no-endpoint-nodeports"',
        "    reject", "  }",
        "  chain mark-for-masquerade {", f"    mark set mark or {MASQ_MARK}", "  }",
        "  chain masquerading {", f"    mark and {MASQ_MARK} == 0 return", f"    mark set mark xor {MASQ_MARK}",
        "    masquerade fully-random", "  }",
        "  chain services {", f"    {ipx} daddr . meta l4proto . th dport vmap @service-ips",
        f"    fib daddr type local {ipx} daddr != {localhost} meta l4proto . th dport vmap @service-nodeports",
        "  }",
        *chains,
        "}"]) + "\n"
    return Rules(NFTABLES, text, family=node.family)


def _base_chain(name: str, kind: str, hook: str, priority: int, *rules: str) -> list[str]:
    return [f"  chain {name} {{", f"    type {kind} hook {hook} priority {priority}; policy accept;",
            *(f"    {r}" for r in rules), "  }"]


def _external(svc: Service, node: NodeView, base: str, no_endpoint_nodeports: list[str]) -> list[str]:
    """external-*: as KUBE-EXT-* in iptables mode; the Local policy's endpoints in local-*."""
    ipx = NFT_FAMILY[node.family][1]
    ext, cluster = f"external-{base}", f"service-{base}"
    if not svc.external_local:
        return [f"  chain {ext} {{", "    jump mark-for-masquerade", f"    goto {cluster}", "  }"]
    lines = [f"  chain {ext} {{",
             f'    {ipx} saddr {node.cluster_cidr} goto {cluster} comment "short-circuit pod traffic"',
             '    fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
             f'    fib saddr type local goto {cluster} comment "short-circuit local traffic"']
    local = svc.local_endpoints(node.node_ip)
    if not local:
        no_endpoint_nodeports.append(f"{svc.protocol} . {svc.node_port} : drop")
        return lines + ["  }"]
    return lines + [f"    goto local-{base}", "  }", f"  chain local-{base} {{", _pick(svc, local), "  }"]
