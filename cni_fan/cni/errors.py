"""CNI error codes and the one exception type every verb raises.

Kept import-light: the thin `fan` client imports this on every call.
"""
from __future__ import annotations

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
PLUGIN_DEGRADED = 51
# Codes above 99 are ours (the spec reserves 0-99).
INTERNAL = 100


class CniError(Exception):
    """An error the runtime sees as `{"code", "msg", "details"}`.

    `msg` is one sentence for a person; `details` carries the underlying
    cause (an errno string, the offending value).
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg

# Plugin-specific codes (docs/configuration.md lists them for operators).
INTERFACE_EXISTS = 101
POOL_FULL = 102
ADDRESS_UNAVAILABLE = 103
CHECK_FAILED = 104
ROUTE_EXISTS = 105
