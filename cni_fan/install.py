"""Put `fan` and `fan-ipam` into a CNI bin directory, atomically.

A kubelet may run a plugin at any moment, so every name the runtime looks
up is replaced by a rename: the runtime sees the old plugin or the new one,
never half of one.

`fan` and `fan-ipam` are the native thin client (native/fan-client.c,
`fan-client`) wherever one was compiled: it hands the call to the node
agent's plugin server, and when none answers it execs the Python program
`cni-fan` in its own directory. Three layouts, by how this `cni-fan` runs:

- from a Python environment: `<bin-dir>/.cni-fan/venv-<id>/` gets the
  client that tools/setup.sh compiled (`cni_fan/native/fan-client`) and a
  small Python launcher `cni-fan` that starts Python with `-S` (skipping
  `site` saves start-up time on every call; docs/architecture.md), puts
  exactly the package's directories on the path and runs `fan`, `fan-ipam`
  or the CLI by the name it is given; `fan` and `fan-ipam` become relative
  symlinks to the client. With no compiled client, `fan` and `fan-ipam`
  are Python launchers themselves (the thin client of cni_fan/entry.py);
- from a PyInstaller directory bundle (`dist/cni-fan/`, what `make build`
  makes and the image ships, with its `fan-client`): the bundle is copied
  once into `<bin-dir>/.cni-fan/<version>-<build id>/` (copied under a
  temporary name, then renamed), and `fan` and `fan-ipam` become relative
  symlinks to the `fan-client` in it. The bundle's executable dispatches
  on the name it was started as. The symlinks are relative so that they
  resolve the same on the host (`/opt/cni/bin`) and in the installing
  container (`/host/opt/cni/bin`). The directory the symlinks pointed to
  before stays (a call that started a moment ago may still be loading
  from it); older ones are removed;
- from a onefile bundle: the executable itself is copied under each name.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import cni_fan

PLUGINS = {"fan": "fan_main", "fan-ipam": "fan_ipam_main"}
BUNDLES = ".cni-fan"  # directory of installed bundles inside the CNI bin dir
CLIENT = "fan-client"  # the native thin client's name in a bundle or venv directory
PROGRAM = "cni-fan"  # the Python program beside it, which the client execs to run a call itself
# After `import os, sys`: run `fan`, `fan-ipam` or the CLI by the name this program was given (the
# venv's dispatching launcher and the bundle's entry script, build.spec).
DISPATCH = """\
_name = os.environ.pop("CNI_FAN_PLUGIN", "") or os.path.basename(sys.argv[0])
if _name == "fan":
    from cni_fan.entry import fan_main as _main
elif _name == "fan-ipam":
    from cni_fan.entry import fan_ipam_main as _main
else:
    from cni_fan.cli import main as _main
_main()
"""


def _write_atomically(dest: Path, data: bytes | None = None, copy_from: Path | None = None) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            tmp.write_bytes(data or b"")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _symlink_atomically(dest: Path, target: str) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def _launcher_head() -> str:
    """A launcher's first lines: Python without `site`, exactly the package's directories on the path."""
    package_parent = str(Path(cni_fan.__file__).resolve().parent.parent)
    paths = [package_parent, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths = list(dict.fromkeys(paths))
    return (f"#!{sys.executable} -S\n"
            f"# cni-fan {cni_fan.__version__} launcher, written by `cni-fan install`\n"
            f"import os\nimport sys\nsys.path[:0] = {paths!r}\n")


def launcher(function: str) -> bytes:
    return (_launcher_head() + f"from cni_fan.entry import {function}\n{function}()\n").encode()


def dispatching_launcher() -> bytes:
    """The venv's `cni-fan`: `fan`, `fan-ipam` or the CLI, by the name fan-client gives it.

    A `#!` script never sees the argv[0] it was started with (the kernel
    puts the script's path there), so the client also names the plugin in
    CNI_FAN_PLUGIN; removed before the call reads its environment.
    """
    return (_launcher_head() + DISPATCH).encode()


def compiled_client() -> Path | None:
    """The native client tools/setup.sh compiled for this source tree (native/build.sh), or None."""
    path = Path(cni_fan.__file__).resolve().parent / "native" / CLIENT
    return path if path.is_file() and os.access(path, os.X_OK) else None


def source_build_id(repo: Path) -> str:
    """What `make build` writes into dist/cni-fan/BUILD-ID: a hash of the
    package's sources, the native client's, build.spec and pyproject.toml
    (the tests rebuild the bundle when it differs)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted((repo / "cni_fan").rglob("*.py")) + sorted((repo / "native").glob("*.[ch]"))
    files += sorted((repo / "native").glob("*.sh")) + [repo / "build.spec", repo / "pyproject.toml"]
    for path in files:
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def bundle_root() -> Path | None:
    """The directory bundle this process runs from, or None (venv, onefile)."""
    if not getattr(sys, "frozen", False):
        return None
    root = Path(sys.executable).resolve().parent
    return root if (root / "_internal").is_dir() else None


def bundle_id(root: Path) -> str:
    try:
        build = (root / "BUILD-ID").read_text().strip()
    except OSError:
        build = ""
    return f"{cni_fan.__version__}-{build}" if build else cni_fan.__version__


def _link_target(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def _install_directory(dest_dir: Path, name: str, fill, program: str) -> list[Path]:
    """`<dest_dir>/.cni-fan/<name>/`, made by `fill(tmp_dir)` unless it is there; then the links.

    `fan` and `fan-ipam` become relative symlinks to `program` in it (the
    name itself when `program` is empty). The directory the links pointed
    to before stays, older ones go.
    """
    bundles = dest_dir / BUNDLES
    bundles.mkdir(mode=0o755, exist_ok=True)
    target = bundles / name
    if not (target / PROGRAM).exists():
        tmp = bundles / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
            if target.exists():  # an incomplete copy someone left: replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    keep = {name}
    written = []
    for plugin in PLUGINS:
        link = dest_dir / plugin
        before = _link_target(link)
        if before and before.startswith(f"{BUNDLES}/"):
            keep.add(before.split("/")[1])
        _symlink_atomically(link, f"{BUNDLES}/{name}/{program or plugin}")
        written.append(link)
    for old in bundles.iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return written


def _install_bundle(root: Path, dest_dir: Path) -> list[Path]:
    program = CLIENT if (root / CLIENT).is_file() else ""
    return _install_directory(dest_dir, bundle_id(root), lambda tmp: shutil.copytree(root, tmp, symlinks=True),
                              program)


def _install_venv(client: Path, dest_dir: Path) -> list[Path]:
    """The venv layout: the compiled client and the dispatching launcher, in a directory named after both."""
    import hashlib

    launcher_text = dispatching_launcher()
    client_bytes = client.read_bytes()
    name = "venv-" + hashlib.sha256(launcher_text + b"\0" + client_bytes).hexdigest()[:16]

    def fill(tmp: Path) -> None:
        tmp.mkdir(mode=0o755)
        for file, data in ((CLIENT, client_bytes), (PROGRAM, launcher_text)):
            (tmp / file).write_bytes(data)
            os.chmod(tmp / file, 0o755)

    return _install_directory(dest_dir, name, fill, CLIENT)


def install_plugins(bin_dir: str) -> list[Path]:
    dest_dir = Path(bin_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = bundle_root()
    if root is not None:
        return _install_bundle(root, dest_dir)
    client = None if getattr(sys, "frozen", False) else compiled_client()
    if client is not None:
        return _install_venv(client, dest_dir)
    print("cni-fan install: no compiled native client (native/build.sh, run by tools/setup.sh): "
          "fan and fan-ipam are Python programs, which start slower", file=sys.stderr)
    written = []
    for name, function in PLUGINS.items():
        dest = dest_dir / name
        if getattr(sys, "frozen", False):
            _write_atomically(dest, copy_from=Path(sys.executable))
        else:
            _write_atomically(dest, data=launcher(function))
        written.append(dest)
    return written
