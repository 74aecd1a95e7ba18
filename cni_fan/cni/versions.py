"""The CNI spec versions this plugin speaks."""
from __future__ import annotations

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def version_at_least(version: str, minimum: str) -> bool:
    return _key(version) >= _key(minimum)
