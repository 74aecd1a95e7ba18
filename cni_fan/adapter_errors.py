"""How the verbs report a kernel adapter's failure in the CNI protocol.

The adapters (cni_fan/net/) raise their own exceptions (cni_fan/net/errors.py);
this table gives each its CNI error code. Message and details pass through
unchanged. The `fan` and `fan-ipam` verb tables are wrapped with
`reporting_adapter_errors`, so a verb reads as its story and its adapter
errors still reach the runtime as CNI errors.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, TypeVar

from cni_fan.cni.errors import (CniError, INVALID_CONFIG, INVALID_ENVIRONMENT, IO_FAILURE, TRY_AGAIN_LATER,
                                UNKNOWN_CONTAINER)
from cni_fan.net.errors import (GuardError, LinkConflict, LinkError, NetError, NetnsError, NetnsMissing, TcError,
                                UnderlayAmbiguous, UnderlayMissing)

# Most specific first: the first class the error is an instance of decides.
CODES: tuple[tuple[type[NetError], int], ...] = (
    (NetnsMissing, UNKNOWN_CONTAINER),
    (NetnsError, INVALID_ENVIRONMENT),
    (LinkConflict, INVALID_CONFIG),
    (LinkError, IO_FAILURE),
    (UnderlayMissing, TRY_AGAIN_LATER),
    (UnderlayAmbiguous, INVALID_CONFIG),
    (GuardError, IO_FAILURE),
    (TcError, IO_FAILURE),
    (NetError, IO_FAILURE),
)

Verb = TypeVar("Verb", bound=Callable)


def as_cni_error(exc: NetError) -> CniError:
    code = next(code for kind, code in CODES if isinstance(exc, kind))
    return CniError(code, exc.msg, exc.details)


def reporting_adapter_errors(verb: Verb) -> Verb:
    """`verb`, with an adapter's exception re-raised as the CNI error of the same message."""
    @functools.wraps(verb)
    def run(*args, **kwargs):
        try:
            return verb(*args, **kwargs)
        except NetError as exc:
            raise as_cni_error(exc) from None
    return run  # type: ignore[return-value]


def verb_table(verbs: Mapping[str, Callable]) -> dict[str, Callable]:
    """A plugin's VERBS, each reporting adapter errors as CNI errors."""
    return {name: reporting_adapter_errors(verb) for name, verb in verbs.items()}
