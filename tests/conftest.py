"""Fixtures of the kernel integration tests (the labs are in tests/harness/).

Nothing here is autouse: the unit tests never create a namespace. Every
fixture that creates a namespace or starts a process removes it in its
finalizer, so a failing test leaves nothing behind.
"""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from harness import netlab
from harness.bundle import ensure_bundle
from harness.netlab import Mode, Netns, make_node, serving
from harness.system import require_kernel_lab


@pytest.fixture(scope="module")
def fan_node() -> Iterator[Netns]:
    """A node namespace with `u0` = 198.18.1.10/16: its slice of 241.0.0.0/8 is 241.1.10.0/24."""
    require_kernel_lab()
    node = make_node("node")
    try:
        yield node
    finally:
        node.delete()


@pytest.fixture(scope="module")
def node6() -> Iterator[Netns]:
    """An IPv6-only node namespace (harness/ipv6only.py: fd00:198:18::a/112, no IPv4)."""
    from harness.ipv6only import make_node6

    require_kernel_lab()
    node = make_node6()
    try:
        yield node
    finally:
        node.delete()


@pytest.fixture(scope="module", params=["local", "server"])
def plugin_mode(request, fan_node: Netns, tmp_path_factory) -> Iterator[Mode]:
    """Where calls run: in the `fan` process itself, or in a `cni-fan serve`
    started inside the node namespace (its socket under the test's tmp dir).
    The configs carry `agentSocket`; in local mode it names no socket."""
    with serving(request.param, fan_node, tmp_path_factory.mktemp(f"mode-{request.param}")) as mode:
        yield mode


class Pods:
    """Creates pod namespaces for one test and removes them afterwards."""

    def __init__(self) -> None:
        self.created: list[Netns] = []

    def new(self) -> Netns:
        pod = Netns("pod")
        self.created.append(pod)
        return pod

    def cleanup(self) -> None:
        for pod in self.created:
            pod.delete()
            netlab.forget_libcni_cache(netlab.cnitool_container_id(pod.path))


@pytest.fixture
def pods(request) -> Iterator[Pods]:
    require_kernel_lab()
    made = Pods()
    try:
        yield made
    finally:
        made.cleanup()
        # A failed test may leave host veths of its pods in the module's node;
        # remove them so the next test starts from a node without pods.
        if "fan_node" in request.fixturenames:
            node = request.getfixturevalue("fan_node")
            for name in node.links():
                if name.startswith(("fanv", "fanz")):  # veths and tombstones (net/tombstone.py)
                    node.ip("link", "del", name, check=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def bundle() -> Path:
    """dist/cni-fan/, built first when it is missing or stale (harness/bundle.py)."""
    return ensure_bundle()


# Fixtures that make namespaces or load programs into the kernel (here and in the modules).
KERNEL_FIXTURES = {"fan_node", "plugin_mode", "pods", "lab", "pair", "cluster", "sandbox", "seeded", "added",
                   "bare_node", "netns_fd", "guard_fd", "control_lab", "onlink_lab"}


def pytest_collection_modifyitems(config, items) -> None:
    """The tiers hold: `make unit` (-m "not kernel and not build") never needs
    root or starts a build, so a test that asks for a kernel lab says so with
    `kernel`, and one that asks for the bundle with `build`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "bundle" in fixtures and item.get_closest_marker("build") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the bundle: mark it @pytest.mark.build")
        if fixtures & KERNEL_FIXTURES and item.get_closest_marker("kernel") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(fixtures & KERNEL_FIXTURES)}: mark it "
                                    "@pytest.mark.kernel")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Last line of defence: no namespace of this run survives it (only this
    run's prefix is touched, so a parallel run is left alone)."""
    for name in netlab.leftover_namespaces():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def restore_cni_fan_logging() -> Iterator[None]:
    """`run_local` configures the `cni_fan` logger (its own handler, no
    propagation) as a plugin process would; tests that call it in-process
    put it back, or later tests' caplog sees nothing."""
    logger = logging.getLogger("cni_fan")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
