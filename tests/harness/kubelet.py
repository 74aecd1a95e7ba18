"""A node as a kubelet runs a DaemonSet's containers on it, for the deploy tests.

The node is a network namespace with `u0` (its peer `u1` stays inside, no
address until a test gives it one). Each container runs in a mount
namespace of its own with a read-only /proc/sys (as runc makes it) and only
the capabilities the YAML grants (setpriv); each hostPath is a directory
under the lab's `root`, each mount path rewritten to it, a ConfigMap's
keys written where its volume would be. The image's files are
deploy/Containerfile's, replayed by harness/image.py.
"""
from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

from harness import image
from harness.system import REPO, capped_argv

PREFIX = f"tdep-{secrets.token_hex(3)}-"


class LabNode:
    """A node: a network namespace with `u0` (its peer `u1` stays inside).
    Host paths live under `root`; containers run with `run_container`."""

    def __init__(self, tmp: Path, bundle: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "host"
        self.bundle = bundle
        self.prefix = PREFIX
        self.netns = f"{PREFIX}node"
        self.path = f"/var/run/netns/{self.netns}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.add_netns(self.netns)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "u0", "type", "veth", "peer", "name", "u1")
        self.ip("link", "set", "u0", "up")
        self.ip("link", "set", "u1", "up")

    def add_netns(self, name: str) -> str:
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        return f"/var/run/netns/{name}"

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.netns, *args], capture_output=True, text=True, check=check)

    def host(self, path: str) -> Path:
        """Where a host path of the manifests is in this lab."""
        return self.root / path.lstrip("/")

    def env(self) -> dict[str, str]:
        """The image's environment: its files as deploy/Containerfile places
        them (harness/image.py), its PATH first, the host's tools after."""
        root = self.tmp / "image"
        if not root.exists():
            image.assemble(root, {source: REPO / source for source, _ in image.copies()})
        return image.image_env(root)

    def container_argv(self, ds: dict, c: dict, files: dict[str, dict[str, str]]) -> tuple[list[str], dict]:
        """argv and env that run container `c` of `ds` here, as a kubelet would.

        `files`: ConfigMap name -> {key: content} (what its volume shows)."""
        volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
        rewrite: dict[str, str] = {}
        setup = ["set -e"]
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "hostPath" in v:
                host_path = v["hostPath"]["path"]
                if host_path == "/proc/sys/net":
                    # The node's own net sysctls, writable, beside the
                    # read-only /proc/sys (bound before /proc/sys goes read-only).
                    target = self.tmp / "proc-sys" / "net"
                    target.mkdir(parents=True, exist_ok=True)
                    setup.append(f"mount --bind /proc/sys/net {shlex.quote(str(target))}")
                    # CNI_FAN_PROC_SYS names the directory above the mount.
                    rewrite[str(Path(m["mountPath"]).parent)] = str(target.parent)
                else:
                    target = self.host(host_path)
                    if v["hostPath"]["type"] == "FileOrCreate":
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.touch()
                    else:
                        target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in v:
                target = self.tmp / "configmap" / v["configMap"]["name"]
                target.mkdir(parents=True, exist_ok=True)
                for key, content in files[v["configMap"]["name"]].items():
                    (target / key).write_text(content)
            elif "emptyDir" in v:
                target = self.tmp / "emptydir" / f"{c['name']}-{v['name']}"
                target.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"volume kind of {v} is not emulated")
            rewrite[m["mountPath"]] = str(target)

        # One pass, longest mount path first; a path ends at "/" or at a
        # character no path name here has.
        pattern = re.compile("|".join(re.escape(p) for p in sorted(rewrite, key=len, reverse=True))
                             + r"(?![\w.-])")

        def fix(text: str) -> str:
            return pattern.sub(lambda m: rewrite[m.group(0)], text)

        argv = [fix(a) for a in c["command"] + c.get("args", [])]
        env = {**self.env(), **{e["name"]: fix(e["value"]) for e in c.get("env", [])}}
        caps = c["securityContext"]["capabilities"].get("add", [])
        setup += ["mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys",
                  f'exec {shlex.join(capped_argv(caps))} "$@"']
        return (["nsenter", f"--net={self.path}", "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", "\n".join(setup), "container", *argv], env)

    def start(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def in_node(self, *argv, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={self.path}", *map(str, argv)], capture_output=True,
                              timeout=60, **kwargs)

    def http_get(self, host: str, port: int, path: str) -> int | None:
        """Status of GET http://host:port/path from the node's namespace (the kubelet's probe)."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=2); print(r.status)\n"
                "except urllib.error.HTTPError as e: print(e.code)\n"
                "except OSError: print('none')\n")
        out = self.in_node(sys.executable, "-c", code, f"http://{host}:{port}{path}", text=True)
        return None if out.stdout.strip() in ("none", "") else int(out.stdout.strip())

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
