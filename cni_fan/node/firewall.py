"""Egress NAT and the tunnel's input filter, in the node's own nftables table.

One table (`ip cni-fan`) holds everything IPv4, replaced atomically with
one `nft -f` transaction, so up is idempotent and down is one `delete
table`. With `overlay6` and `ipMasq`, the same transaction also makes
`ip6 cni-fan` with the NAT66 rule (an `ip` table cannot hold IPv6 rules;
the IPv4 table stays as it was, so its counters and listings do too). On
an IPv6-only node (an IPv6 underlay) there is no `ip` table: `ip6 cni-fan`
holds the tunnel input filter (VXLAN over UDP/IPv6 only from the underlay)
and NAT66. With direct routing each table also gets a `direct` chain
(prerouting): overlay packets arrive unencapsulated on the underlay
interface, and only from the nodes of this node's segment; one whose
overlay source is this node's own slice, or a node's outside the segment,
is dropped and counted (two prefixes from the plan, no rule per peer).
nftables and iptables-nft share the kernel's nf_tables; on nodes whose
iptables is the legacy backend the same rules are written with iptables
into chains of our own (see `IptablesFirewall`).
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute

from cni_fan.node.state import NodeState
from cni_fan.plan import NodePlan

log = logging.getLogger("cni_fan.node")
NFT_TABLE = "cni-fan"


# The backends' names: in logs, in the node state (which one `up` used) and in `choose_backend`.
LEGACY, NFT = "iptables-legacy", "nftables"
DIRECT_CHAIN = "CNI-FAN-DIRECT"  # legacy iptables, raw table: direct routing's source check


class FirewallError(Exception):
    pass


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise FirewallError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass(frozen=True)
class FirewallRules:
    """The two rules, pure data derived from the plan."""
    slice: str | None        # None on an IPv6-only node, with overlay and underlay
    overlay: str | None
    underlay: str | None
    vxlan_port: int | None   # None for IPIP (protocol 4)
    masquerade: bool
    slice6: str | None = None    # with `overlay6`
    overlay6: str | None = None
    underlay6: str | None = None  # an IPv6 underlay: the tunnel input filter is an IPv6 one
    underlay_interface: str | None = None  # direct routing: where unencapsulated overlay packets arrive
    direct_sources: str | None = None      # the overlay prefix of the segment's nodes (IPv4)
    direct_sources6: str | None = None     # the same in overlay6

    def __repr__(self) -> str:
        """The IPv6 fields only when set: an IPv4-only node's state file keeps matching (no re-apply)."""
        text = (f"FirewallRules(slice={self.slice!r}, overlay={self.overlay!r}, underlay={self.underlay!r}, "
                f"vxlan_port={self.vxlan_port!r}, masquerade={self.masquerade!r}")
        if self.slice6 is not None:
            text += f", slice6={self.slice6!r}, overlay6={self.overlay6!r}"
        if self.underlay6 is not None:
            text += f", underlay6={self.underlay6!r}"
        if self.underlay_interface is not None:
            text += (f", underlay_interface={self.underlay_interface!r}, direct_sources={self.direct_sources!r}, "
                     f"direct_sources6={self.direct_sources6!r}")
        return text + ")"

    @property
    def masquerade6(self) -> bool:
        return self.masquerade and self.slice6 is not None

    @classmethod
    def from_plan(cls, plan: NodePlan) -> "FirewallRules":
        v4 = plan.ipv4
        v6 = plan.ipv6
        direct = dict(underlay_interface=plan.underlay_ifname,
                      direct_sources=None if v4 is None else str(plan.segment_overlay(v4)),
                      direct_sources6=None if v6 is None else str(plan.segment_overlay(v6))) if plan.direct else {}
        return cls(**direct, slice=None if v4 is None else str(v4.slice.cidr),
                   overlay=None if v4 is None else str(v4.overlay.cidr),
                   underlay=None if v4 is None else str(v4.underlay.cidr),
                   vxlan_port=plan.vxlan_port if plan.encap == "vxlan" else None, masquerade=plan.ip_masq,
                   slice6=None if v6 is None else str(v6.slice.cidr),
                   overlay6=None if v6 is None else str(v6.overlay.cidr),
                   underlay6=str(v6.underlay.cidr) if v6 is not None and plan.ipv6_underlay else None)

    def nft_ruleset(self) -> str:
        lines = [] if self.underlay is None else self._nft_ip_table()
        six = []
        if self.underlay6 is not None:
            six += ["  chain input {",
                    "    type filter hook input priority filter; policy accept;",
                    f"    udp dport {self.vxlan_port} ip6 saddr != {self.underlay6} counter drop "
                    "comment \"tunnel from outside the underlay\"",
                    "  }"]
        if self.direct_sources6 is not None:
            six += self._nft_direct_chain("ip6", self.slice6, self.overlay6, self.direct_sources6)
        if self.masquerade6:
            six += ["  chain postrouting {",
                    "    type nat hook postrouting priority srcnat; policy accept;",
                    f"    ip6 saddr {self.slice6} ip6 daddr != {self.overlay6} counter masquerade "
                    "comment \"pods leaving the overlay\"",
                    "  }"]
        if six:
            lines += [f"table ip6 {NFT_TABLE} {{", *six, "}"]
        return "\n".join(lines) + "\n"

    def _nft_ip_table(self) -> list[str]:
        tunnel_match = f"udp dport {self.vxlan_port}" if self.vxlan_port else "ip protocol ipencap"
        lines = [f"table ip {NFT_TABLE} {{",
                 "  chain input {",
                 "    type filter hook input priority filter; policy accept;",
                 f"    {tunnel_match} ip saddr != {self.underlay} counter drop comment \"tunnel from outside the underlay\"",
                 "  }"]
        if self.masquerade:
            lines += ["  chain postrouting {",
                      "    type nat hook postrouting priority srcnat; policy accept;",
                      f"    ip saddr {self.slice} ip daddr != {self.overlay} counter masquerade comment \"pods leaving the overlay\"",
                      "  }"]
        if self.direct_sources is not None:
            lines += self._nft_direct_chain("ip", self.slice, self.overlay, self.direct_sources)
        lines.append("}")
        return lines

    def _nft_direct_chain(self, family: str, own: str | None, overlay: str | None, sources: str) -> list[str]:
        """Unencapsulated overlay packets on the underlay interface: only from the segment's nodes."""
        match = f"iifname \"{self.underlay_interface}\" {family} saddr"
        return ["  chain direct {",
                "    type filter hook prerouting priority filter; policy accept;",
                f"    {match} {own} counter drop comment \"own slice from the underlay\"",
                f"    {match} {overlay} {family} saddr != {sources} counter drop "
                "comment \"overlay source outside the segment\"",
                "  }"]


class NftFirewall:
    name = NFT
    families = ("ip", "ip6")  # the tables `cni-fan` there may be; ip6 only with NAT66

    def apply(self, rules: FirewallRules) -> None:
        # Create-then-delete makes the delete valid on a first run (and drops
        # an ip6 table a plan without NAT66 no longer wants); the new tables
        # follow in the same transaction, so there is no gap.
        clear = "".join(f"table {f} {NFT_TABLE}\ndelete table {f} {NFT_TABLE}\n" for f in self.families)
        _run(["nft", "-f", "-"], stdin=clear + rules.nft_ruleset())

    def current(self) -> str | None:
        """The ip table's listing, and the ip6 table's after it when there is one (None: neither)."""
        listings = [_run(["nft", "-s", "list", "table", f, NFT_TABLE], check=False) for f in self.families]
        if all(proc.returncode != 0 for proc in listings):
            return None
        return "".join(proc.stdout for proc in listings if proc.returncode == 0)

    def remove(self) -> bool:
        removed = [_run(["nft", "delete", "table", f, NFT_TABLE], check=False).returncode == 0
                   for f in self.families]
        return any(removed)

    def dropped_foreign(self) -> int:
        """Packets the input filter dropped (the counter on its one rule, IPv4's or IPv6's)."""
        return self._dropped("input")

    def dropped_direct(self) -> int:
        """Unencapsulated overlay packets dropped for their source (direct routing), both families."""
        return self._dropped("direct")

    def _dropped(self, chain: str) -> int:
        total = 0
        for family in self.families:
            text = _run(["nft", "list", "chain", family, NFT_TABLE, chain], check=False).stdout
            for line in text.splitlines():
                if "drop" in line and "packets" in line:
                    words = line.split()
                    total += int(words[words.index("packets") + 1])
        return total


class IptablesFirewall:
    """Legacy-iptables nodes: the same rules in chains named CNI-FAN-* (NAT66 with ip6tables-legacy)."""
    name = LEGACY
    binary = "iptables-legacy"
    binary6 = "ip6tables-legacy"

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([self.binary, "-w", *args], check=check)

    def _ipt6(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([self.binary6, "-w", *args], check=check)

    def _specs(self, rules: FirewallRules) -> list[tuple[str, str, list[str]]]:
        if rules.underlay is None:  # an IPv6-only node: nothing in IPv4
            return []
        tunnel = ["-p", "udp", "--dport", str(rules.vxlan_port)] if rules.vxlan_port else ["-p", "4"]
        specs = [("filter", "CNI-FAN-INPUT", [*tunnel, "!", "-s", rules.underlay, "-j", "DROP"])]
        if rules.masquerade:
            specs.append(("nat", "CNI-FAN-POSTROUTING",
                          ["-s", rules.slice, "!", "-d", rules.overlay, "-j", "MASQUERADE"]))
        return specs

    def apply(self, rules: FirewallRules) -> None:
        self.remove()
        for table, chain, rule in self._specs(rules):
            hook = "INPUT" if table == "filter" else "POSTROUTING"
            self._ipt("-t", table, "-N", chain)
            self._ipt("-t", table, "-A", chain, *rule)
            self._ipt("-t", table, "-I", hook, "-j", chain)
        if rules.underlay6 is not None:
            self._ipt6("-t", "filter", "-N", "CNI-FAN-INPUT")
            self._ipt6("-t", "filter", "-A", "CNI-FAN-INPUT", "-p", "udp", "--dport", str(rules.vxlan_port),
                       "!", "-s", rules.underlay6, "-j", "DROP")
            self._ipt6("-t", "filter", "-I", "INPUT", "-j", "CNI-FAN-INPUT")
        for run, own, overlay, sources in ((self._ipt, rules.slice, rules.overlay, rules.direct_sources),
                                           (self._ipt6, rules.slice6, rules.overlay6, rules.direct_sources6)):
            if sources is None:
                continue
            assert own is not None and overlay is not None and rules.underlay_interface is not None
            run("-t", "raw", "-N", DIRECT_CHAIN)
            run("-t", "raw", "-A", DIRECT_CHAIN, "-s", own, "-j", "DROP")
            run("-t", "raw", "-A", DIRECT_CHAIN, "-s", sources, "-j", "RETURN")
            run("-t", "raw", "-A", DIRECT_CHAIN, "-s", overlay, "-j", "DROP")
            run("-t", "raw", "-I", "PREROUTING", "-i", rules.underlay_interface, "-j", DIRECT_CHAIN)
        if rules.masquerade6:
            self._ipt6("-t", "nat", "-N", "CNI-FAN-POSTROUTING")
            self._ipt6("-t", "nat", "-A", "CNI-FAN-POSTROUTING", "-s", rules.slice6, "!", "-d", rules.overlay6,
                       "-j", "MASQUERADE")
            self._ipt6("-t", "nat", "-I", "POSTROUTING", "-j", "CNI-FAN-POSTROUTING")

    def current(self) -> str | None:
        out = []
        for table, chain in (("filter", "CNI-FAN-INPUT"), ("nat", "CNI-FAN-POSTROUTING"), ("raw", DIRECT_CHAIN)):
            proc = self._ipt("-t", table, "-S", chain, check=False)
            if proc.returncode == 0:
                out.append(proc.stdout)
        for table, chain in (("filter", "CNI-FAN-INPUT"), ("nat", "CNI-FAN-POSTROUTING"), ("raw", DIRECT_CHAIN)):
            if _legacy6_table_exists(table):
                proc = self._ipt6("-t", table, "-S", chain, check=False)
                if proc.returncode == 0:
                    out.append(proc.stdout)
        return "".join(out) or None

    def remove(self) -> bool:
        removed = False
        for table, chain, hook in (("filter", "CNI-FAN-INPUT", "INPUT"), ("nat", "CNI-FAN-POSTROUTING", "POSTROUTING")):
            while self._ipt("-t", table, "-D", hook, "-j", chain, check=False).returncode == 0:
                removed = True
            if self._ipt("-t", table, "-F", chain, check=False).returncode == 0:
                self._ipt("-t", table, "-X", chain, check=False)
                removed = True
        for table, chain, hook in (("filter", "CNI-FAN-INPUT", "INPUT"), ("nat", "CNI-FAN-POSTROUTING", "POSTROUTING")):
            if not _legacy6_table_exists(table):
                continue
            while self._ipt6("-t", table, "-D", hook, "-j", chain, check=False).returncode == 0:
                removed = True
            if self._ipt6("-t", table, "-F", chain, check=False).returncode == 0:
                self._ipt6("-t", table, "-X", chain, check=False)
                removed = True
        for run, present in ((self._ipt, True), (self._ipt6, _legacy6_table_exists("raw"))):
            if present and _remove_direct_chain(run):
                removed = True
        return removed

    def dropped_direct(self) -> int:
        return self._dropped("raw", DIRECT_CHAIN)

    def dropped_foreign(self) -> int:
        return self._dropped("filter", "CNI-FAN-INPUT")

    def _dropped(self, table: str, chain: str) -> int:
        """The packets `chain`'s DROP rules counted, in iptables and (where its table exists) ip6tables."""
        total = 0
        for run in (self._ipt, self._ipt6) if _legacy6_table_exists(table) else (self._ipt,):
            proc = run("-t", table, "-L", chain, "-v", "-x", "-n", check=False)
            for line in proc.stdout.splitlines():
                if "DROP" in line:
                    total += int(line.split()[0])
        return total


def _remove_direct_chain(run) -> bool:
    """Unhook and delete the direct routing chain (its jump names the underlay interface, which
    `remove` does not know: the jump is found in PREROUTING's listing)."""
    listing = run("-t", "raw", "-S", "PREROUTING", check=False).stdout
    removed = False
    for line in listing.splitlines():
        if line.startswith("-A PREROUTING") and line.endswith(f"-j {DIRECT_CHAIN}"):
            removed |= run("-t", "raw", "-D", *line.split()[1:], check=False).returncode == 0
    if run("-t", "raw", "-F", DIRECT_CHAIN, check=False).returncode == 0:
        run("-t", "raw", "-X", DIRECT_CHAIN, check=False)
        removed = True
    return removed


# Chains the kubelet (KUBE-IPTABLES-HINT, since 1.24) and kube-proxy
# (KUBE-KUBELET-CANARY, KUBE-PROXY-CANARY) create in the backend they use.
KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-PROXY-CANARY")


def choose_backend(legacy_save: str, nft_save: str, previous: str = "") -> tuple[str, str]:
    """Which backend the node's own rules live in, and why (pure).

    The agent runs in a container whose `iptables` binary says nothing
    about the host, so the choice comes from the kernel's tables, as the
    host's iptables-save output of each backend shows them: first the one
    we used before on this node (rules in two backends would be a mess),
    then the backend holding the kubelet's hint chains, then the one with
    more rules; nftables when both are empty.
    """
    if previous in (LEGACY, NFT):
        return previous, f"used on this node before ({previous})"
    for name, text in ((LEGACY, legacy_save), (NFT, nft_save)):
        hints = [h for h in KUBE_HINTS if f":{h} " in text or f":{h}\n" in text]
        if hints:
            return name, f"the kubelet's {hints[0]} chain is in {name}"
    legacy_rules = sum(1 for line in legacy_save.splitlines() if line.startswith("-A "))
    nft_rules = sum(1 for line in nft_save.splitlines() if line.startswith("-A "))
    if legacy_rules > nft_rules:
        return LEGACY, f"{legacy_rules} iptables-legacy rules against {nft_rules} in iptables-nft"
    return NFT, (f"{nft_rules} iptables-nft rules against {legacy_rules} legacy" if nft_rules
                 else "no iptables rules on the node yet")


def _save_output(binary: str) -> str:
    """`<binary>` (an iptables-save) output, or "" when it is missing or fails."""
    path = shutil.which(binary)
    if not path:
        return ""
    proc = _run([path], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def _legacy_tables_exist() -> bool:
    """Legacy tables registered in this netns; asking iptables-legacy-save
    otherwise could load the legacy modules on a node that never used them."""
    try:
        with open("/proc/net/ip_tables_names", encoding="ascii") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _legacy6_table_exists(table: str) -> bool:
    """Whether an ip6tables-legacy `table` is registered in this netns: only
    then can it hold our chain (asking would otherwise load the module
    on IPv4-only nodes)."""
    try:
        with open("/proc/net/ip6_tables_names", encoding="ascii") as f:
            return table in f.read().split()
    except OSError:
        return False


def detect(previous: str = "") -> NftFirewall | IptablesFirewall:
    """The firewall of the node's backend (see `choose_backend`)."""
    have_legacy, have_nft = bool(shutil.which("iptables-legacy")), bool(shutil.which("nft"))
    if previous == LEGACY and not have_legacy or previous == NFT and not have_nft:
        previous = ""
    if previous:  # settled: no need to read the tables (two iptables-save runs)
        name, why = choose_backend("", "", previous)
    else:
        legacy = _save_output("iptables-legacy-save") if have_legacy and _legacy_tables_exist() else ""
        name, why = choose_backend(legacy, _save_output("iptables-nft-save"))
    if name == LEGACY and have_legacy:
        log.info("firewall: iptables-legacy (%s)", why)
        return IptablesFirewall()
    if have_nft:
        log.info("firewall: nftables (%s)", why)
        return NftFirewall()
    if have_legacy:
        log.info("firewall: iptables-legacy (nft is not installed)")
        return IptablesFirewall()
    raise FirewallError("neither nft nor iptables-legacy is installed; cannot set up NAT and the tunnel filter")


class NodeFirewall:
    """The node's rules as a datapath component, in the backend the node uses.

    `state` (the node state file) says which backend an earlier `up` chose
    and which rules it applied with what listing, so a new agent keeps
    rules nobody changed instead of re-applying them (which would only
    reset their counters).
    """
    role = "firewall"

    def __init__(self, plan: NodePlan, state: NodeState) -> None:
        self.rules = FirewallRules.from_plan(plan)
        self.state = state
        self.backend = detect(previous=state.firewall)
        self._applied: str | None = None  # the listing after our last apply

    @property
    def name(self) -> str:
        """The backend's name (LEGACY or NFT), as logs and `node show` say it."""
        return self.backend.name

    def problems(self, ipr: IPRoute) -> list[str]:
        current = self.backend.current()
        if current is None:
            return [f"{self.backend.name} rules are missing"]
        if self._applied is not None and current != self._applied:
            return [f"{self.backend.name} rules were changed"]
        return []

    def ensure(self, ipr: IPRoute) -> None:
        current = self.backend.current()
        if (self._applied is None and current is not None and self.state.firewall_rules == repr(self.rules)
                and current == self.state.firewall_listing):
            self._applied = current  # an earlier `up` applied exactly these and nobody changed them
        if self._applied is None or current != self._applied:
            self.backend.apply(self.rules)
            self._applied = self.backend.current()
        self.state.firewall = self.backend.name
        self.state.firewall_rules, self.state.firewall_listing = repr(self.rules), self._applied or ""

    def remove(self, ipr: IPRoute) -> list[str]:
        return [f"{self.backend.name} rules"] if self.backend.remove() else []

    def dropped_foreign(self) -> int:
        return self.backend.dropped_foreign()

    def dropped_direct(self) -> int:
        """Unencapsulated overlay packets dropped for their source (0 without direct routing)."""
        return self.backend.dropped_direct() if self.rules.underlay_interface is not None else 0
