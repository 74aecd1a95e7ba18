"""The CNI request: environment variables and the config on stdin, validated.

Pure: takes a mapping and bytes, returns a `CniRequest` or raises `CniError`
with the code the spec gives for each kind of bad input.
"""
from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from cni_fan.cni.errors import (
    CniError,
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
)
from cni_fan.cni.ifname import IFNAME_FORM, is_ifname
from cni_fan.cni.versions import SUPPORTED_VERSIONS, version_at_least

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# Verbs that act on one attachment and therefore need its identity.
ATTACHMENT_COMMANDS = ("ADD", "DEL", "CHECK")
# \Z, not $: "$" also matches before a trailing newline ("abc\n").
CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
MAX_CONTAINER_ID = 256
MAX_STDIN = 1 << 20


class CniRequest(NamedTuple):
    command: str
    cni_version: str
    config: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = MappingProxyType({})  # CNI_ARGS; the default is an empty, read-only mapping
    path: tuple[str, ...] = ()

    @property
    def attachment(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


def error_version(stdin: bytes) -> str:
    """The version to answer an error in: the config's, when it is readable."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except Exception:
        return SUPPORTED_VERSIONS[-1]
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is `K=V;K2=V2`; an empty string means no arguments."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, "CNI_ARGS is not a list of KEY=VALUE pairs separated by ';'",
                           f"bad pair {pair!r}")
        out[key] = value
    return out


def _decode_config(stdin: bytes) -> dict[str, Any]:
    if len(stdin) > MAX_STDIN:
        raise CniError(DECODE_FAILURE, "network config on stdin is too large", f"{len(stdin)} bytes")
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise CniError(DECODE_FAILURE, "network config on stdin is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "network config on stdin must be a JSON object",
                       f"got {type(config).__name__}")
    return config


def _require_version(config: dict[str, Any], command: str) -> str:
    version = config.get("cniVersion")
    if version is None and command == "VERSION":
        return SUPPORTED_VERSIONS[-1]
    if not isinstance(version, str) or not version:
        raise CniError(INCOMPATIBLE_VERSION, "network config has no cniVersion",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if command == "CHECK" and not version_at_least(version, "0.4.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, the config says {version}")
    if command in ("GC", "STATUS") and not version_at_least(version, "1.1.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, the config says {version}")
    return version


def _env(environ: Mapping[str, str], name: str, command: str, required: bool) -> str:
    value = environ.get(name, "")
    if required and not value:
        raise CniError(INVALID_ENVIRONMENT, f"{name} is required for {command}")
    if "\x00" in value:
        raise CniError(INVALID_ENVIRONMENT, f"{name} contains a NUL byte")
    return value


def parse_request(environ: Mapping[str, str], stdin: bytes) -> CniRequest:
    """Validate everything a verb relies on, in the order the spec checks it."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENVIRONMENT, "CNI_COMMAND is not set",
                       f"expected one of {', '.join(COMMANDS)}")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command[:40]!r} is not a CNI command",
                       f"expected one of {', '.join(COMMANDS)}")
    if command == "VERSION":
        config = _decode_config(stdin) if stdin.strip() else {}
        return CniRequest(command=command, cni_version=_require_version(config, command), config=config)

    config = _decode_config(stdin)
    version = _require_version(config, command)
    name = config.get("name")
    if not isinstance(name, str) or not NETWORK_NAME_RE.match(name):
        raise CniError(INVALID_CONFIG, "network config needs a \"name\" of letters, digits, '_', '.' or '-'",
                       f"got {name!r}")
    if command not in ATTACHMENT_COMMANDS:
        return CniRequest(command=command, cni_version=version, config=config,
                          path=_split_path(environ.get("CNI_PATH", "")))

    container_id = _env(environ, "CNI_CONTAINERID", command, required=True)
    if len(container_id) > MAX_CONTAINER_ID or not CONTAINER_ID_RE.match(container_id):
        raise CniError(INVALID_ENVIRONMENT,
                       "CNI_CONTAINERID must start with a letter or digit and hold only letters, digits, '_', '.' or '-'",
                       f"got {container_id[:80]!r}")
    ifname = _env(environ, "CNI_IFNAME", command, required=True)
    if not is_ifname(ifname):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME is not {IFNAME_FORM}", f"got {ifname[:40]!r}")
    netns = _env(environ, "CNI_NETNS", command, required=command in ("ADD", "CHECK"))
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS must be an absolute path", f"got {netns[:120]!r}")
    args = parse_cni_args(_env(environ, "CNI_ARGS", command, required=False))
    return CniRequest(command=command, cni_version=version, config=config, container_id=container_id,
                      netns=netns, ifname=ifname, args=args, path=_split_path(environ.get("CNI_PATH", "")))


def _split_path(raw: str) -> tuple[str, ...]:
    return tuple(p for p in raw.split(":") if p)
