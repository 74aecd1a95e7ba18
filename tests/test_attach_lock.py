"""The attachment lock across processes: one attachment's ADD and DEL at a time, GC and sweeps alone."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from cni_fan.attach_lock import locked


def _hold(state_dir: str, attachment, ready, release) -> None:
    with locked(state_dir, attachment):
        ready.set()
        release.wait(30)


@pytest.fixture
def holder(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    procs = []

    def start(attachment):
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold, args=(str(tmp_path), attachment, ready, release))
        proc.start()
        assert ready.wait(10), "the holder did not get the lock"
        procs.append((proc, release))
        return release

    yield start
    for proc, release in procs:
        release.set()
        proc.join(10)


def test_whole_network_lock_without_waiting_fails_fast_while_an_attachment_is_held(tmp_path: Path, holder) -> None:
    release = holder(("ctr-1", "eth0"))
    with pytest.raises(BlockingIOError):
        with locked(str(tmp_path), None, wait=False):
            pass
    with pytest.raises(BlockingIOError):
        with locked(str(tmp_path), ("ctr-1", "eth0"), wait=False):
            pass
    release.set()


def test_other_attachments_and_a_free_lock_are_taken_at_once(tmp_path: Path, holder) -> None:
    with locked(str(tmp_path), None, wait=False):  # nobody holds anything
        pass
    holder(("ctr-1", "eth0"))
    # Another attachment uses another byte (barring a hash collision, which merely makes it wait).
    with locked(str(tmp_path), ("ctr-2", "eth0"), wait=False):
        pass
    assert (tmp_path / "attachments.lock").stat().st_mode & 0o077 == 0
