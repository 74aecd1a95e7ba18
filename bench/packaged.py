"""Per-call cost of the packaged plugins against the venv launcher (issue 4).

    python -m bench.packaged [--onefile PATH] [--calls N] [--pods N] [--json FILE]

Run as root from the repository, after `make build` (dist/cni-fan/). Two parts:

1. `fan` VERSION, the smallest call, per layout: the venv launcher
   (`.venv/bin/cni-fan install`), the directory bundle installed the way
   the DaemonSet installs it (`dist/cni-fan/cni-fan install`: symlinks into
   a copy of the bundle), and, with --onefile, a onefile build
   (`CNI_FAN_LAYOUT=onefile pyinstaller build.spec --distpath ...`) and,
   with --onedir-pyz, the directory bundle with its modules in PYZ archive
   (`CNI_FAN_LAYOUT=onedir-pyz`). Each
   twice: standalone (CNI_FAN_AGENT_SOCKET=none, the call runs in the `fan`
   process) and through a `cni-fan serve` of the same layout. The
   layouts are interleaved call by call, so machine noise hits them alike.
   A latency is the wall time of one process, spawn to exit.
2. ADD and DEL through cnitool in a node namespace (an underlay veth with
   198.18.1.10/16, overlay 241.0.0.0/8) for the venv launcher and the
   bundle, with and without the plugin server; each pod ADD then DEL,
   the variants interleaved.

Everything it creates (namespaces `pkb-<random>-*`, servers, temporary
directories) is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_CNI_FAN = REPO / ".venv" / "bin" / "cni-fan"
BUNDLE = REPO / "dist" / "cni-fan"
CNITOOL = REPO / ".cache" / "bin" / "cnitool"
PREFIX = f"pkb-{secrets.token_hex(3)}-"
CLONE_NEWNET = 0x40000000
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def log(msg: str) -> None:
    print(f"packaged: {msg}", file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"n": len(v), "median_ms": round(statistics.median(v), 2),
            "p90_ms": round(v[min(len(v) - 1, int(0.9 * len(v)))], 2), "min_ms": round(v[0], 2)}


def timed(argv: list[str], env: dict, stdin: bytes = b"", cpu: list | None = None
          ) -> tuple[float, subprocess.CompletedProcess]:
    """Wall ms of one process; its CPU ms (user + system, children
    included) appended to `cpu` when given: less disturbed by a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    wall = (time.perf_counter() - started) * 1000
    if cpu is not None:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return wall, proc


def current_bundle(given: Path | None, log) -> Path | None:
    """The bundle to measure: the one given, else dist/cni-fan/ if its BUILD-ID matches the sources."""
    from bench.common import BenchError
    from cni_fan.install import source_build_id

    if given is not None:
        if not (given / "cni-fan").exists():
            raise BenchError(f"{given}/cni-fan is missing: run `make build`")
        return given
    try:
        built = (BUNDLE / "BUILD-ID").read_text().strip()
    except OSError:
        built = ""
    if built != source_build_id(REPO) or not (BUNDLE / "cni-fan").exists():
        log(f"no bundle built from these sources in {BUNDLE}: bundle variants left out (`make build` first)")
        return None
    return BUNDLE


def thin_client(bin_dir: Path, standalone: bool) -> str:
    """What `fan` in `bin_dir` is (what `cni-fan install` chose), and so how a call through it starts."""
    if not os.path.realpath(bin_dir / "fan").endswith("/fan-client"):
        return "Python client (cni_fan/entry.py)" + (", then the call in the same process" if standalone else "")
    return "native client (fan-client)" + (", which execs the Python cni-fan beside it" if standalone else "")


class Layout:
    """One way of shipping the plugins: a CNI bin dir and a `cni-fan` for the server."""

    def __init__(self, name: str, cni_fan: Path, tmp: Path) -> None:
        self.name = name
        self.cni_fan = cni_fan
        self.bin_dir = tmp / name / "bin"
        self.socket = tmp / name / "plugin.sock"
        self.server: subprocess.Popen | None = None
        proc = subprocess.run([str(cni_fan), "install", "--bin-dir", str(self.bin_dir)], env=ENV,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{cni_fan} install failed: {proc.stderr}")

    def start_server(self) -> None:
        self.server = subprocess.Popen([str(self.cni_fan), "serve", "--socket", str(self.socket)], env=ENV,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: cni-fan serve did not start")
            time.sleep(0.05)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None


def version_calls(layouts: list[Layout], calls: int) -> dict:
    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    modes = {"standalone": lambda l: "none", "server": lambda l: str(l.socket)}
    for layout in layouts:
        for mode, sock in modes.items():
            env = {**ENV, "CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": sock(layout)}
            ms, proc = timed([str(layout.bin_dir / "fan")], env, b'{"cniVersion": "1.0.0"}')
            if proc.returncode != 0 or b"supportedVersions" not in proc.stdout:
                raise SystemExit(f"{layout.name} {mode}: VERSION failed: {proc.stdout!r} {proc.stderr[-500:]!r}")
    for i in range(calls + 3):
        for layout in layouts:
            for mode, sock in modes.items():
                env = {**ENV, "CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": sock(layout)}
                cpu: list[float] = []
                ms, proc = timed([str(layout.bin_dir / "fan")], env, b'{"cniVersion": "1.0.0"}', cpu)
                if proc.returncode != 0:
                    raise SystemExit(f"{layout.name} {mode}: VERSION failed: {proc.stderr[-500:]!r}")
                if i >= 3:  # warm-up: page cache, the server's first fork
                    samples.setdefault(f"{layout.name} {mode}", []).append(ms)
                    cpu_samples.setdefault(f"{layout.name} {mode}", []).extend(cpu)
    return {k: {**stats(v), "cpu_median_ms": round(statistics.median(cpu_samples[k]), 2),
                "cpu_min_ms": round(min(cpu_samples[k]), 2)} for k, v in samples.items()}


# -- ADD/DEL through cnitool ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def add_del_calls(layouts: list[Layout], pods: int, tmp: Path) -> dict:
    made: list[str] = []

    def netns(kind: str) -> str:
        name = f"{PREFIX}{kind}"
        ip("netns", "add", name)
        made.append(name)
        return name

    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    samples: dict[str, list[float]] = {}
    try:
        node = netns("node")
        for args in (["link", "set", "lo", "up"], ["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                     ["addr", "add", "198.18.1.10/16", "dev", "u0"], ["link", "set", "u0", "up"],
                     ["link", "set", "u1", "up"]):
            ip("-n", node, *args)
        variants = {}
        for layout in layouts:
            for mode in ("standalone", "server"):
                key = f"{layout.name} {mode}"
                conf_dir = tmp / "conf" / key.replace(" ", "-")
                conf_dir.mkdir(parents=True)
                sock = str(layout.socket) if mode == "server" else str(tmp / "nobody.sock")
                plugin = {"type": "fan", "overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16",
                          "dataDir": str(tmp / "data" / key.replace(" ", "-")), "agentSocket": sock}
                (conf_dir / "10-fan.conflist").write_text(json.dumps(
                    {"cniVersion": "1.0.0", "name": f"{PREFIX}net", "plugins": [plugin]}))
                variants[key] = {**ENV, "NETCONFPATH": str(conf_dir), "CNI_PATH": str(layout.bin_dir)}
        pod_names = {key: [netns(f"p{v}-{i}") for i in range(pods + 2)] for v, key in enumerate(variants)}
        setns(f"/var/run/netns/{node}")
        for layout in layouts:  # the servers run in the node namespace, as the agent's does
            layout.start_server()
        for i in range(pods + 2):
            order = list(variants)
            order = order[i % len(order):] + order[:i % len(order)]
            for verb in ("add", "del"):
                for key in order:
                    pod = f"/var/run/netns/{pod_names[key][i]}"
                    ms, proc = timed([str(CNITOOL), verb, f"{PREFIX}net", pod], variants[key])
                    if proc.returncode != 0:
                        raise SystemExit(f"{key} {verb} failed: {proc.stdout[-300:]!r} {proc.stderr[-500:]!r}")
                    if i >= 2:  # warm-up: the first call creates the bridge
                        samples.setdefault(f"{key} {verb.upper()}", []).append(ms)
    finally:
        for layout in layouts:
            layout.stop_server()
        if _libc.setns(own, CLONE_NEWNET) != 0:
            log("could not return to the original namespace")
        os.close(own)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return {k: stats(v) for k, v in samples.items()}


def table(rows: dict, title: str) -> str:
    cpu = all("cpu_median_ms" in s for s in rows.values())
    head = "| variant | median ms | p90 ms | min ms |" + (" CPU median ms | CPU min ms |" if cpu else "") + " n |"
    out = [f"### {title}", "", head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for key, s in rows.items():
        extra = f" {s['cpu_median_ms']:.1f} | {s['cpu_min_ms']:.1f} |" if cpu else ""
        out.append(f"| {key} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['min_ms']:.1f} |{extra} {s['n']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packaged", description=__doc__.split("\n")[0])
    p.add_argument("--onefile", type=Path, help="a onefile build of cni-fan to measure too (VERSION part)")
    p.add_argument("--onedir-pyz", type=Path, help="cni-fan of a CNI_FAN_LAYOUT=onedir-pyz build (VERSION part)")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help=f"the directory bundle (default {BUNDLE})")
    p.add_argument("--calls", type=int, default=100, help="VERSION calls per layout and mode (default 100)")
    p.add_argument("--pods", type=int, default=30, help="ADD+DEL per variant (default 30; 0 skips the part)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces)")
    if not (args.bundle / "cni-fan").exists():
        raise SystemExit(f"{args.bundle}/cni-fan is missing: run `make build`")
    tmp = Path(tempfile.mkdtemp(prefix="cni-fan-packaged-"))
    layouts: list[Layout] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        layouts = [Layout("venv", VENV_CNI_FAN, tmp), Layout("onedir", args.bundle / "cni-fan", tmp)]
        if args.onedir_pyz:
            layouts.append(Layout("onedir-pyz", args.onedir_pyz, tmp))
        if args.onefile:
            layouts.append(Layout("onefile", args.onefile, tmp))
        for layout in layouts:
            layout.start_server()
        log(f"VERSION: {args.calls} calls per layout and mode")
        version = version_calls(layouts, args.calls)
        for layout in layouts:
            layout.stop_server()
        result = {"version": version}
        print(table(version, "`fan` VERSION, per call"))
        if args.pods > 0:
            log(f"ADD/DEL through cnitool: {args.pods} pods per variant")
            result["add_del"] = add_del_calls([l for l in layouts if l.name in ("venv", "onedir")], args.pods, tmp)
            print(table(result["add_del"], "ADD and DEL through cnitool, per call"))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        for layout in layouts:
            layout.stop_server()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
