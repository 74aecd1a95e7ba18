"""The real node agent in each node namespace: start it, ask it, wait for it.

`start_agent` runs `cni-fan node run` in the node's namespace (its own
session, output to the node's agent.log, its pid in agent.pid, which
`lab down` trusts only while the command line still names the node's
conflist). Readiness is the agent's own /healthz; when an agent is not up
in time, the error shows `cni-fan node show` and the end of its log.
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cni_fan.lab import netns
from cni_fan.lab.errors import LabError
from cni_fan.lab.processes import cni_fan_argv, in_netns, lab_env
from cni_fan.lab.topology import METRICS_PORT, LabSpec, Node

AGENT_TIMEOUT = 60.0
ROUTES_AGENT_TIMEOUT = 300.0  # `fanmap: routes` puts a table for every possible host in the kernel first
NODE_DOWN_TIMEOUT = 30.0
Say = Callable[[str], None]


@dataclass
class Agent:
    node: Node
    proc: subprocess.Popen | None = None


def agent_timeout(spec: LabSpec) -> float:
    """How long `lab up` waits for the agents by default."""
    return ROUTES_AGENT_TIMEOUT if spec.fanmap == "routes" else AGENT_TIMEOUT


def start_agent(node: Node) -> Agent:
    """`cni-fan node run` in the node's namespace; its pid goes to the node's pid file."""
    log = open(node.log_path, "ab")
    try:
        proc = subprocess.Popen(in_netns(node.netns, [*cni_fan_argv(), "node", "run", "--conflist", node.conflist_path]),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=lab_env(),
                                start_new_session=True, close_fds=True)
    finally:
        log.close()
    Path(node.pid_path).write_text(f"{proc.pid}\n")
    return Agent(node, proc)


def healthz(node: Node, timeout: float = 3.0) -> tuple[bool, str]:
    """GET /healthz on the node's metrics port, from inside the node."""
    try:
        with netns.entered(node.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", METRICS_PORT))
            sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except (OSError, netns.LabNetError) as exc:
        return False, f"healthz: {exc}"
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return status.split(" ")[1:2] == ["200"], status


def node_show(node: Node, timeout: float = 20.0) -> dict:
    """`cni-fan node show --json` inside the node; {"error": ...} if it fails."""
    try:
        proc = subprocess.run(in_netns(node.netns, [*cni_fan_argv(), "node", "show", "--conflist", node.conflist_path,
                                                    "--json"]),
                              capture_output=True, text=True, timeout=timeout, env=lab_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"`cni-fan node show` did not answer within {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")[-500:]}
    try:
        shown = json.loads(proc.stdout)
    except ValueError:
        return {"error": f"not JSON: {proc.stdout[:200]!r}"}
    return shown if isinstance(shown, dict) else {"error": f"not a JSON object: {proc.stdout[:200]!r}"}


def node_down(node_ns: str, conflist: str, say: Say) -> None:
    """`cni-fan node down` in a node namespace: the agent's own clean-up of what
    lives outside the namespace (pins, say). A failure is said, not raised."""
    try:
        proc = subprocess.run(in_netns(node_ns, [*cni_fan_argv(), "node", "down", "--conflist", conflist]),
                              capture_output=True, text=True, timeout=NODE_DOWN_TIMEOUT, env=lab_env(),
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            say(f"  note: `cni-fan node down` in {node_ns} exited {proc.returncode}: "
                f"{(proc.stderr.strip() or proc.stdout.strip())[-300:]}")
    except subprocess.TimeoutExpired:
        say(f"  note: `cni-fan node down` in {node_ns} took over {NODE_DOWN_TIMEOUT:.0f} s; going on")


def wait_for_agents(agents: list[Agent], timeout: float, say: Say) -> None:
    """Until every agent answers /healthz with 200; a LabError when one exits
    first or `timeout` passes (with what `node show` and its log say)."""
    deadline = time.monotonic() + timeout
    pending = {a.node.short: a for a in agents}
    last: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(agents))) as pool:
        while pending:
            for name, agent in list(pending.items()):
                code = agent.proc.poll() if agent.proc else None
                if code is not None:
                    raise LabError(f"the node agent of {agent.node.netns} exited with code {code} before it was up; "
                                   f"its log ({agent.node.log_path}) ends with:\n{log_tail(agent.node.log_path)}")
            results = dict(zip(pending, pool.map(healthz, [a.node for a in pending.values()])))
            for name, (ok, status) in results.items():
                last[name] = status
                if ok:
                    say(f"  agent up on {pending[name].node.netns}")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise LabError(f"node agent not up within {timeout:.0f} s (no 200 from "
                               f"http://127.0.0.1:{METRICS_PORT}/healthz inside the node):\n"
                               + "\n".join(_not_up(agent, last.get(name)) for name, agent in pending.items()))
            if pending:
                time.sleep(0.2)


def _not_up(agent: Agent, status: str | None) -> str:
    """What an agent that is not up says about itself: healthz, node show, its log."""
    shown = node_show(agent.node)
    summary = (f"up={shown.get('up')}; problems: {'; '.join(map(str, shown['problems']))}"
               if isinstance(shown.get("problems"), list) else json.dumps(shown)[:300])
    return (f"{agent.node.netns}: {status}; node show: {summary[:600]}\n"
            f"  log ({agent.node.log_path}):\n" +
            "\n".join("    " + line for line in log_tail(agent.node.log_path, 15).splitlines()))


def log_tail(path: str, lines: int = 12, width: int = 300) -> str:
    """The end of a log, readable in an error message: long lines cut,
    runs of the same message (timestamps aside) shown once with a count."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    out: list[list] = []  # [line, count, line without its timestamp]
    for line in text.splitlines()[-200:]:
        key = line.split(" ", 1)[1] if line.startswith("ts=") and " " in line else line
        if out and out[-1][2] == key:
            out[-1][1] += 1
        else:
            out.append([line, 1, key])
    shown = []
    for line, count, _ in out[-lines:]:
        line = line if len(line) <= width else f"{line[:width // 2]} ... {line[-width // 2:]}"
        shown.append(line + (f"  (x{count})" if count > 1 else ""))
    return "\n".join(shown) or "(empty log)"
