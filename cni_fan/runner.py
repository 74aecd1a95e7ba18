"""Run one CNI call in this process: parse, dispatch, answer.

The same function serves the standalone path (`fan` run without the node
agent) and the plugin server's children, so both behave identically; what
differs between them is in the `CallContext` each passes in. The config is
parsed once, here, and handed to the verb with the context. Whatever
happens, the caller gets protocol bytes for stdout and an exit code; a
Python traceback never reaches the runtime (it goes to the log).
"""
from __future__ import annotations

import json
import logging
from typing import Mapping, TextIO

from cni_fan.cni.call import CallContext, PluginVerbs
from cni_fan.cni.errors import CniError, INTERNAL
from cni_fan.cni.request import error_version, parse_request
from cni_fan.cni.versions import SUPPORTED_VERSIONS

log = logging.getLogger("cni_fan")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def _plugin(plugin: str) -> PluginVerbs:
    if plugin == "fan":
        from cni_fan.plugin import PLUGIN
    elif plugin == "fan-ipam":
        from cni_fan.ipam.plugin import PLUGIN
    else:
        raise ValueError(f"unknown plugin {plugin!r}")
    return PLUGIN


def setup_logging(config: Mapping, environ: Mapping[str, str], stream: TextIO) -> None:
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
    handler = logging.StreamHandler(stream)
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


def run_local(plugin: str, environ: Mapping[str, str], stdin: bytes, context: CallContext) -> tuple[bytes, int]:
    """One CNI call: returns (stdout bytes, exit code)."""
    version = error_version(stdin)
    try:
        try:
            config = json.loads(stdin) if stdin.strip() else {}
        except (ValueError, RecursionError):  # parse_request answers with the decode error
            config = {}
        setup_logging(config if isinstance(config, dict) else {}, environ, context.log_sink)
        req = parse_request(environ, stdin)
        version = req.cni_version
        if req.command == "VERSION":
            answer = {"cniVersion": req.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
            return _dump(answer), 0
        chosen = _plugin(plugin)
        parsed = chosen.parse_config(req.config)  # once per call: the lock and the verb both use it
        result = chosen.verbs[req.command](req, parsed, context)
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

