"""CNI results and their shape in each spec version.

Results are built once in the 1.1.0 shape and converted on the way out, so
the verbs never branch on versions. Incoming `prevResult`s are normalised
to the same shape.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from cni_fan.cni.errors import CniError, DECODE_FAILURE
from cni_fan.cni.versions import version_at_least


class Interface(NamedTuple):
    name: str
    mac: str = ""
    mtu: int = 0
    sandbox: str = ""

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.mac:
            out["mac"] = self.mac
        if self.mtu and version_at_least(version, "1.1.0"):
            out["mtu"] = self.mtu
        if self.sandbox:
            out["sandbox"] = self.sandbox
        return out


class IPConfig(NamedTuple):
    address: str  # CIDR form: pod address / slice prefix length
    gateway: str = ""
    interface: int | None = None

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address}
        if not version_at_least(version, "1.0.0"):
            out["version"] = "6" if ":" in self.address else "4"
        if self.gateway:
            out["gateway"] = self.gateway
        if self.interface is not None:
            out["interface"] = self.interface
        return out


class Route(NamedTuple):
    dst: str
    gw: str = ""

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"dst": self.dst}
        if self.gw:
            out["gw"] = self.gw
        return out


class Result(NamedTuple):
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: Mapping[str, Any] = MappingProxyType({})  # the default is an empty, read-only mapping

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [i.to_dict(version) for i in self.interfaces]
        out["ips"] = [ip.to_dict(version) for ip in self.ips]
        if self.routes:
            out["routes"] = [r.to_dict(version) for r in self.routes]
        out["dns"] = dict(self.dns)
        return out


def _as_list(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CniError(DECODE_FAILURE, f"prevResult.{key} must be a list of objects")
    return value


def parse_result(raw: Any) -> Result:
    """Read a prevResult of any supported version into the 1.1.0 shape."""
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "prevResult must be a JSON object")
    try:
        interfaces = tuple(
            Interface(name=str(i["name"]), mac=str(i.get("mac", "")), mtu=int(i.get("mtu", 0) or 0),
                      sandbox=str(i.get("sandbox", "")))
            for i in _as_list(raw, "interfaces"))
        ips = tuple(
            IPConfig(address=str(ip["address"]), gateway=str(ip.get("gateway", "")),
                     interface=(int(ip["interface"]) if ip.get("interface") is not None else None))
            for ip in _as_list(raw, "ips"))
        routes = tuple(Route(dst=str(r["dst"]), gw=str(r.get("gw", ""))) for r in _as_list(raw, "routes"))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(Infinity)
        raise CniError(DECODE_FAILURE, "prevResult is not a CNI result", f"{type(exc).__name__}: {exc}") from None
    dns = raw.get("dns") or {}
    return Result(interfaces=interfaces, ips=ips, routes=routes, dns=dns if isinstance(dns, dict) else {})
