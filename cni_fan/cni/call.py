"""What a verb is given besides its request: the call context and the parsed config.

A call runs either in the `fan` process the runtime started (standalone) or
in a child of the plugin server, which is not where the runtime is: it may
not see the runtime's paths, it outlives a client the runtime killed, and
its own stderr is the server's. `CallContext` carries those differences to
the verbs explicitly, so a reader of a verb sees everything it depends on.

Pure: standard library only (the server and the runner build contexts).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, NamedTuple, TextIO

from cni_fan.cni.request import CniRequest
from cni_fan.frozen import Frozen


def _always_alive() -> bool:
    return True


class CallContext(Frozen):
    """The caller's side of one call.

    `netns_fds`: namespace files the thin client opened for this call, by
    the path it was given (CNI_NETNS); the verbs use these descriptors
    instead of the path, which the server's child may not be able to open.
    `netlink_fds`: NETLINK_ROUTE sockets the thin client opened inside
    those namespaces, by the same path: the server's child uses them instead
    of entering the namespace (setns needs SYS_ADMIN, which the agent lacks).
    `client_alive`: False once the runtime's `fan` process has hung up (it
    gave up on the call); standalone, the caller is this process.
    `log_stream`: where the call's log lines go: the caller's stderr.
    `deferred`: work a verb hands back to run after the answer reached the
    caller (`defer`): DEL's veth teardown, which nothing the runtime needs
    waits for. Whoever ran the call runs it (`run_deferred`): the plugin
    server's child after its reply, standalone a detached process.
    """
    __slots__ = ("netns_fds", "netlink_fds", "client_alive", "log_stream", "deferred")
    ARGS = __slots__
    netns_fds: Mapping[str, int]
    netlink_fds: Mapping[str, int]
    client_alive: Callable[[], bool]
    log_stream: TextIO | None
    deferred: list[Callable[[], None]]

    def __init__(self, netns_fds: Mapping[str, int] | None = None, netlink_fds: Mapping[str, int] | None = None,
                 client_alive: Callable[[], bool] = _always_alive,
                 log_stream: TextIO | None = None,  # None: this process's stderr at the time of the call
                 deferred: list[Callable[[], None]] | None = None) -> None:
        # Frozen: a verb cannot swap what the caller gave it.
        self._set(netns_fds={} if netns_fds is None else netns_fds,
                  netlink_fds={} if netlink_fds is None else netlink_fds,
                  client_alive=client_alive, log_stream=log_stream, deferred=[] if deferred is None else deferred)

    @classmethod
    def standalone(cls) -> "CallContext":
        """The call runs in the process the runtime started: nothing preopened, the client is us."""
        return cls()

    @property
    def log_sink(self) -> TextIO:
        return self.log_stream if self.log_stream is not None else sys.stderr

    def defer(self, work: Callable[[], None]) -> None:
        """Run `work` after the answer: it must be safe to skip (a crash, a kill) and never raise."""
        self.deferred.append(work)


def run_deferred(context: CallContext) -> None:
    """The work the call deferred, in order; it logs its own failures."""
    while context.deferred:
        context.deferred.pop(0)()


# A verb: (request, the plugin's parsed config, context) -> a Result for ADD, else None.
Verb = Callable[[CniRequest, Any, CallContext], Any]


class PluginVerbs(NamedTuple):
    """One plugin: how it parses its config (once per call) and its verbs by CNI command."""
    parse_config: Callable[[Mapping[str, Any]], Any]
    verbs: Mapping[str, Verb]
