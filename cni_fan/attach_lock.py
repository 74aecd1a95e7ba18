"""One attachment's ADD and DEL at a time, across processes.

In server mode the call runs in a child of the plugin server, and that
child outlives the `fan` process the runtime started. A runtime that kills
a slow ADD (containerd does on a timeout) and then sends DEL could have
that DEL run before or during the ADD it believes stopped; the ADD then
finished after the DEL and its veth and address leaked. So:

- ADD and DEL of one (container ID, interface) hold a lock on one byte of
  `attachments.lock` in the network's state directory (its offset comes
  from a hash of the attachment; two attachments sharing a byte merely
  wait for each other); GC locks the whole file;
- an ADD whose runtime already hung up when it got the lock gives up
  without touching anything: the runtime's DEL has run or will run, and
  must find nothing.

POSIX record locks are dropped by the kernel when their holder dies.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from cni_fan.cni.call import CallContext, Verb
from cni_fan.cni.errors import CniError, IO_FAILURE, TRY_AGAIN_LATER
from cni_fan.cni.request import CniRequest
from cni_fan.digest import sha256

LOCK_NAME = "attachments.lock"


@contextlib.contextmanager
def locked(state_dir: str, attachment: tuple[str, str] | None, wait: bool = True) -> Iterator[None]:
    """Hold the lock of `attachment`, or of every attachment when None.

    `wait=False`: raise BlockingIOError at once when someone holds it (the
    node agent's sweeps skip a round rather than stall behind a slow call).
    """
    try:
        root = Path(state_dir)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot open the attachment lock in {state_dir}", str(exc)) from None
    try:
        mode = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        if attachment is None:
            fcntl.lockf(fd, mode, 0, 0)
        else:
            digest = sha256("/".join(attachment).encode()).digest()
            fcntl.lockf(fd, mode, 1, int.from_bytes(digest[:4], "big") >> 1)
        yield
    finally:
        os.close(fd)


def serialized(verb: Verb, state_dir_of: Callable[[Any], str]) -> Verb:
    """`verb` under the lock of its attachment (GC: of all of them).

    `state_dir_of` finds the lock's directory in the parsed config the verb
    is given; an ADD whose client (`ctx.client_alive`) is gone gives up.
    """

    @functools.wraps(verb)
    def run(req: CniRequest, config: Any, ctx: CallContext):
        whole = req.command == "GC"
        with locked(state_dir_of(config), None if whole else req.attachment):
            if req.command == "ADD" and not ctx.client_alive():
                raise CniError(TRY_AGAIN_LATER, "the runtime stopped waiting for this ADD before it began",
                               "nothing was changed")
            return verb(req, config, ctx)

    return run
