"""What a lab is: names, addresses and conflists. Pure: no system calls.

A lab with prefix P (default ``fanlab-``) and N nodes of M pods each:

    namespace   role                     interface(s)           address
    P under     the underlay "switch"    br0 + ports n1..nN, ext
    P n<i>      node i                   eth0 (underlay)        198.18.<i>.<10+i>/16
    P n<i>p<j>  pod j on node i          eth0 (made by `fan`)   from the node's slice
    P ext       outside the cluster      eth0                   198.18.200.1/16

A dual-stack lab (`overlay6`, e.g. fd00:50::/48) gives every node and ext
an IPv6 address on the underlay too, in UNDERLAY6 (node i is
fd00:198:18::i:(10+i), ext fd00:198:18::c8:1, without DAD): the node's
IPv6 slice still follows from its IPv4 underlay address (the Fan's
dual-stack rule), and ext is where NAT66 shows (ext sees the node's IPv6
underlay address). Pods get one address per family from `fan`.

An IPv6-only lab (`ipv6_only`, overlay6 default fd00:50::/40) has no IPv4
at all: node i is fd00:198:18::i:(10+i)/64 (the same address a dual-stack
lab gives it) and the fan's underlay is UNDERLAY6_ONLY, a /104 holding
every node's 24 host bits, so node i owns fd00:50:i:(10+i)::/64; ext is
fd00:198:18::c8:1. Node.address, .slice and .gateway are then the IPv6
ones, and .address6, .slice6 and .gateway6 the same values, so the
IPv6 side of `lab check` reads them as in a dual-stack lab.

Node addresses lie in different /24s of the underlay, so their slices
differ in more than the last octet (198.18.1.11 owns 241.1.11.0/24,
198.18.2.12 owns 241.2.12.0/24). `ext` is on the underlay but outside
the overlay: pods reach it only through the node's masquerade, so ext
sees the node's underlay address as the source.

Interface names are fixed and short (they live in their own namespaces,
so they never collide); only namespace names carry the prefix, and those
are file names under /run/netns, not interface names.

A segmented lab (`segments` N >= 2, cni_fan.lab.segments) spreads the
nodes round-robin over N underlay L2 segments (bridges br1..brN) joined
by `P router`; ext then sits behind the router on br0. With
`direct_routing` every node's conflist carries `directRouting: true`.

Files: everything of lab P lives under /run/cni-fan-lab/P/ (the plugin
binaries in bin/, each node's conflist, state, socket, agent log and pid
file in n<i>/, and lab.json, what `lab up` built).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import netaddr

from cni_fan.fanmap import FanMap
from cni_fan.lab import segments as seg
from cni_fan.plan import slice_plan

DEFAULT_PREFIX = "fanlab-"
DEFAULT_OVERLAY = "241.0.0.0/8"
UNDERLAY = "198.18.0.0/16"
EXT_ADDRESS = "198.18.200.1"
# IPv6 on the underlay, for dual-stack labs (a ULA /64 inside fd00::/8; overlay6 must not overlap it).
UNDERLAY6 = "fd00:198:18::/64"
EXT_ADDRESS6 = "fd00:198:18::c8:1"
# An IPv6-only lab's fan underlay: 24 host bits, so node i's fd00:198:18::i:(10+i) is a host of it.
UNDERLAY6_ONLY = "fd00:198:18::/104"
DEFAULT_OVERLAY6_ONLY = "fd00:50::/40"
PHANTOM_HOST6 = "fd00:198:18::fe:fefe"
# An underlay address no lab node ever has: its slice tells a table built
# for every possible host (stateless) from state about actual peers.
PHANTOM_HOST = "198.18.254.254"
LAB_ROOT = "/run/cni-fan-lab"
NETNS_DIR = "/run/netns"
METRICS_PORT = 9475
NETWORK_NAME = "fan"
CNI_VERSION = "1.0.0"
CNI_VERSIONS = ("1.0.0", "1.1.0")
ENCAPS = ("vxlan", "ipip")
FANMAPS = ("bpf", "routes")
MAX_NODES = 100      # node i is 198.18.i.(10+i): stays clear of ext (198.18.200.1)
MAX_PODS = 200
UNDERLAY_MTU = 1500

# Interface names (each in its own namespace; all well under IFNAMSIZ-1 = 15).
UNDERLAY_BRIDGE = "br0"          # in the underlay namespace
NODE_UNDERLAY_IF = "eth0"        # in a node namespace
EXT_IF = "eth0"                  # in the ext namespace
POD_IF = "eth0"                  # CNI_IFNAME for every pod
EXT_PORT = "ext"                 # ext's port on br0

# A prefix ends up in namespace names, container IDs (which must start with
# a letter or digit) and file names: keep it plain and short.
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,23}\Z")


class TopologyError(ValueError):
    """A lab that cannot be built as asked (bad prefix, too many nodes...)."""


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise TopologyError(
            f"prefix {prefix!r}: must be 1 to 24 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return prefix


def node_port(index: int) -> str:
    """Node i's port on the underlay bridge."""
    return f"n{index}"


@dataclass(frozen=True)
class Pod:
    node: int
    index: int
    netns: str
    container_id: str

    @property
    def name(self) -> str:
        return self.netns

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    address: netaddr.IPAddress
    prefixlen: int
    slice: netaddr.IPNetwork
    gateway: netaddr.IPAddress
    port: str
    dir: str
    pods: tuple[Pod, ...] = field(default=())
    # Dual-stack labs only: the IPv6 slice and gateway, and the node's IPv6 underlay address.
    slice6: netaddr.IPNetwork | None = None
    gateway6: netaddr.IPAddress | None = None
    address6: netaddr.IPAddress | None = None
    prefixlen6: int = netaddr.IPNetwork(UNDERLAY6).prefixlen
    segment: int = 1                 # the underlay L2 segment it sits on (1 in an unsegmented lab)

    @property
    def name(self) -> str:
        return self.netns

    @property
    def short(self) -> str:
        return f"n{self.index}"

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @property
    def cidr6(self) -> str | None:
        return f"{self.address6}/{self.prefixlen6}" if self.address6 is not None else None

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    @property
    def conflist_path(self) -> str:
        return f"{self.dir}/10-fan.conflist"

    @property
    def state_dir(self) -> str:
        return f"{self.dir}/state"

    @property
    def agent_socket(self) -> str:
        return f"{self.dir}/plugin.sock"

    @property
    def log_path(self) -> str:
        return f"{self.dir}/agent.log"

    @property
    def pid_path(self) -> str:
        return f"{self.dir}/agent.pid"


@dataclass(frozen=True)
class LabSpec:
    """What `lab up` was asked for; everything else follows from it."""
    prefix: str = DEFAULT_PREFIX
    nodes: int = 3
    pods_per_node: int = 2
    encap: str = "vxlan"
    fanmap: str = "bpf"
    overlay: str = DEFAULT_OVERLAY
    underlay: str = UNDERLAY
    overlay6: str | None = None      # dual-stack: the IPv6 overlay beside `overlay`
    ipv6_only: bool = False          # an IPv6 underlay, `overlay6` alone (`overlay` unused)
    segments: int = 1                # underlay L2 segments joined by a router (cni_fan.lab.segments)
    direct_routing: bool = False     # `directRouting: true` in every node's conflist

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= MAX_NODES:
            raise TopologyError(f"nodes: must be a whole number from 1 to {MAX_NODES}, got {self.nodes!r}")
        try:
            seg.check_segments(self.segments, self.nodes)
        except seg.SegmentError as exc:
            raise TopologyError(str(exc)) from None
        if not isinstance(self.direct_routing, bool):
            raise TopologyError(f"direct_routing: must be true or false, got {self.direct_routing!r}")
        if (isinstance(self.pods_per_node, bool) or not isinstance(self.pods_per_node, int)
                or not 0 <= self.pods_per_node <= MAX_PODS):
            raise TopologyError(f"pods per node: must be a whole number from 0 to {MAX_PODS}, got {self.pods_per_node!r}")
        if self.encap not in ENCAPS:
            raise TopologyError(f"encap: must be one of {', '.join(ENCAPS)}, got {self.encap!r}")
        if self.fanmap not in FANMAPS:
            raise TopologyError(f"fanmap: must be one of {', '.join(FANMAPS)}, got {self.fanmap!r}")
        if netaddr.IPNetwork(self.underlay) != netaddr.IPNetwork(UNDERLAY):
            raise TopologyError(f"underlay: the lab's underlay is {UNDERLAY}")
        if not isinstance(self.ipv6_only, bool):
            raise TopologyError(f"ipv6_only: must be true or false, got {self.ipv6_only!r}")
        if self.ipv6_only:
            self._check_ipv6_only()
            return
        try:
            fan = FanMap.parse(self.overlay, self.underlay)
        except ValueError as exc:
            raise TopologyError(f"overlay {self.overlay!r}: {exc}") from None
        if netaddr.IPAddress(EXT_ADDRESS) in fan.overlay:
            raise TopologyError("overlay must not contain the ext address")
        if fan.capacity < self.pods_per_node:
            raise TopologyError(f"a slice holds {fan.capacity} pods, fewer than {self.pods_per_node}")
        if self.overlay6 is not None:
            self._check_overlay6()
        self._check_fan_config()

    def _check_ipv6_only(self) -> None:
        if self.overlay6 is None:
            raise TopologyError("an IPv6-only lab needs overlay6 (its pods' only overlay)")
        self._check_overlay6()
        self._check_fan_config()

    def _check_fan_config(self) -> None:
        """What the plugin and the agent would refuse, the lab refuses up front."""
        from cni_fan.cni.errors import CniError
        from cni_fan.config import FanConfig

        try:
            FanConfig.from_dict(runtime_config(self.conflist(self.node(1))))
        except CniError as exc:
            raise TopologyError(f"the fan config would be refused: {exc.msg}") from None

    def _check_overlay6(self) -> None:
        try:
            fan6 = FanMap.parse(self.overlay6, self.fan_underlay)
        except (ValueError, TypeError, netaddr.AddrFormatError) as exc:
            raise TopologyError(f"overlay6 {self.overlay6!r}: {exc}") from None
        if fan6.overlay.version != 6:
            raise TopologyError(f"overlay6 {self.overlay6!r}: want an IPv6 prefix (the IPv4 one is --overlay)")
        underlay6 = netaddr.IPNetwork(UNDERLAY6)
        if fan6.overlay in underlay6 or underlay6 in fan6.overlay:
            raise TopologyError(f"overlay6 {self.overlay6} overlaps the lab's IPv6 underlay {UNDERLAY6}")
        if fan6.capacity < self.pods_per_node:
            raise TopologyError(f"an IPv6 slice holds {fan6.capacity} pods, fewer than {self.pods_per_node}")

    # -- derived -------------------------------------------------------------

    @property
    def fan(self) -> FanMap:
        return FanMap.parse(self.overlay, self.underlay)

    @property
    def fan6(self) -> FanMap | None:
        """The IPv6 overlay's map: keyed by the same IPv4 underlay (dual-stack labs) or the IPv6 one."""
        return FanMap.parse(self.overlay6, self.fan_underlay) if self.overlay6 is not None else None

    @property
    def fan_underlay(self) -> str:
        """The `underlay` of the nodes' conflists: IPv6 in an IPv6-only lab."""
        return UNDERLAY6_ONLY if self.ipv6_only else self.underlay

    @property
    def dual_stack(self) -> bool:
        return self.overlay6 is not None and not self.ipv6_only

    @property
    def has_ipv4(self) -> bool:
        return not self.ipv6_only

    @property
    def has_ipv6(self) -> bool:
        return self.overlay6 is not None

    @property
    def segmented(self) -> bool:
        return self.segments > 1

    @property
    def ext_cidr6(self) -> str:
        length = seg.SEGMENT6_PREFIXLEN if self.segmented else netaddr.IPNetwork(UNDERLAY6).prefixlen
        return f"{EXT_ADDRESS6}/{length}"

    def node_address6(self, i: int) -> netaddr.IPAddress:
        """Node i's IPv6 underlay address: fd00:198:18::i:(10+i), as its IPv4 one is 198.18.i.(10+i)
        (fd00:198:18::s:(10+i) on segment s of a segmented lab)."""
        self.node_address(i)  # the same range check
        if self.segmented:
            return seg.node_address6(i, seg.segment_of(i, self.segments))
        return netaddr.IPAddress(int(netaddr.IPNetwork(UNDERLAY6).network) + (i << 16) + 10 + i, 6)

    @property
    def node_prefixlen6(self) -> int:
        return seg.SEGMENT6_PREFIXLEN if self.segmented else netaddr.IPNetwork(UNDERLAY6).prefixlen

    @property
    def root(self) -> str:
        return f"{LAB_ROOT}/{self.prefix}"

    @property
    def bin_dir(self) -> str:
        return f"{self.root}/bin"

    @property
    def state_file(self) -> str:
        return f"{self.root}/lab.json"

    @property
    def underlay_netns(self) -> str:
        return f"{self.prefix}under"

    @property
    def ext_netns(self) -> str:
        return f"{self.prefix}ext"

    @property
    def router_netns(self) -> str:
        """The router joining the segments (a segmented lab only)."""
        return f"{self.prefix}router"

    @property
    def underlay_prefixlen(self) -> int:
        return netaddr.IPNetwork(self.underlay).prefixlen

    @property
    def node_prefixlen(self) -> int:
        """The prefix of a node's underlay address: its segment's, or the whole underlay's."""
        return seg.SEGMENT_PREFIXLEN if self.segmented else self.underlay_prefixlen

    @property
    def ext_cidr(self) -> str:
        return f"{EXT_ADDRESS}/{self.node_prefixlen}"

    def node_address(self, i: int) -> netaddr.IPAddress:
        """Node i (1-based) is 198.18.i.(10+i): one /24 of the underlay each
        (198.18.s.(10+i) on segment s of a segmented lab)."""
        if not 1 <= i <= MAX_NODES:
            raise TopologyError(f"node index {i} out of range 1..{MAX_NODES}")
        if self.segmented:
            return seg.node_address(i, seg.segment_of(i, self.segments))
        return netaddr.IPAddress(int(netaddr.IPNetwork(self.underlay).network) + (i << 8) + 10 + i)

    def node(self, i: int) -> Node:
        if self.ipv6_only:
            return self._node6(i)
        address = self.node_address(i)
        owned = slice_plan(self.fan, address)  # the node plan's own arithmetic
        netns = f"{self.prefix}n{i}"
        pods = tuple(Pod(node=i, index=j, netns=f"{netns}p{j}", container_id=f"{netns}p{j}")
                     for j in range(1, self.pods_per_node + 1))
        six = {}
        fan6 = self.fan6
        if fan6 is not None:
            owned6 = slice_plan(fan6, address)
            six = {"slice6": owned6.slice, "gateway6": owned6.gateway, "address6": self.node_address6(i),
                   "prefixlen6": self.node_prefixlen6}
        return Node(index=i, netns=netns, address=address, prefixlen=self.node_prefixlen,
                    slice=owned.slice, gateway=owned.gateway, port=node_port(i),
                    dir=f"{self.root}/n{i}", pods=pods, segment=seg.segment_of(i, self.segments), **six)

    def _node6(self, i: int) -> Node:
        """Node i of an IPv6-only lab: its primary (and only) family is IPv6."""
        address = self.node_address6(i)
        fan6 = self.fan6
        assert fan6 is not None
        owned = slice_plan(fan6, address)
        netns = f"{self.prefix}n{i}"
        pods = tuple(Pod(node=i, index=j, netns=f"{netns}p{j}", container_id=f"{netns}p{j}")
                     for j in range(1, self.pods_per_node + 1))
        return Node(index=i, netns=netns, address=address, prefixlen=self.node_prefixlen6,
                    slice=owned.slice, gateway=owned.gateway, port=node_port(i), dir=f"{self.root}/n{i}",
                    pods=pods, slice6=owned.slice, gateway6=owned.gateway, address6=address,
                    prefixlen6=self.node_prefixlen6, segment=seg.segment_of(i, self.segments))

    @property
    def all_nodes(self) -> tuple[Node, ...]:
        return tuple(self.node(i) for i in range(1, self.nodes + 1))

    @property
    def all_pods(self) -> tuple[Pod, ...]:
        return tuple(p for n in self.all_nodes for p in n.pods)

    def namespaces(self) -> list[str]:
        """Every namespace of the lab, in creation order."""
        names = [self.underlay_netns, *([self.router_netns] if self.segmented else []), self.ext_netns]
        for n in self.all_nodes:
            names.append(n.netns)
            names.extend(p.netns for p in n.pods)
        return names

    def fan_entry(self, node: Node) -> dict:
        """The `fan` plugin entry of node's conflist (the contract with the node agent)."""
        return {
            "type": "fan",
            **({} if self.ipv6_only else {"overlay": self.overlay}),
            **({"overlay6": self.overlay6} if self.overlay6 is not None else {}),
            "underlay": self.fan_underlay,
            "dataDir": node.state_dir,
            "agentSocket": node.agent_socket,
            "encap": self.encap,
            "fanmap": self.fanmap,
            "metricsPort": METRICS_PORT,
            **({"directRouting": True} if self.direct_routing else {}),
        }

    def conflist(self, node: Node) -> dict:
        return {
            "cniVersion": CNI_VERSION,
            "cniVersions": list(CNI_VERSIONS),
            "name": NETWORK_NAME,
            "plugins": [self.fan_entry(node)],
        }

    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "nodes": self.nodes, "pods_per_node": self.pods_per_node,
                "encap": self.encap, "fanmap": self.fanmap, "overlay": self.overlay, "underlay": self.underlay,
                "overlay6": self.overlay6, **({"ipv6_only": True} if self.ipv6_only else {}),
                **({"segments": self.segments} if self.segmented else {}),
                **({"direct_routing": True} if self.direct_routing else {})}

    @classmethod
    def from_dict(cls, raw: dict) -> "LabSpec":
        keys = ("prefix", "nodes", "pods_per_node", "encap", "fanmap", "overlay", "underlay", "overlay6", "ipv6_only",
                "segments", "direct_routing")
        return cls(**{k: raw[k] for k in keys if k in raw})


def runtime_config(conflist: dict, plugin_index: int = 0) -> dict:
    """The config a runtime hands one plugin of a conflist, as libcni builds it:
    the plugin's entry with the list's `name` and `cniVersion` added."""
    entry = dict(conflist["plugins"][plugin_index])
    entry["name"] = conflist["name"]
    entry["cniVersion"] = conflist["cniVersion"]
    return entry


def cni_env(command: str, pod: Pod, bin_dir: str, ifname: str = POD_IF) -> dict[str, str]:
    """The CNI environment a runtime sets for one call about `pod`."""
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": pod.netns_path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": bin_dir,
    }


def lab_namespace_re(prefix: str) -> re.Pattern[str]:
    """Matches exactly the namespace names a lab with `prefix` creates."""
    return re.compile(r"^" + re.escape(prefix) + r"(under|router|ext|n[1-9][0-9]*(p[1-9][0-9]*)?)\Z")


def node_index_of(prefix: str, netns: str) -> int | None:
    m = re.match(r"^" + re.escape(prefix) + r"n([1-9][0-9]*)\Z", netns)
    return int(m.group(1)) if m else None
