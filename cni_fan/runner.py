"""Run one CNI call in this process: parse, dispatch, answer.

The same function serves the standalone path (`fan` run without the node
agent) and the plugin server's children, so both behave identically.
Whatever happens, the caller gets protocol bytes for stdout and an exit
code; a Python traceback never reaches the runtime (it goes to the log).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Mapping

from cni_fan.cni.errors import CniError, INTERNAL
from cni_fan.cni.request import error_version, parse_request
from cni_fan.cni.versions import SUPPORTED_VERSIONS

log = logging.getLogger("cni_fan")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def _verbs(plugin: str):
    if plugin == "fan":
        from cni_fan.plugin import VERBS
    elif plugin == "fan-ipam":
        from cni_fan.ipam.plugin import VERBS
    else:
        raise ValueError(f"unknown plugin {plugin!r}")
    return VERBS


def setup_logging(config: Mapping, environ: Mapping[str, str], stream=None) -> None:
    """Logs go to stderr (and a file when configured), never to stdout."""
    source = config.get("ipam") if isinstance(config.get("ipam"), dict) and "logLevel" not in config else config
    level_name = str(environ.get("CNI_FAN_LOG_LEVEL") or source.get("logLevel") or "info").upper()
    level = getattr(logging, level_name, logging.INFO)
    if not isinstance(level, int):  # e.g. "basic_format" names a string in the module
        level = logging.INFO
    root = logging.getLogger("cni_fan")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    log_file = source.get("logFile")
    if isinstance(log_file, str) and log_file.startswith("/"):
        try:
            file_handler = logging.FileHandler(log_file)
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(file_handler)
        except OSError as exc:
            root.warning("cannot open logFile %s: %s", log_file, exc.strerror)


def run_local(plugin: str, environ: Mapping[str, str], stdin: bytes, stderr=None) -> tuple[bytes, int]:
    """One CNI call: returns (stdout bytes, exit code)."""
    version = error_version(stdin)
    try:
        try:
            config = json.loads(stdin) if stdin.strip() else {}
        except (ValueError, RecursionError):  # parse_request answers with the decode error
            config = {}
        setup_logging(config if isinstance(config, dict) else {}, environ, stderr)
        req = parse_request(environ, stdin)
        version = req.cni_version
        if req.command == "VERSION":
            answer = {"cniVersion": req.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
            return _dump(answer), 0
        result = _verbs(plugin)[req.command](req)
        if req.command == "ADD":
            return _dump(result.to_dict(req.cni_version)), 0
        return b"", 0
    except CniError as exc:
        log.error("%s %s failed: %s", plugin, environ.get("CNI_COMMAND", "?"), exc)
        return _dump(exc.to_dict(version)), 1
    except Exception as exc:  # the last line of defence: log it, answer in protocol
        log.error("%s %s: internal error: %s: %s", plugin, environ.get("CNI_COMMAND", "?"), type(exc).__name__, exc)
        log.debug("traceback of the internal error", exc_info=True)
        err = CniError(INTERNAL, f"internal error in {plugin}: {type(exc).__name__}: {exc}"[:500])
        return _dump(err.to_dict(version)), 1


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def main(plugin: str) -> int:
    out, code = run_local(plugin, os.environ, sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return code
