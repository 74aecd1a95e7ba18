"""The PyInstaller bundle (build.spec, `make build`) and installing it.

The bundle (the `bundle` fixture, conftest.py) is built when dist/cni-fan/
is missing or was built from other sources (its BUILD-ID differs from
`source_build_id`): `make build`, once per source change. Every test here is
marked `build`: `make unit` leaves them out.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cni_fan import __version__
from cni_fan.install import BUNDLES, source_build_id
from harness.system import REPO

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
VERSION_STDIN = b'{"cniVersion": "1.0.0"}'

pytestmark = [pytest.mark.slow, pytest.mark.build]


def run(argv, env=None, stdin: bytes = b"", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, env=env or ENV,
                          timeout=60, **kwargs)


def version(fan: Path, **env) -> subprocess.CompletedProcess:
    return run([fan], {**ENV, "CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": "none", **env}, VERSION_STDIN)


# -- the bundle ----------------------------------------------------------------

def test_layout_one_executable_and_two_names(bundle: Path) -> None:
    exe = bundle / "cni-fan"
    assert exe.is_file() and not exe.is_symlink() and os.access(exe, os.X_OK)
    client = bundle / "fan-client"  # the native thin client; it execs cni-fan beside it to run a call itself
    assert client.is_file() and not client.is_symlink() and os.access(client, os.X_OK)
    assert client.read_bytes()[:4] == b"\x7fELF"
    for name in ("fan", "fan-ipam"):
        assert (bundle / name).is_symlink() and os.readlink(bundle / name) == "fan-client"
    assert (bundle / "_internal").is_dir()
    assert (bundle / "BUILD-ID").read_text().strip() == source_build_id(REPO)
    # Each name runs its own program.
    out = version(bundle / "fan")
    assert out.returncode == 0 and b'"supportedVersions"' in out.stdout, out.stderr
    out = version(bundle / "fan-ipam")
    assert out.returncode == 0 and b'"supportedVersions"' in out.stdout, out.stderr
    out = run([exe, "map", "--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28/16"])
    assert out.returncode == 0 and b'"slice": "250.0.28.0/24"' in out.stdout, out.stderr


def test_no_runtime_hook_runs_on_every_call(bundle: Path) -> None:
    """build.spec drops the runtime hooks that would import inspect,
    pkgutil and multiprocessing before every CNI call."""
    listing = run([REPO / ".venv" / "bin" / "pyi-archive_viewer", "-l", "-b", bundle / "cni-fan"])
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.decode()
    assert "cni_fan_main" in names
    assert "pyi_rth_" not in names, names


@pytest.mark.kernel
@pytest.mark.parametrize("client", ["native", "python"])
def test_thin_client_path_loads_no_heavy_module(bundle: Path, tmp_path: Path, client: str) -> None:
    """A call the plugin server answers starts no Python through `fan` (the
    native client), and opens none of the modules the local path needs
    through the bundle's Python client (the modules are .pyc files on
    disk: strace sees them)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    sock = tmp_path / "plugin.sock"
    server = subprocess.Popen([bundle / "cni-fan", "serve", "--socket", sock], env=ENV,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    program, env = bundle / "fan", {}
    if client == "python":  # the bundle's entry script runs the plugin CNI_FAN_PLUGIN names
        program, env = bundle / "cni-fan", {"CNI_FAN_PLUGIN": "fan"}
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "cni-fan serve did not start"
            time.sleep(0.05)
        trace = tmp_path / "strace.txt"
        out = run(["strace", "-f", "-e", "trace=openat,execve", "-o", trace, program],
                  {**ENV, "CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": sock, **env}, VERSION_STDIN)
        assert out.returncode == 0 and b'"supportedVersions"' in out.stdout, out.stderr
    finally:
        server.terminate()
        server.wait(10)
    lines = trace.read_text().splitlines()
    opened = [line for line in lines if ".pyc" in line and "ENOENT" not in line]
    if client == "native":
        assert [line for line in lines if "execve(" in line and "= 0" in line] == lines[:1], lines[:5]
        assert not [line for line in lines if "libpython" in line or ".pyc" in line], "the native client started Python"
        return
    assert any("cni_fan/wire" in line for line in opened), "the call did not go through the thin client"
    for heavy in ("pyroute2", "cni_fan/runner", "cni_fan/plugin", "/json/", "/logging/", "/socket.",
                  "/inspect.", "/pkgutil.", "/multiprocessing/", "/typing."):
        assert not [line for line in opened if heavy in line], f"the thin client loaded {heavy}"


@pytest.mark.kernel
def test_runs_with_no_python_on_the_machine(bundle: Path) -> None:
    """Hide every Python installation (tmpfs over their directories, in a
    private mount namespace): the bundle still runs."""
    hide = {Path(sys.base_prefix), Path(sys.prefix), REPO / ".venv"}
    hide |= set(Path("/usr/lib").glob("python3*")) | set(Path("/usr/local/lib").glob("python3*"))
    hide = {p for p in hide if p.is_dir()}
    binaries = [p for d in ("/usr/bin", "/usr/local/bin") for p in Path(d).glob("python*") if p.is_file()]
    script = ["set -e"]
    script += [f"mount -t tmpfs none '{p}'" for p in sorted(hide)]
    script += [f"mount --bind /dev/null '{p}'" for p in binaries]
    script += [f"test ! -e '{sys.base_prefix}/bin/python3'",
               f"printf '{{}}' | CNI_COMMAND=VERSION CNI_FAN_AGENT_SOCKET=none '{bundle}/fan'",
               f"'{bundle}/cni-fan' map --overlay 250.0.0.0/8 --underlay 172.30.0.28/16"]
    out = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)])
    assert out.returncode == 0, out.stderr.decode()
    assert b'"supportedVersions"' in out.stdout and b'"250.0.28.0/24"' in out.stdout


# -- cni-fan install from the bundle -----------------------------------------------

def _copy_with_id(bundle: Path, dest: Path, build: str) -> Path:
    shutil.copytree(bundle, dest, symlinks=True)
    (dest / "BUILD-ID").write_text(build + "\n")
    return dest


def _install(cni_fan: Path, bin_dir: Path) -> None:
    out = run([cni_fan, "install", "--bin-dir", bin_dir])
    assert out.returncode == 0, out.stderr.decode()


def test_install_links_into_a_copy_of_the_bundle(bundle: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "opt" / "cni" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "fan").write_text("#!/bin/sh\nexit 1\n")  # an older install's file: replaced
    _install(bundle / "cni-fan", bin_dir)
    name = f"{__version__}-{(bundle / 'BUILD-ID').read_text().strip()}"
    for plugin in ("fan", "fan-ipam"):
        link = bin_dir / plugin
        assert link.is_symlink() and os.readlink(link) == f"{BUNDLES}/{name}/fan-client"  # relative
        assert Path(os.path.realpath(link)) == (bin_dir / BUNDLES / name / "fan-client").resolve()
    assert (bin_dir / BUNDLES / name / "_internal").is_dir()
    assert sorted(p.name for p in bin_dir.iterdir()) == [BUNDLES, "fan", "fan-ipam"], "no temporary left"
    # The same directory reached by another path (the host's /opt/cni/bin
    # is /host/opt/cni/bin in the init container): the links still resolve.
    alias = tmp_path / "host-view"
    alias.symlink_to(bin_dir)
    for plugin in ("fan", "fan-ipam"):
        out = version(alias / plugin)
        assert out.returncode == 0 and b'"supportedVersions"' in out.stdout, out.stderr
    # Installing the same build again changes nothing.
    before = {p: os.stat(p, follow_symlinks=False).st_ino for p in bin_dir.rglob("*")}
    _install(bundle / "cni-fan", bin_dir)
    assert os.listdir(bin_dir / BUNDLES) == [name]
    assert (bin_dir / BUNDLES / name / "cni-fan").stat().st_ino == before[bin_dir / BUNDLES / name / "cni-fan"]


def test_upgrades_keep_the_previous_bundle_and_drop_older(bundle: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    builds = [_copy_with_id(bundle, tmp_path / f"b{i}", f"build{i}") for i in range(3)]
    seen = []
    for b in builds:
        _install(b / "cni-fan", bin_dir)
        seen.append(f"{__version__}-build{len(seen)}")
        assert os.readlink(bin_dir / "fan") == f"{BUNDLES}/{seen[-1]}/fan-client"
        assert sorted(os.listdir(bin_dir / BUNDLES)) == sorted(seen[-2:])


def test_no_call_fails_while_installs_replace_the_plugins(bundle: Path, tmp_path: Path) -> None:
    """A runtime calling fan during upgrades always finds a whole plugin."""
    bin_dir = tmp_path / "bin"
    builds = [_copy_with_id(bundle, tmp_path / f"b{i}", f"build{i}") for i in range(2)]
    _install(builds[0] / "cni-fan", bin_dir)
    stop = threading.Event()
    failures: list[bytes] = []
    calls = [0]

    def hammer() -> None:
        while not stop.is_set():
            out = version(bin_dir / "fan")
            calls[0] += 1
            if out.returncode != 0 or b'"supportedVersions"' not in out.stdout:
                failures.append(out.stderr[-500:])

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        for i in range(6):
            _install(builds[i % 2] / "cni-fan", bin_dir)
    finally:
        stop.set()
        worker.join()
    assert calls[0] > 0 and not failures, failures[:3]
