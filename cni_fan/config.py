"""The `fan` network config (and `fan-ipam`'s), parsed and validated once.

Pure: takes the decoded JSON of a network config and returns typed values
or raises `CniError(INVALID_CONFIG)` naming the key and what is wrong.
One source of truth for the fan parameters: the plugin, its IPAM and the
node agent all read them through this module.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping, NamedTuple

from cni_fan.cni.errors import CniError, INVALID_CONFIG
from cni_fan.cni.ifname import IFNAME_FORM, is_ifname
from netaddr import IPNetwork

from cni_fan.fanmap import FanMap, FanMapError

log = logging.getLogger("cni_fan.config")

ENCAP_OVERHEAD = {"vxlan": 50, "ipip": 20}
ENCAP_OVERHEAD_U6 = 70  # VXLAN over IPv6: 40 + 8 + 8 + 14
MAX_HOST_BITS_U6 = 32  # the eBPF program computes one 32-bit word of the outer IPv6 address
DEFAULT_DATA_DIR = "/run/cni-fan"
DEFAULT_AGENT_SOCKET = "/run/cni-fan/plugin.sock"
DEFAULT_VXLAN_PORT = 4789
# The exact forms of the keys with a syntax of their own, always applied with
# `_exact` (fullmatch): "$" matches before a final newline, and netaddr reads
# past trailing whitespace ("241.0.0.0/8\n" parses), so neither is a check.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros: "010" reads as octal elsewhere
IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
CIDR_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}/(?:3[0-2]|[12]?[0-9])")
CIDR_FORM = "an IPv4 network in CIDR form like 250.0.0.0/8 (nothing before or after it, no spaces or newlines)"
IPV4_FORM = "an IPv4 address like 250.0.28.1 (nothing before or after it, no spaces or newlines)"
# IPv6 text: hex groups, colons and an optional trailing dotted quad; netaddr
# checks the rest. The regex only refuses what netaddr would read past.
IPV6_RE = re.compile(r"[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*")
CIDR6_RE = re.compile(r"[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])")
CIDR6_FORM = "an IPv6 network in CIDR form like fd50::/48 (nothing before or after it, no spaces or newlines)"
IPV6_FORM = "an IPv6 address like fd50:0:0:1c::1 (nothing before or after it, no spaces or newlines)"
MIN_IPV6_MTU = 1280  # RFC 8200: every link that carries IPv6 takes packets this large

# Keys a runtime or libcni adds to every plugin's config; never a typo of ours.
RUNTIME_KEYS = {"cniVersion", "cniVersions", "name", "type", "ipam", "dns", "args", "prevResult",
                "runtimeConfig", "capabilities", "disableCheck", "disableGC", "plugins",
                # GC (spec 1.1.0); libcni sets both spellings (containernetworking/cni#1101).
                "cni.dev/valid-attachments", "cni.dev/attachments"}
FAN_KEYS = {"overlay", "overlay6", "underlay", "underlayInterface", "hostReserve", "dataDir", "agentSocket",
            "encap", "mtu", "bridge", "vni", "vxlanPort", "ipMasq", "fanmap", "neighSuppress",
            "antiSpoof", "logFile", "logLevel", "metricsPort", "metricsAddress", "confDir",
            "routes", "directRouting"}
IPAM_KEYS = {"type", "overlay", "overlay6", "underlay", "underlayInterface", "hostReserve", "dataDir",
             "agentSocket", "routes", "logFile", "logLevel"}


def _fail(key: str, problem: str, value: Any = None) -> CniError:
    details = f"got {value!r}" if value is not None else ""
    return CniError(INVALID_CONFIG, f"{key}: {problem}", details)


def _exact(value: Any, pattern: re.Pattern[str], key: str, form: str) -> str:
    """The one validator of a string's exact form: all of `value` must match `pattern`.

    Refuses with code 7, naming the key and showing the value with repr(), so
    an invisible trailing newline or blank is visible in the message.
    """
    if not isinstance(value, str) or pattern.fullmatch(value) is None or value in (".", ".."):
        raise CniError(INVALID_CONFIG, f"{key}: {value!r} is not {form}", f"got {value!r}")
    return value


def _get_str(raw: Mapping[str, Any], key: str, default: str | None = None, *, where: str) -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _fail(f"{where}{key}", "must be a non-empty string", value)
    return value


def _get_int(raw: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int, *, where: str) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(f"{where}{key}", f"must be a whole number from {lo} to {hi}", value)
    return value


def _get_bool(raw: Mapping[str, Any], key: str, default: bool, *, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{where}{key}", "must be true or false", value)
    return value


def _get_ifname(raw: Mapping[str, Any], key: str, *, where: str) -> str | None:
    value = _get_str(raw, key, where=where)
    if value is not None and not is_ifname(value):  # the same message shape as _exact's
        raise CniError(INVALID_CONFIG, f"{where}{key}: {value!r} is not {IFNAME_FORM}", f"got {value!r}")
    return value


def _get_cidr(raw: Mapping[str, Any], key: str, *, where: str) -> str | None:
    value = _get_str(raw, key, where=where)
    return None if value is None else _exact(value, CIDR_RE, f"{where}{key}", CIDR_FORM)


def _get_cidr6(raw: Mapping[str, Any], key: str, *, where: str) -> str | None:
    value = _get_str(raw, key, where=where)
    return None if value is None else _exact(value, CIDR6_RE, f"{where}{key}", CIDR6_FORM)


def _get_path(raw: Mapping[str, Any], key: str, default: str, *, where: str) -> str:
    value = _get_str(raw, key, default, where=where)
    if value is None:  # an explicit null
        raise _fail(f"{where}{key}", "must be an absolute path without '..'", value)
    if not value.startswith("/") or "/../" in value + "/":
        raise _fail(f"{where}{key}", "must be an absolute path without '..'", value)
    return value.rstrip("/") or "/"


def _warn_unknown(raw: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in sorted(set(raw) - known - RUNTIME_KEYS):
        log.warning("ignoring unknown config key %s%s (a typo?)", where, key)


class RouteSpec(NamedTuple):
    dst: str
    gw: str = ""


class FanParams(NamedTuple):
    """What both the plugin and the IPAM need: the maps and where state lives."""
    network: str
    fanmap: FanMap | None  # the IPv4 overlay's map; None in an IPv6-only cluster (an IPv6 underlay)
    underlay: str
    underlay_interface: str | None
    data_dir: str
    agent_socket: str
    routes: tuple[RouteSpec, ...] | None  # None: a default route via the gateway
    log_file: str | None
    log_level: str
    fanmap6: FanMap | None = None  # the IPv6 overlay's map (`overlay6`): dual-stack or IPv6-only pods

    @property
    def state_dir(self) -> str:
        return f"{self.data_dir}/networks/{self.network}"

    @property
    def fanmaps(self) -> tuple[FanMap, ...]:
        """The maps of the families pods get, IPv4 first (the order results list them)."""
        return tuple(m for m in (self.fanmap, self.fanmap6) if m is not None)

    @property
    def ipv6_only(self) -> bool:
        """An IPv6 underlay: nodes have only IPv6 addresses, pods only `overlay6` ones."""
        return self.fanmap is None

    @property
    def underlay_net(self) -> IPNetwork:
        """The nodes' network (IPv4, or IPv6 in an IPv6-only cluster)."""
        return self.fanmaps[0].underlay


def _parse_routes(raw: Any, where: str, ipv6: bool, ipv4: bool = True) -> tuple[RouteSpec, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _fail(f"{where}routes", "must be a list of {\"dst\": CIDR, \"gw\": address}", raw)
    import netaddr

    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("dst"), str):
            raise _fail(f"{where}routes", "each route needs a \"dst\" CIDR string", entry)
        if entry.get("gw") and not isinstance(entry["gw"], str):  # netaddr reads 5 as 0.0.0.5
            raise _fail(f"{where}routes", "a route's \"gw\" must be an address string", entry)
        v6 = ipv6 and ":" in entry["dst"]
        if not ipv4 and not v6:
            raise _fail(f"{where}routes[{i}].dst", "pods of an IPv6-only cluster (an IPv6 underlay) have no IPv4 "
                        "address; give IPv6 routes only", entry)
        _exact(entry["dst"], CIDR6_RE if v6 else CIDR_RE, f"{where}routes[{i}].dst", CIDR6_FORM if v6 else CIDR_FORM)
        if entry.get("gw"):
            _exact(entry["gw"], IPV6_RE if v6 else IPV4_RE, f"{where}routes[{i}].gw", IPV6_FORM if v6 else IPV4_FORM)
        try:
            dst = netaddr.IPNetwork(entry["dst"])
            gw = netaddr.IPAddress(entry["gw"]) if entry.get("gw") else None
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise _fail(f"{where}routes", "dst must be a CIDR and gw an address", entry) from None
        spec = RouteSpec(dst=str(dst.cidr), gw=str(gw) if gw else "")
        if any(r.dst == spec.dst for r in out):  # the kernel keeps one route per destination
            raise _fail(f"{where}routes[{i}].dst", f"{spec.dst} is listed twice", entry)
        out.append(spec)
    return tuple(out)


def parse_fan_params(raw: Mapping[str, Any], network: str, *, where: str = "") -> FanParams:
    if isinstance(raw.get("underlay"), str) and ":" in raw["underlay"]:
        return _parse_ipv6_only(raw, network, where)
    overlay = _get_cidr(raw, "overlay", where=where)
    underlay = _get_cidr(raw, "underlay", where=where)
    if overlay is None:
        raise _fail(f"{where}overlay", "is required (the overlay network, e.g. \"240.0.0.0/8\")")
    if underlay is None:
        raise _fail(f"{where}underlay", "is required (the nodes' network, e.g. \"198.18.0.0/16\")")
    host_reserve = _get_host_reserve(raw, where)
    try:
        fanmap = FanMap.parse(overlay, underlay, host_reserve)
    except FanMapError as exc:
        raise CniError(INVALID_CONFIG, f"{where}overlay/underlay: {exc}",
                       f"overlay={overlay!r} underlay={underlay!r} hostReserve={host_reserve}") from None
    fanmap6 = _parse_fanmap6(raw, underlay, host_reserve, where)
    _check_pairing(fanmap, fanmap6, where)
    return _params(raw, network, where, underlay, fanmap, fanmap6)


def _parse_ipv6_only(raw: Mapping[str, Any], network: str, where: str) -> FanParams:
    """An IPv6 underlay: an IPv6-only cluster, whose pods get only `overlay6` addresses."""
    underlay = _get_cidr6(raw, "underlay", where=where)
    assert underlay is not None
    if raw.get("overlay") is not None:
        raise _fail(f"{where}overlay", "cannot be used with an IPv6 underlay: IPv4 slices are named by the nodes' "
                    "IPv4 addresses, and nodes of an IPv6-only cluster have none; drop \"overlay\" (pods get "
                    "\"overlay6\" addresses only) or give the nodes' IPv4 network as \"underlay\" for "
                    "dual-stack pods", raw.get("overlay"))
    if raw.get("overlay6") is None:
        raise _fail(f"{where}overlay6", "is required with an IPv6 underlay (the pods' IPv6 overlay, e.g. "
                    "\"fd50::/48\"); an IPv6-only cluster has no \"overlay\"")
    host_reserve = _get_host_reserve(raw, where)
    fanmap6 = _parse_fanmap6(raw, underlay, host_reserve, where)
    assert fanmap6 is not None
    host_bits = 128 - fanmap6.underlay.prefixlen
    if host_bits > MAX_HOST_BITS_U6:
        raise _fail(f"{where}underlay", f"leaves {host_bits} host bits; the eBPF datapath maps at most "
                    f"{MAX_HOST_BITS_U6} (a /{128 - MAX_HOST_BITS_U6} or longer, e.g. the /104 or /112 the nodes' "
                    "addresses come from, not their /64)", underlay)
    return _params(raw, network, where, underlay, None, fanmap6)


def _get_host_reserve(raw: Mapping[str, Any], where: str) -> int:
    host_reserve = _get_int(raw, "hostReserve", 1, 1, 1 << 24, where=where)
    if host_reserve is None:  # an explicit null
        raise _fail(f"{where}hostReserve", f"must be a whole number from 1 to {1 << 24}", host_reserve)
    return host_reserve


def _params(raw: Mapping[str, Any], network: str, where: str, underlay: str, fanmap: FanMap | None,
            fanmap6: FanMap | None) -> FanParams:
    """The keys every family shares, once the maps are made."""
    log_level = _get_str(raw, "logLevel", "info", where=where) or "info"
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise _fail(f"{where}logLevel", "must be debug, info, warning or error", log_level)
    return FanParams(
        network=network,
        fanmap=fanmap,
        underlay=underlay,
        underlay_interface=_get_ifname(raw, "underlayInterface", where=where),
        data_dir=_get_path(raw, "dataDir", DEFAULT_DATA_DIR, where=where),
        agent_socket=_get_path(raw, "agentSocket", DEFAULT_AGENT_SOCKET, where=where),
        routes=_parse_routes(raw.get("routes"), where, ipv6=fanmap6 is not None, ipv4=fanmap is not None),
        log_file=_get_path(raw, "logFile", "/", where=where) if raw.get("logFile") is not None else None,
        log_level=log_level.lower(),
        fanmap6=fanmap6,
    )


def _parse_fanmap6(raw: Mapping[str, Any], underlay: str, host_reserve: int, where: str) -> FanMap | None:
    """`overlay6` under the same underlay: the node's host bits (IPv4 on dual-stack nodes) name its IPv6 slice."""
    overlay6 = _get_cidr6(raw, "overlay6", where=where)
    if overlay6 is None:
        return None
    try:
        fanmap6 = FanMap.parse(overlay6, underlay, host_reserve)
    except FanMapError as exc:
        raise CniError(INVALID_CONFIG, f"{where}overlay6/underlay: {exc}",
                       f"overlay6={overlay6!r} underlay={underlay!r} hostReserve={host_reserve}") from None
    return fanmap6


def _check_pairing(fanmap: FanMap, fanmap6: FanMap | None, where: str) -> None:
    """Every IPv4 pod needs its IPv6 partner at the same index, so IPv6 slices hold at least as many pods."""
    if fanmap6 is not None and fanmap6.capacity < fanmap.capacity:
        raise CniError(INVALID_CONFIG,
                       f"{where}overlay6: its /{fanmap6.slice_prefixlen} slices hold {fanmap6.capacity} pods, fewer "
                       f"than the {fanmap.capacity} of the IPv4 /{fanmap.slice_prefixlen} slices; a pod takes the "
                       "same index in both families, so give overlay6 a shorter prefix (a /64 slice is usual)",
                       f"overlay6={fanmap6.overlay}")


class FanConfig(NamedTuple):
    """The `fan` plugin's config: the fan parameters plus the datapath's."""
    params: FanParams
    encap: str
    mtu: int | None  # None: the underlay interface's MTU minus the encapsulation overhead
    bridge: str | None  # None: named after the node's slice
    vni: int
    vxlan_port: int
    ip_masq: bool
    fanmap_mode: str
    neigh_suppress: bool
    anti_spoof: bool
    metrics_address: str
    metrics_port: int
    dns: dict[str, Any]
    direct_routing: bool = False  # peers on this node's underlay segment get packets unencapsulated

    @property
    def fanmap(self) -> FanMap | None:
        """The IPv4 overlay's map; None in an IPv6-only cluster."""
        return self.params.fanmap

    @property
    def encap_overhead(self) -> int:
        """What the tunnel adds to a pod packet: VXLAN over IPv6 is 20 bytes more than over IPv4."""
        return ENCAP_OVERHEAD_U6 if self.params.ipv6_only else ENCAP_OVERHEAD[self.encap]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "FanConfig":
        network = raw.get("name")
        if not isinstance(network, str) or not network:
            raise _fail("name", "is required")
        params = parse_fan_params(raw, network)
        encap = _get_str(raw, "encap", "vxlan", where="")
        if encap not in ENCAP_OVERHEAD:
            raise _fail("encap", "must be \"vxlan\" or \"ipip\"", encap)
        fanmap_mode = _get_str(raw, "fanmap", "bpf", where="")
        if fanmap_mode not in ("bpf", "routes"):
            raise _fail("fanmap", "must be \"bpf\" or \"routes\"", fanmap_mode)
        if params.fanmap6 is not None and encap != "vxlan":
            raise _fail("overlay6", "IPv6 pods need encap \"vxlan\" (IPIP carries only IPv4; IPv6 in IPv4 is sit)",
                        encap)
        if fanmap_mode == "routes" and encap != "vxlan":
            raise _fail("fanmap", "\"routes\" works with encap \"vxlan\" only (IPIP needs the bpf mapping)", fanmap_mode)
        if fanmap_mode == "routes" and params.ipv6_only:
            raise _fail("fanmap", "\"routes\" is not built for an IPv6 underlay (its per-peer routes and FDB "
                        "entries are IPv4 ones); use \"bpf\"", fanmap_mode)
        direct_routing = _get_bool(raw, "directRouting", False, where="")
        if direct_routing and encap != "vxlan":
            raise _fail("directRouting", "needs encap \"vxlan\": the IPIP program only sets a tunnel key, it "
                        "cannot send a packet unencapsulated", encap)
        if direct_routing and fanmap_mode != "bpf":
            raise _fail("directRouting", "needs fanmap \"bpf\": the choice between direct and encapsulated is "
                        "made per packet by the eBPF program; \"routes\" mode has none", fanmap_mode)
        default_vni = _default_vni(params)
        dns = raw.get("dns")
        dns = {} if dns is None else dns
        if not isinstance(dns, dict):
            raise _fail("dns", "must be an object", dns)
        _warn_unknown(raw, FAN_KEYS, "")
        return cls(
            params=params,
            encap=encap,
            mtu=_get_int(raw, "mtu", None, 576 if params.fanmap6 is None else MIN_IPV6_MTU, 65535, where=""),
            bridge=_get_ifname(raw, "bridge", where=""),
            vni=_get_int(raw, "vni", default_vni, 1, (1 << 24) - 1, where="") or default_vni,
            vxlan_port=_get_int(raw, "vxlanPort", DEFAULT_VXLAN_PORT, 1, 65535, where="") or DEFAULT_VXLAN_PORT,
            ip_masq=_get_bool(raw, "ipMasq", True, where=""),
            fanmap_mode=fanmap_mode,
            neigh_suppress=_get_bool(raw, "neighSuppress", True, where=""),
            anti_spoof=_get_bool(raw, "antiSpoof", True, where=""),
            metrics_address=_exact(_get_str(raw, "metricsAddress", "127.0.0.1", where="") or "127.0.0.1",
                                   IPV4_RE, "metricsAddress", IPV4_FORM),
            metrics_port=_get_int(raw, "metricsPort", 9475, 1, 65535, where="") or 9475,
            dns=dns,
            direct_routing=direct_routing,
        )


def _default_vni(params: FanParams) -> int:
    """The overlay's first 24 bits (IPv4's, else IPv6's): two fans on one underlay get different VNIs."""
    overlay = params.fanmaps[0].overlay
    width = 32 if overlay.version == 4 else 128
    return (int(overlay.network) >> (width - 24)) or 1


def parse_ipam_config(raw: Mapping[str, Any]) -> FanParams:
    """`fan-ipam` reads its parameters from the `ipam` object of the config."""
    network = raw.get("name")
    if not isinstance(network, str) or not network:
        raise _fail("name", "is required")
    ipam = raw.get("ipam")
    if not isinstance(ipam, dict):
        raise _fail("ipam", "must be an object with the fan parameters (overlay, underlay, ...)", ipam)
    _warn_unknown(ipam, IPAM_KEYS, "ipam.")
    return parse_fan_params(ipam, network, where="ipam.")

