"""One single-stream TCP measurement with iperf3 between two namespaces."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchError, Lab, inside_netns
from bench.shell import ENV, json_of

IPERF_PORT = 5201
IPERF_ATTEMPTS = 3
SERVER_READY_TIMEOUT = 10.0


def _log(msg: str) -> None:
    print(f"throughput: {msg}", file=sys.stderr, flush=True)


def _listening(pid: int, port: int) -> bool:
    for table in ("tcp6", "tcp"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rx_bytes(ns: str, dev: str) -> int:
    links = json_of("ip", ns, "-s", "link", "show", "dev", dev)
    return int(links[0]["stats64"]["rx"]["bytes"]) if links else 0


def iperf_once(lab: Lab, src_ns: str, dst_ns: str, address: str, seconds: int) -> dict:
    """One single-stream TCP run src -> address (in dst_ns), with a one-off server that is always stopped."""
    last = ""
    for _attempt in range(IPERF_ATTEMPTS):
        with inside_netns(dst_ns):
            server = lab.spawn(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        try:
            deadline = time.monotonic() + SERVER_READY_TIMEOUT
            while not _listening(server.pid, IPERF_PORT):
                if server.poll() is not None:
                    raise BenchError(f"iperf3 server in {dst_ns} exited: {server.stderr.read().decode()[-300:]}")
                if time.monotonic() > deadline:
                    raise BenchError(f"iperf3 server in {dst_ns} not listening after {SERVER_READY_TIMEOUT:.0f} s")
                time.sleep(0.02)
            with inside_netns(src_ns):
                out = subprocess.run(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                                     capture_output=True, text=True, timeout=seconds + 60, env=ENV,
                                     stdin=subprocess.DEVNULL)
            try:
                data = json.loads(out.stdout or "{}")
            except ValueError:
                data = {"error": f"not JSON: {out.stdout[:200]!r}"}
            if out.returncode == 0 and "error" not in data:
                end = data["end"]
                received = end["sum_received"]
                cpu = end.get("cpu_utilization_percent", {})
                gbytes = received["bytes"] / 1e9
                cpu_s = (cpu.get("host_total", 0.0) + cpu.get("remote_total", 0.0)) / 100.0 * received["seconds"]
                return {"gbps": round(received["bits_per_second"] / 1e9, 3),
                        "bytes": received["bytes"], "seconds": round(received["seconds"], 3),
                        "retransmits": end.get("sum_sent", {}).get("retransmits", 0),
                        "cpu_sender_pct": round(cpu.get("host_total", 0.0), 1),
                        "cpu_receiver_pct": round(cpu.get("remote_total", 0.0), 1),
                        "cpu_s_per_gb": round(cpu_s / gbytes, 4) if gbytes > 0 else None}
            last = str(data.get("error") or out.stderr.strip() or f"exit {out.returncode}")[-300:]
            _log(f"iperf3 {src_ns} -> {address} failed ({last}); retrying")
        finally:
            _stop(server)
            if server.stderr:
                server.stderr.close()
            with contextlib.suppress(ValueError):
                lab.procs.remove(server)
    raise BenchError(f"iperf3 {src_ns} -> {address} failed {IPERF_ATTEMPTS} times: {last}")
