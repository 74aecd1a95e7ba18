"""Fan programs loaded into the kernel for BPF_PROG_TEST_RUN, each with its own counters map.

The three program test modules (inner IPv4, inner IPv6, outer IPv6) load
their programs the same way; only the builder and the params differ.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from cni_fan.bpf import syscall
from cni_fan.bpf.fanprog import COUNTER_SLOTS, Counter, counter_key


class LoadedProgram:
    """`build(params, counters_map_fd)` loaded as a SCHED_CLS program named `name`."""

    def __init__(self, params: Any, build: Callable[[Any, int], bytes], name: str) -> None:
        self.params = params
        self.map_fd = syscall.create_percpu_array(8, COUNTER_SLOTS, name)
        try:
            self.fd = syscall.load_sched_cls(build(params, self.map_fd), name)
        except Exception:
            os.close(self.map_fd)
            raise

    def run(self, data: bytes, ctx: bytes | None = None) -> syscall.TestRun:
        return syscall.test_run(self.fd, data, ctx)

    def count(self, counter: Counter) -> int:
        return sum(syscall.read_percpu_u64(self.map_fd, counter_key(self.params.hook, counter)))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.map_fd)


def loader(make: Callable[..., LoadedProgram]) -> Iterator[Callable[..., LoadedProgram]]:
    """The body of a test's `load` fixture: `make(...)` programs, all closed afterwards."""
    loaded: list[LoadedProgram] = []

    def load(*args: Any, **kw: Any) -> LoadedProgram:
        prog = make(*args, **kw)
        loaded.append(prog)
        return prog

    yield load
    for prog in loaded:
        prog.close()
