"""The lab's own error: every lab module raises it, `cni-fan lab` prints it."""
from __future__ import annotations


class LabError(RuntimeError):
    """The lab could not be built, found or removed; the message says why."""
