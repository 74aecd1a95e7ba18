"""The one protocol every piece of a node's datapath speaks.

`NodeDatapath` is a loop over a list of these, chosen from the plan: a new
piece (an IPv6 route, a direct-routing program) is one new module with one
class, and one line where the list is made. Each method is idempotent and
takes the netlink handle explicitly; what a piece must remember across
agent restarts lives in `NodeState`, handed to it when it is made.
"""
from __future__ import annotations

from typing import Protocol

from pyroute2 import IPRoute


class Component(Protocol):
    role: str  # which piece it is; `NodeDatapath.down(keep=...)` names pieces by it

    def problems(self, ipr: IPRoute) -> list[str]:
        """What differs from the plan, one sentence each for the log; [] when right."""

    def ensure(self, ipr: IPRoute) -> None:
        """Make it match the plan; safe to repeat, whatever state it finds."""

    def remove(self, ipr: IPRoute) -> list[str]:
        """Remove what `ensure` made; returns what was removed, in words ([] when nothing was there)."""
