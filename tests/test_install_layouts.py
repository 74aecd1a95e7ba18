"""`cni-fan install` from a Python environment: the native client and its launcher, or Python launchers.

What tools/setup.sh installs into .cache/cni-bin (and every kernel test
calls): `fan` and `fan-ipam` as relative symlinks to the compiled client in
`.cni-fan/venv-<id>/`, beside the `cni-fan` launcher it execs to run a call
itself. Without a compiled client the plugins are Python launchers, and
install says so. (The bundle's layout: tests/test_build.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni_fan import install
from harness.system import BASE_ENV, CNI_BIN, REPO

VERSION_ENV = {**BASE_ENV, "CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": "none"}


def _install(bin_dir: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([REPO / ".venv" / "bin" / "cni-fan", "install", "--bin-dir", bin_dir],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _version(program: Path) -> dict:
    proc = subprocess.run([program], input=b'{"cniVersion": "0.4.0"}', env=VERSION_ENV, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def client() -> Path:
    client = install.compiled_client()
    if client is None:
        pytest.skip("no compiled client (tools/setup.sh compiles it)")
    return client


def test_setup_installed_the_native_client() -> None:
    for plugin in ("fan", "fan-ipam"):
        assert os.path.realpath(CNI_BIN / plugin).endswith("/fan-client"), os.readlink(CNI_BIN / plugin)


def test_venv_install_links_the_client_beside_a_dispatching_launcher(client: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _install(bin_dir)
    [name] = os.listdir(bin_dir / install.BUNDLES)
    assert name.startswith("venv-")
    directory = bin_dir / install.BUNDLES / name
    assert sorted(os.listdir(directory)) == ["cni-fan", "fan-client"]
    assert (directory / "fan-client").read_bytes() == client.read_bytes()
    for plugin in ("fan", "fan-ipam"):
        assert os.readlink(bin_dir / plugin) == f"{install.BUNDLES}/{name}/fan-client"  # relative
        assert _version(bin_dir / plugin)["cniVersion"] == "0.4.0"
    # The launcher runs the CLI under its own name, a plugin under the one the client gives it.
    cli = subprocess.run([directory / "cni-fan", "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "install" in cli.stdout
    ipam = subprocess.run([directory / "cni-fan"], input=b"{", env={**VERSION_ENV, "CNI_COMMAND": "ADD",
                                                                      "CNI_FAN_PLUGIN": "fan-ipam"},
                          capture_output=True, timeout=60)
    assert ipam.returncode != 0 and json.loads(ipam.stdout)["code"] in (4, 6)
    # Again: nothing changes; the directory keeps its files.
    inode = (directory / "fan-client").stat().st_ino
    _install(bin_dir)
    assert os.listdir(bin_dir / install.BUNDLES) == [name]
    assert (directory / "fan-client").stat().st_ino == inode


def test_without_a_compiled_client_the_plugins_are_python_launchers(tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    monkeypatch.setattr(install, "compiled_client", lambda: None)
    bin_dir = tmp_path / "bin"
    written = install.install_plugins(str(bin_dir))
    assert sorted(p.name for p in written) == ["fan", "fan-ipam"]
    assert "no compiled native client" in capsys.readouterr().err
    for plugin in ("fan", "fan-ipam"):
        path = bin_dir / plugin
        assert not path.is_symlink() and path.read_bytes().startswith(f"#!{sys.executable} -S\n".encode())
        assert _version(path)["cniVersion"] == "0.4.0"
