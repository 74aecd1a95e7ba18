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


# -- the lock wrapper of the verbs, and the call context's liveness -----------------------------


def _request(command: str):
    from cni_fan.cni.request import CniRequest

    return CniRequest(command=command, cni_version="1.1.0", config={"name": "fannet"}, container_id="ctr-1",
                      ifname="eth0")


def test_an_add_whose_client_is_gone_changes_nothing_and_says_try_again(tmp_path: Path) -> None:
    from cni_fan.attach_lock import serialized
    from cni_fan.cni.call import CallContext
    from cni_fan.cni.errors import TRY_AGAIN_LATER, CniError

    ran: list = []
    verb = serialized(lambda req, config, ctx: ran.append((req.command, config, ctx)), lambda config: config["dir"])
    gone = CallContext(client_alive=lambda: False)
    with pytest.raises(CniError) as info:
        verb(_request("ADD"), {"dir": str(tmp_path)}, gone)
    assert info.value.code == TRY_AGAIN_LATER and ran == []
    verb(_request("DEL"), {"dir": str(tmp_path)}, gone)  # DEL cleans up whoever asks
    alive = CallContext()
    verb(_request("ADD"), {"dir": str(tmp_path)}, alive)
    assert ran == [("DEL", {"dir": str(tmp_path)}, gone), ("ADD", {"dir": str(tmp_path)}, alive)]


def _try_lock(state_dir: str, attachment, result) -> None:
    try:
        with locked(state_dir, attachment, wait=False):
            result.put("free")
    except BlockingIOError:
        result.put("held")


def test_the_verb_runs_under_its_attachments_lock_found_in_the_parsed_config(tmp_path: Path) -> None:
    from cni_fan.attach_lock import serialized
    from cni_fan.cni.call import CallContext

    ctx = multiprocessing.get_context("fork")

    def probe(req, config, call) -> str:
        result = ctx.Queue()
        proc = ctx.Process(target=_try_lock, args=(config.state_dir, ("ctr-1", "eth0"), result))
        proc.start()
        proc.join(30)
        return result.get(timeout=5)

    class Parsed:
        state_dir = str(tmp_path / "net")

    verb = serialized(probe, lambda config: config.state_dir)
    assert verb(_request("ADD"), Parsed(), CallContext()) == "held"
    assert probe(_request("ADD"), Parsed(), CallContext()) == "free"  # and released afterwards


def test_the_servers_liveness_probe_sees_a_client_hang_up() -> None:
    import socket

    from cni_fan.server import _client_alive

    server_end, client_end = socket.socketpair()
    try:
        assert _client_alive(server_end)  # connected, silent: waiting for its answer
        client_end.close()
        assert not _client_alive(server_end)
    finally:
        server_end.close()
