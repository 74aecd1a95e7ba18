"""SHA-256 from CPython's built-in module, not `hashlib`.

`hashlib` loads OpenSSL's `_hashlib` at import, which costs a standalone
CNI call more than everything it hashes (docs/architecture.md, "What a
standalone call imports"); the names it hashes (lock bytes, owner keys,
veth names) need no particular implementation, only the same digest
everywhere.
"""
from __future__ import annotations

try:
    from _sha256 import sha256  # CPython 3.11
except ImportError:  # pragma: no cover - CPython 3.12 and later, or a build without it
    try:
        from _sha2 import sha256  # type: ignore[no-redef]
    except ImportError:
        from hashlib import sha256  # type: ignore[no-redef]

__all__ = ["sha256"]
