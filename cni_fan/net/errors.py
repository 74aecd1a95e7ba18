"""The kernel adapters' own exceptions: what failed, on which object, and why.

Adapters know nothing of the CNI protocol; the verbs turn these into CNI
errors (cni_fan/adapter_errors.py), the node agent logs them. Each carries
`msg` (one sentence for a person, naming the object), `details` (the
underlying cause: an errno string, a hint) and `subject` (the object's name).
"""
from __future__ import annotations


class NetError(Exception):
    """A kernel adapter could not do what it was asked."""

    def __init__(self, msg: str, details: str = "", *, subject: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details
        self.subject = subject

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg


class NetnsError(NetError):
    """A network namespace cannot be opened or entered."""


class NetnsMissing(NetnsError):
    """The network namespace does not exist."""


class LinkError(NetError):
    """Creating, changing or deleting a link failed."""


class LinkConflict(LinkError):
    """A link of that name exists and is not what we would have made."""


class UnderlayError(NetError):
    """This node's underlay address cannot be determined."""


class UnderlayMissing(UnderlayError):
    """No usable address (yet): the interface or the address is not there."""


class UnderlayAmbiguous(UnderlayError):
    """Several addresses qualify: the config must say which."""


class TcError(NetError):
    """A tc qdisc or filter could not be added, read or removed."""


class GuardError(NetError):
    """A pod's port guard could not be installed, read or removed."""
