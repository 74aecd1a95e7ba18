"""kube-proxy-shaped Service NAT for one lab node, in both of kube-proxy's Linux modes this kernel has, per IP family.

The lab has no API server and no kube-proxy binary; what a datapath must
carry is kube-proxy's *rules*, so this module writes them from the shapes
kube-proxy documents and writes (pkg/proxy/iptables, pkg/proxy/nftables and
its README):

- **iptables mode**: `iptables-restore --noflush` input for the nat and
  filter tables (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-EXT-*,
  KUBE-SVL-*, KUBE-NODEPORTS, KUBE-MARK-MASQ, KUBE-POSTROUTING,
  KUBE-FORWARD, KUBE-EXTERNAL-SERVICES) plus the jumps from the built-in
  chains, which kube-proxy keeps at their top one rule at a time. IPv6: the
  same chains and the same mark/MASQUERADE shape, loaded with
  `ip6tables-restore`; DNAT targets in brackets; the NodePort dispatch
  skips ::1 (kube-proxy never serves NodePorts on IPv6 localhost).
- **nftables mode** (cni_fan/lab/kubeproxy_nft.py): `table ip kube-proxy`
  for IPv4, a separate `table ip6 kube-proxy` for IPv6.

kube-proxy runs one proxier per family; so does this module: a `NodeView`
is one family's view of a node (cni_fan/lab/kubeproxy_model.py), and
`render` takes that family's services out of the list it is given. A
dual-stack node gets both renderings, loaded side by side.

The same decisions in both modes: DNAT in prerouting (pods, outside) and
output (host-network clients); mark 0x4000 for masquerade when the client
is outside `clusterCIDR` (the Fan overlay of the family), when a pod
reaches itself (hairpin), and for NodePorts with the Cluster policy;
MASQUERADE in postrouting of what is marked. The Local policy keeps the
client's address and uses only this node's endpoints. Not modelled:
session affinity, LoadBalancer and external IPs.

Rendering is pure; `apply`, `remove` and `check` run the tools inside a
node's namespace through a caller-supplied argv wrapper (`nsenter --net=...`).
"""
from __future__ import annotations

import re
import subprocess
from typing import Callable, Sequence

from cni_fan.lab.kubeproxy_model import (FAMILIES, IPTABLES, MASQ_MARK, MODES, NFTABLES,  # noqa: F401
                                         Endpoint, NodeView, Rules, Service, hash_suffix, host_port)
from cni_fan.lab.kubeproxy_nft import (NFT_TABLE, nft_chain_base, nft_endpoint_chain, nft_table_family,  # noqa: F401
                                       render_nftables)

# argv -> the same argv run inside the node's namespace (e.g. Netns.argv).
ArgvWrapper = Callable[[Sequence[str]], list[str]]
# The iptables tools of each family.
TOOLS = {4: ("iptables", "iptables-save", "iptables-restore"), 6: ("ip6tables", "ip6tables-save", "ip6tables-restore")}


class KubeProxyError(Exception):
    """Rules could not be loaded, checked or removed."""


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
    suffix = hash_suffix(svc.port_name + svc.protocol, 16)
    return {kind: f"KUBE-{kind}-{suffix}" for kind in ("SVC", "SVL", "EXT")}


def iptables_endpoint_chain(svc: Service, ep: Endpoint) -> str:
    return "KUBE-SEP-" + hash_suffix(svc.port_name + svc.protocol + str(ep), 16)


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
    """kube-proxy's iptables-mode nat and filter rules for `node`, in the node
    view's family (iptables-restore or ip6tables-restore input); services of
    the other family are left out, as kube-proxy's other proxier handles them."""
    nat_chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODEPORTS"]
    nat = [f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
           f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
           '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
           " -j MASQUERADE --random-fully",
           f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"]
    filter_chains = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD"]
    filt: list[str] = []
    for svc in node.services(services):
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
    # NodePorts are never served on IPv6 localhost (IPv4's 127.0.0.0/8 needs route_localnet, which the lab leaves).
    not_localhost = " ! -d ::1/128" if node.family == 6 else ""
    nat.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last'
               f' rule in this chain" -m addrtype --dst-type LOCAL{not_localhost} -j KUBE-NODEPORTS')
    filt += ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
             f" -m mark --mark {MASQ_MARK}/{MASQ_MARK}"
             " -j ACCEPT",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
             " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    text = "\n".join(["*filter", *(f":{c} - [0:0]" for c in filter_chains), *filt, "COMMIT",
                      "*nat", *(f":{c} - [0:0]" for c in dict.fromkeys(nat_chains)), *nat, "COMMIT"]) + "\n"
    return Rules(IPTABLES, text, IPTABLES_JUMPS, node.family)


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


# -- rendering, loading, removing -------------------------------------------------------------------

def render(mode: str, services: Sequence[Service], node: NodeView) -> Rules:
    """kube-proxy's rules in `mode` for one node and the node view's family
    (the services of the other family are that family's proxier's)."""
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


def _iptables_save(in_node: ArgvWrapper, table: str, family: int = 4) -> str:
    return _run(in_node, [TOOLS[family][1], "-t", table], check=False).stdout


def check(in_node: ArgvWrapper, rules: Rules) -> None:
    """Have the tools parse the rules without loading them (`ip[6]tables-restore --test`, `nft -c`)."""
    if rules.mode == IPTABLES:
        _run(in_node, [TOOLS[rules.family][2], "--noflush", "--test"], rules.text)
    else:
        _run(in_node, ["nft", "-c", "-f", "-"], rules.text)


def apply(in_node: ArgvWrapper, rules: Rules) -> None:
    """Load `rules` into the node, replacing what an earlier `apply` loaded, as kube-proxy's sync does."""
    if rules.mode == NFTABLES:
        _run(in_node, ["nft", "-f", "-"], rules.text)
        return
    iptables, _, restore = TOOLS[rules.family]
    stale = stale_iptables_chains(_iptables_save(in_node, "nat", rules.family), rules)
    text = rules.text
    if stale:  # flushed by their declaration, then deleted, in the same transaction
        head, _, _ = text.rpartition("COMMIT")
        text = head + "".join(f":{c} - [0:0]\n" for c in stale) + "".join(f"-X {c}\n" for c in stale) + "COMMIT\n"
    _run(in_node, [restore, "--noflush", "--wait"], text)
    for table, chain, args in reversed(rules.jumps):  # each inserted first: they end up in this order
        if _run(in_node, [iptables, "-w", "-t", table, "-C", chain, *args], check=False).returncode != 0:
            _run(in_node, [iptables, "-w", "-t", table, "-I", chain, "1", *args])


def remove(in_node: ArgvWrapper, mode: str, family: int = 4) -> None:
    """Remove everything `apply` loaded in `mode` for `family` (nothing there is fine)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: want 4 or 6")
    if mode == NFTABLES:
        table = nft_table_family(family)
        proc = _run(in_node, ["nft", "delete", "table", table, NFT_TABLE], check=False)
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            raise KubeProxyError(f"nft delete table {table} {NFT_TABLE} failed: {proc.stderr.strip()}")
        return
    iptables, _, restore = TOOLS[family]
    for table, chain, args in IPTABLES_JUMPS:
        while _run(in_node, [iptables, "-w", "-t", table, "-C", chain, *args], check=False).returncode == 0:
            _run(in_node, [iptables, "-w", "-t", table, "-D", chain, *args])
    _run(in_node, [restore, "--noflush", "--wait"],
         iptables_removal(_iptables_save(in_node, "nat", family), _iptables_save(in_node, "filter", family)))

