"""The two thin clients of `fan`, behind one call, so one set of tests holds for both.

`PythonClient` is cni_fan.entry.call_server in this process; `NativeClient`
runs native/fan-client (compiled by native/build.sh into a directory of its
own) as a runtime does, next to a stand-in `cni-fan` that reports what a
local run would have been given (argv[0], environment, stdin, descriptors)
instead of running the call. Both answer `call(...)` with (stdout, exit
code) from the server, or None where the call runs locally.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from cni_fan import entry
from harness.system import REPO

# What the stand-in `cni-fan` prints instead of running the call.
LOCAL_MARK = b"LOCAL-RUN "
STAND_IN = """#!{python} -S
import hashlib, json, os, sys
data = sys.stdin.buffer.read()
report = {{"argv0": sys.argv[0], "plugin": os.environ.get("CNI_FAN_PLUGIN"),
          "agent_socket": os.environ.get("CNI_FAN_AGENT_SOCKET"), "stdin_sha256": hashlib.sha256(data).hexdigest(),
          "stdin_len": len(data), "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
          "env": {{k: v for k, v in os.environ.items()}}}}
sys.stdout.buffer.write(b"LOCAL-RUN " + json.dumps(report).encode() + b"\\n")
"""


def compile_client(dest_dir: Path) -> Path:
    """native/fan-client.c compiled into `dest_dir`/fan-client (with native/build.sh)."""
    client = dest_dir / "fan-client"
    subprocess.run([str(REPO / "native" / "build.sh"), str(client)], check=True, timeout=120)
    return client


def write_stand_in(dest_dir: Path) -> Path:
    program = dest_dir / "cni-fan"
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    return program


class PythonClient:
    name = "python"

    def call(self, path: str, plugin: str, environ: dict[str, str], stdin: bytes) -> tuple[bytes, int] | None:
        return entry.call_server(path, plugin, environ, stdin)

    def sent_env(self, environ: dict[str, str], path: str) -> dict[str, str]:
        """The environment the server should receive for `call(path, ..., environ, ...)`."""
        return {k: v for k, v in environ.items() if k.startswith("CNI_")}


class NativeClient:
    """fan-client in `directory`, beside the stand-in `cni-fan`. The socket path goes in
    CNI_FAN_AGENT_SOCKET (so the server sees that variable too); stderr is this process's."""

    name = "native"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.client = directory / "fan-client"
        self.last_local: dict | None = None

    def run(self, plugin: str, environ: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess:
        return subprocess.run([plugin], executable=self.client, env=environ, input=stdin, stdout=subprocess.PIPE,
                              timeout=60)

    def call(self, path: str, plugin: str, environ: dict[str, str], stdin: bytes) -> tuple[bytes, int] | None:
        proc = self.run(plugin, {**environ, "CNI_FAN_AGENT_SOCKET": path}, stdin)
        self.last_local = local_report(proc.stdout)
        if self.last_local is not None:
            assert proc.returncode == 0, proc
            assert self.last_local["stdin_sha256"] == hashlib.sha256(stdin).hexdigest(), "stdin not handed on intact"
            return None
        return proc.stdout, proc.returncode

    def sent_env(self, environ: dict[str, str], path: str) -> dict[str, str]:
        return {k: v for k, v in {**environ, "CNI_FAN_AGENT_SOCKET": path}.items() if k.startswith("CNI_")}


def local_report(stdout: bytes) -> dict | None:
    """What the stand-in `cni-fan` was given, if it ran (None: the answer came from elsewhere)."""
    if not stdout.startswith(LOCAL_MARK):
        return None
    return json.loads(stdout[len(LOCAL_MARK):])


def native_dir(tmp_path_factory) -> Path:
    """A directory with the compiled client and the stand-in (for a session fixture)."""
    directory = tmp_path_factory.mktemp("native-client")
    compile_client(directory)
    write_stand_in(directory)
    os.chmod(directory, 0o755)
    return directory
