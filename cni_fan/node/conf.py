"""Read the fan parameters from the conflist: one source of truth per node."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_fan.cni.errors import CniError
from cni_fan.config import FanConfig

DEFAULT_CONFLIST = "/etc/cni/net.d/10-fan.conflist"


class NodeConfigError(Exception):
    """The conflist cannot drive this node; str() says why, for the log."""


@dataclass(frozen=True)
class NodeConfig:
    path: str
    raw: dict[str, Any]        # the whole conflist, as installed for the runtime
    fan_entry: dict[str, Any]  # the plugin entry of type "fan", with name/cniVersion
    fan: FanConfig


def parse_conflist(raw: dict[str, Any], path: str = "<memory>") -> NodeConfig:
    plugins = raw.get("plugins")
    if not isinstance(plugins, list):
        raise NodeConfigError(f"{path}: not a conflist (no \"plugins\" list)")
    entries = [p for p in plugins if isinstance(p, dict) and p.get("type") == "fan"]
    if len(entries) != 1:
        raise NodeConfigError(f"{path}: needs exactly one plugin of type \"fan\", found {len(entries)}")
    entry = dict(entries[0])
    entry.setdefault("name", raw.get("name"))
    entry.setdefault("cniVersion", raw.get("cniVersion"))
    try:
        fan = FanConfig.from_dict(entry)
    except CniError as exc:
        raise NodeConfigError(f"{path}: {exc}") from None
    return NodeConfig(path=path, raw=raw, fan_entry=entry, fan=fan)


def load_conflist(path: str = DEFAULT_CONFLIST) -> NodeConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NodeConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise NodeConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise NodeConfigError(f"{path} must hold a JSON object")
    return parse_conflist(raw, path)
