"""The cni-fan image as deploy/Containerfile makes it, without a container
engine: its instructions read from the file, the parts that place files
(COPY of the build output, `ln -s` in RUN) replayed into a directory.

The deploy tests run the DaemonSet's commands with this directory's
/usr/local/bin first on the PATH, so what they run is what the
Containerfile builds, not a copy of it written again in a test.
"""
from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from harness.system import REPO

CONTAINERFILE = REPO / "deploy" / "Containerfile"
# Debian's default PATH in a container (the base image sets no other).
IMAGE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def instructions(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def run_commands(path: Path = CONTAINERFILE) -> list[list[str]]:
    """Every command of every RUN, split at `&&`, as words without the leading
    VAR=value assignments (redirections left in)."""
    out = []
    for keyword, args in instructions(path):
        if keyword != "RUN":
            continue
        for part in args.split("&&"):
            words = shlex.split(part)
            while words and "=" in words[0]:
                words.pop(0)
            if words:
                out.append(words)
    return out


def installed_packages(path: Path = CONTAINERFILE) -> set[str]:
    """The packages `apt-get install` puts into the image."""
    return {w for words in run_commands(path) if words[:2] == ["apt-get", "install"]
            for w in words[2:] if not w.startswith("-")}


def copies(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """(source in the build context, destination in the image) of each COPY."""
    return [tuple(args.split()) for keyword, args in instructions(path) if keyword == "COPY"]  # type: ignore[misc]


def assemble(root: Path, context: dict[str, Path], path: Path = CONTAINERFILE) -> Path:
    """Replay the Containerfile's COPYs (source -> `context[source]`) and its
    `ln -s` commands into `root`; absolute link targets point into `root`."""
    for source, dest in copies(path):
        shutil.copytree(context[source], root / dest.lstrip("/"), symlinks=True)
    for words in run_commands(path):
        if words[:2] == ["ln", "-s"]:
            target, link = words[2], root / words[3].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(root / target.lstrip("/") if target.startswith("/") else target, link)
    return root


def image_env(root: Path, host_path: str = "/usr/sbin:/usr/bin:/sbin:/bin") -> dict[str, str]:
    """The image's PATH rooted at `root`, then the host's (for the base image's
    own tools, which the lab takes from the host)."""
    return {"PATH": ":".join([*(str(root / p.lstrip("/")) for p in IMAGE_PATH), host_path]), "LANG": "C.UTF-8"}


def resolve(command: str, root: Path) -> Path | None:
    """Where the image's PATH finds `command`, or None."""
    for directory in IMAGE_PATH:
        candidate = root / directory.lstrip("/") / command
        if os.path.lexists(candidate):
            return candidate
    return None
