"""Every way the tests ping, in one place.

- `ping_argv`: one ping(8) run (the labs' `ping`/`reaches` build on it);
- `echo`: one echo request from a raw socket, with DF, a chosen TTL and
  payload, answered by the reply or the ICMP error it caused (the datapath
  tests read TTLs, "fragmentation needed" and "time exceeded"), and the
  copy of the request a watcher at the destination saw.

The raw-socket pinger itself is the product lab's (`cni_fan.lab.probes`:
`ping`, `Pinger` for traffic kept flowing during a restart or a repair,
`icmp_socket`, `receive`); this module only adapts it.
"""
from __future__ import annotations

import secrets
import socket
from typing import Any

from cni_fan.lab import probes
from cni_fan.lab.icmp import IcmpMessage as Icmp
from cni_fan.lab.probes import icmp_socket  # noqa: F401 (the datapath tests' watcher)

def ping_argv(dst: str, count: int = 1, wait: float | None = 2, size: int | None = None,
              dont_fragment: bool = False, interval: float | None = None, deadline: float | None = None) -> list[str]:
    """ping(8)'s argv: numeric, quiet, done after `count` replies; `wait`
    seconds for an answer, or with `deadline` a request every `interval`
    until the first `count` replies or the deadline."""
    argv: list[Any] = ["ping", "-n", "-q", "-c", count]
    if wait is not None:
        argv += ["-W", wait]
    if deadline is not None:
        argv += ["-w", deadline]
    if interval is not None:
        argv += ["-i", interval]
    if size is not None:
        argv += ["-s", size]
    if dont_fragment:
        argv += ["-M", "do"]
    return [str(a) for a in (*argv, dst)]


def echo(netns_path: str, dst: str, *, payload: int = 56, ttl: int = 64, timeout: float = 1.0, tries: int = 3,
         watch: socket.socket | None = None) -> tuple[Icmp | None, Icmp | None]:
    """Echo request with DF set from the namespace at `netns_path`.

    Returns (answer, copy seen by `watch`): the answer is the echo reply or
    an ICMP error about our request; `watch` is a raw socket in the
    destination namespace that sees the request arrive (its TTL).
    Raises OSError (EMSGSIZE) when the local MTU refuses the packet.
    """
    ident = secrets.randbits(16)
    answer = probes.ping(netns_path, dst, payload=payload, ttl=ttl, timeout=timeout, tries=tries, ident=ident)
    seen = None
    if answer is not None and watch is not None:
        seen = probes.receive(watch, lambda m: m.kind == "request" and m.ident == ident, 0.5)
    return answer, seen
