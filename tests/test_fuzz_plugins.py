"""Hostile input to the real `fan` and `fan-ipam` executables (hypothesis).

Each example runs a launcher from .cache/cni-bin inside a node namespace
made for this module, standalone (`CNI_FAN_AGENT_SOCKET=none`) or through
a running `cni-fan serve` in that namespace, with a config, environment,
CNI_ARGS, prevResult and container ID built from valid parts and hostile
ones (IPv4-only and dual-stack configs, IPv6 values and requests): wrong
types and values, unknown keys, path tricks (`../`), overlong names,
control characters, bytes that are not UTF-8, JSON that is not JSON
or nests 100,000 deep, 1 MiB of stdin. (A NUL byte cannot be in a real
environment variable, so it is not passed; in the config it is.)

Checked for every call:

- the answer is protocol: exit 0 with a result (or nothing, for DEL, CHECK,
  GC, STATUS), or a non-zero exit with one CNI error object on stdout whose
  code is one the spec or docs/configuration.md lists, never 100
  ("internal error": an exception nobody meant);
- when exactly one thing is wrong, the code is the one for that thing;
- no Python traceback on stdout or stderr;
- nothing changes on the node: after a successful ADD is undone with DEL,
  the node's and the pod's interfaces are as before, no file appears
  outside the state directory, state files are readable by their owner
  only (directory 0700, files 0600).

Size: CNI_FAN_FUZZ_EXAMPLES examples per plugin and mode (default 75, so
300 real executions, plus a DEL after each successful ADD, about a minute);
`CNI_FAN_FUZZ_EXAMPLES=1000` runs 4,000.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_fan.cni.ifname import is_ifname
from cni_fan.cni.request import CONTAINER_ID_RE, MAX_CONTAINER_ID
from cni_fan.net import rtnl, rtnl_links
from cni_fan.net.tombstone import TOMBSTONE_PREFIX
from harness.podlab import Lab, Pod
from harness.system import BASE_ENV, CNI_BIN, inside

EXAMPLES = int(os.environ.get("CNI_FAN_FUZZ_EXAMPLES", "75"))
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
VERBS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# Spec codes, ours from docs/configuration.md (100, "internal error", is a bug and fails the test).
KNOWN_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 101, 102, 103, 104, 105}
OK, INCOMPATIBLE, UNKNOWN_CONTAINER, BAD_ENV, DECODE, BAD_CONFIG = 0, 1, 3, 4, 6, 7
NET_PREFIX = "tpgfz"
TRACEBACK = "Traceback (most recent call last)"

pytestmark = pytest.mark.kernel


@dataclass
class Sandbox:
    lab: Lab
    pod: Pod
    root: Path
    data: Path
    cwd: Path
    regular_file: Path
    baseline_node: set[str] = field(default_factory=set)
    baseline_pod: set[str] = field(default_factory=set)


def _links(netns: str) -> set[tuple]:
    """(name, index, master) of every interface in the namespace (one netlink dump, no exec)."""
    with inside(f"/var/run/netns/{netns}"), rtnl.Rtnl() as sock:
        body = rtnl.IFINFOMSG.pack(0, 0, 0, 0, 0)
        return {(link.name, link.index, link.master) for link in
                (rtnl_links.link_info(data, start, end) for _kind, data, start, end in sock.dump(rtnl.RTM_GETLINK, body))}


def _settled_links(netns: str, timeout: float = 20.0) -> set[tuple]:
    """`_links` once the veths DELs cut off are deleted: a served DEL deletes its tombstone after
    answering (cni_fan/net/tombstone.py); one still there after `timeout` shows up as a leak."""
    deadline = time.monotonic() + timeout
    while True:
        links = _links(netns)
        if not any(name.startswith(TOMBSTONE_PREFIX) for name, _index, _master in links) \
                or time.monotonic() > deadline:
            return links
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("fuzz")
    lab = Lab(root / "lab")
    try:
        [pod] = lab.new_pods(1)
        box = Sandbox(lab=lab, pod=pod, root=root, data=root / "data", cwd=root / "cwd",
                      regular_file=root / "not-a-netns")
        box.cwd.mkdir()
        box.regular_file.write_text("x")
        # One ADD and DEL first: the bridge exists from then on, like on a node that had pods.
        conf = {"cniVersion": "1.0.0", "name": f"{NET_PREFIX}-setup", "type": "fan", "overlay": "241.0.0.0/8",
                "underlay": "198.18.0.0/16", "dataDir": str(box.data)}
        for verb in ("ADD", "DEL"):
            outcome = lab.call(verb, "setup", pod.path, conf)
            assert outcome.code == 0, outcome
        box.baseline_node, box.baseline_pod = _settled_links(lab.node), _links(pod.name)
        yield box
        assert lab.server_alive(), (lab.tmp / "serve.log").read_text()[-3000:]
    finally:
        lab.close()


# == what a call is made of ==========================================================================

@dataclass
class Call:
    plugin: str
    verb: bytes | str | None
    env: dict[str, Any]
    config: Any            # a dict, or raw bytes for stdin
    faults: list[str]
    expect: int | None      # the code when exactly one known fault is in it (0: success)

    def stdin(self) -> bytes:
        if isinstance(self.config, bytes):
            return self.config
        return json.dumps(self.config).encode()


def base_config(plugin: str, box: Sandbox, version: str, name: str, dual_stack: bool) -> dict:
    params = {"overlay": "241.0.0.0/8", "underlay": "198.18.0.0/16", "dataDir": str(box.data),
              **({"overlay6": "fd00:241::/48"} if dual_stack else {})}
    if plugin == "fan":
        return {"cniVersion": version, "name": name, "type": "fan", **params}
    return {"cniVersion": version, "name": name, "type": "bridge", "ipam": {"type": "fan-ipam", **params}}


json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80)
env_bytes = st.binary(max_size=80).map(lambda b: b.replace(b"\x00", b"\x01"))

HOSTILE_IDS = ["../../etc/passwd", "..", ".", "-rf", "a/b", "a\nb", "a b", "é", "x" * 257, "x" * 100_000,
               "ctr;IP=1.2.3.4", "$(reboot)", "`id`", "ctr\t", " ctr", "ctr\n"]
HOSTILE_IFNAMES = ["eth0/../x", "eth 0", "a" * 16, "", ".", "..", "eth:0", "eth0\n", "é", "lo", "x" * 5000]
HOSTILE_ARGS = ["novalue", "=x", "IP=garbage", "IP=241.1.10.1,241.1.10.2", "IP=::1", "IP=" + "9" * 400,
                "K8S_POD_NAME=x;;", "a=b;c", ";=;", "IP=241.1.10.0", "IP=10.0.0.1",
                # IPv6 (dual-stack configs take one per family, and they must pair)
                "IP=fd00:241:0:10a::5", "IP=fd00:241:0:10a::5,fd00:241:0:10a::6", "IP=241.1.10.5,fd00:241:0:10a::6",
                "IP=fd00:241:0:10a::1", "IP=fd00:241:0:10a::5%eth0", "IP=fd00:241:0:10a:::5", "IP=fd00:241:0:20a::5",
                "IP=::ffff:241.1.10.5", "IP=fd00:241:0:10a::5/129", "IP=FD00:241:0:10A::7"]
BAD_VALUES = {
    "overlay": ["241.0.0.0/33", "nonsense", "::/0", 5, "241.0.0.0/8/8", "", "241.0.0.0/30", "241.0.0.0/8\n"],
    "overlay6": ["fd00::/129", "fd00::1/48", "ff00::/48", "fe80::/48", "fd00::/48\n", " fd00::/48", 6, "::/0",
                 "241.0.0.0/8", "fd00::/121", "fd00:::/48", "fd00::/48/48", "::1/128", ""],
    "underlay": ["198.18.0.0/31", "x", [], "198.18.0.0/33", "198.18.0.0/16\n", " 198.18.0.0/16",
                 # IPv6 underlays: never with `overlay` (which every fuzzed config has), nor too many host bits
                 "fd00:198:18::/112", "fd00:198:18::/64", "fd00:198:18::/112\n", "::/0", "fe80::/112",
                 "ff02::/112", "fd00:198:18::/129"],
    "underlayInterface": ["../eth0", "a" * 16, "", "eth0\n", "u0 ", 7],
    "hostReserve": [-1, 0, 1 << 30, "1", 1.5, True],
    "dataDir": ["relative/path", "/tmp/../etc", "", "/..", 5, "/tmp/x/../../etc"],
    "encap": ["gre", "", 1],
    "mtu": [0, 575, 65536, "1500", -1, 1e309],
    "bridge": ["../../br", "a" * 16, "br 0", "", "br\n", "."],
    "vni": [0, 1 << 24, "1", -5],
    "vxlanPort": [0, 65536, "4789"],
    "ipMasq": ["yes", 1, None],
    "fanmap": ["ebpf", 3],
    "neighSuppress": ["true", 1, []],
    "antiSpoof": ["false", 0, {}],
    "logLevel": ["trace", "", 3, "BASIC_FORMAT"],
    "routes": ["0.0.0.0/0", [{"dst": 5}], [{"dst": "::/0", "gw": "241.1.10.1"}], [{"dst": "10.0.0.0/8", "gw": 5}],
               [None], {}, [{"dst": "fd00::/8\n"}], [{"dst": "0.0.0.0/0", "gw": "fd00:241:0:10a::1"}],
               [{"dst": "0.0.0.0/0\n"}], [{"dst": "0.0.0.0/0", "gw": "241.1.10.1 "}]],
    "dns": ["8.8.8.8", [1], 5],
    "metricsPort": [0, 70000, "9475"],
}


def _env_str(value: str | bytes) -> str:
    """What the plugin sees in os.environ for a value passed as str or bytes."""
    return value if isinstance(value, str) else os.fsdecode(value)


def valid_container_id(value: str | bytes) -> bool:
    text = _env_str(value)
    return bool(text) and len(text) <= MAX_CONTAINER_ID and CONTAINER_ID_RE.match(text) is not None


def valid_ifname(value: str | bytes) -> bool:
    text = _env_str(value)
    return is_ifname(text)


def _json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def calls(draw, box: Sandbox, plugin: str) -> Call:
    """A call with zero, one or several faults; `expect` is set when the outcome is predictable."""
    version = draw(st.sampled_from(VERSIONS))
    verb = draw(st.sampled_from(VERBS))
    name = f"{NET_PREFIX}-{draw(st.integers(0, 3))}"
    config: Any = base_config(plugin, box, version, name, dual_stack=draw(st.booleans()))
    params = config if plugin == "fan" else config["ipam"]
    ifname = draw(st.sampled_from(["eth0", "net1", "eth0"]))
    env: dict[str, Any] = dict(BASE_ENV, CNI_COMMAND=verb, CNI_CONTAINERID=f"fz{draw(st.integers(0, 10**6))}",
                               CNI_NETNS=box.pod.path, CNI_IFNAME=ifname, CNI_PATH=str(CNI_BIN))
    # field -> the code its fault alone gives (None: not predictable). A later draw for the same
    # field replaces the earlier one, so this holds the faults of the call as it finally is.
    found: dict[str, int | None] = {}
    config_fields = ("version", "name", "key", "unknown_key", "prev", "nul")
    if verb in ("GC", "STATUS") and version not in ("1.1.0",):
        version = "1.1.0"
        config["cniVersion"] = version
    if verb == "CHECK" and version in ("0.3.0", "0.3.1"):
        config["cniVersion"] = version = "1.0.0"
    if verb == "GC":
        config["cni.dev/valid-attachments"] = []

    count = draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))
    kinds = draw(st.lists(st.sampled_from(
        ["command", "json", "version", "name", "cid", "ifname", "netns", "args", "key", "unknown_key",
         "prev", "nul_in_config", "env_noise", "deep", "big"]), min_size=count, max_size=count))
    attachment = verb in ("ADD", "DEL", "CHECK")
    for kind in kinds:
        if kind == "command":
            env["CNI_COMMAND"] = draw(st.sampled_from(["", "add", "ADD ", "ADD\n", "CREATE", "GC\x01"]) | env_text)
            found.pop("command", None)
            if env["CNI_COMMAND"] not in VERBS:
                found["command"] = BAD_ENV
            elif env["CNI_COMMAND"] != verb:
                found["command"] = None  # another valid verb: earlier expectations no longer hold
                verb = env["CNI_COMMAND"]
        elif kind == "json":
            config = draw(st.sampled_from([b"", b"{", b"[]", b"null", b"\"x\"", b"{\"cniVersion\": }", b"\xff\xfe{}",
                                           b"{}garbage"]) | st.binary(max_size=60))
            for gone in config_fields:  # the config they changed is gone
                found.pop(gone, None)
            # (random bytes that happen to be a JSON object give some other error)
            found["stdin"] = None if _json_object(config) else (DECODE if verb != "VERSION" or config.strip() else OK)
        elif kind == "version" and isinstance(config, dict):
            config["cniVersion"] = draw(st.sampled_from(["", "0.2.0", "2.0.0", "1.0", "1.1.0 ", None, 1]) | json_values)
            found.pop("version", None)
            if config["cniVersion"] not in VERSIONS:
                found["version"] = OK if verb == "VERSION" and config["cniVersion"] is None else INCOMPATIBLE
            elif config["cniVersion"] != version:
                found["version"] = None  # valid, but maybe too old for this verb
        elif kind == "name" and isinstance(config, dict):
            config["name"] = draw(st.sampled_from(["", "../x", "a/b", "-x", "x\n", None, 5, ".x", "a b"]))
            found["name"] = BAD_CONFIG if verb != "VERSION" else OK
        elif kind == "cid":
            env["CNI_CONTAINERID"] = draw(st.sampled_from(HOSTILE_IDS) | env_text | env_bytes)
            found.pop("cid", None)
            if not valid_container_id(env["CNI_CONTAINERID"]):
                found["cid"] = BAD_ENV if attachment else None
        elif kind == "ifname":
            env["CNI_IFNAME"] = draw(st.sampled_from(HOSTILE_IFNAMES) | env_text)
            found.pop("ifname", None)
            if env["CNI_IFNAME"] == "lo":  # exists in every pod; fan-ipam creates no interface
                found["ifname"] = 101 if verb == "ADD" and plugin == "fan" else None
            elif not valid_ifname(env["CNI_IFNAME"]):
                found["ifname"] = BAD_ENV if attachment else None
        elif kind == "netns":
            choice = draw(st.sampled_from(["missing", "relative", "nonexistent", "regular", "dir", "devnull",
                                           "dotdot", "long", "newline", "uts"]))
            env["CNI_NETNS"] = {
                "missing": "", "relative": "var/run/netns/x", "nonexistent": "/var/run/netns/tpg-no-such-ns",
                "regular": str(box.regular_file), "dir": str(box.root), "devnull": "/dev/null",
                "dotdot": f"/var/run/netns/../netns/{box.pod.name}", "long": "/" + "a" * 5000,
                "newline": box.pod.path + "\n", "uts": "/proc/self/ns/uts"}[choice]
            if not env["CNI_NETNS"]:
                del env["CNI_NETNS"]
            found.pop("netns", None)
            if choice == "dotdot":
                pass  # a path trick that still names the pod: valid
            elif plugin == "fan-ipam":  # IPAM never enters the pod: only the spec's checks apply
                found["netns"] = (BAD_ENV if choice == "relative" or (choice == "missing" and verb == "ADD")
                                  else OK) if verb in ("ADD", "DEL") else None
            elif verb == "ADD":
                found["netns"] = {"missing": BAD_ENV, "relative": BAD_ENV, "nonexistent": UNKNOWN_CONTAINER,
                                  "long": None, "newline": UNKNOWN_CONTAINER}.get(choice, BAD_ENV)
            elif verb == "DEL":
                found["netns"] = BAD_ENV if choice == "relative" else OK
            else:
                found["netns"] = None
        elif kind == "args":
            env["CNI_ARGS"] = draw(st.sampled_from(HOSTILE_ARGS) | env_text | env_bytes)
            found["args"] = None
        elif kind == "key" and isinstance(config, dict):
            key = draw(st.sampled_from(sorted(BAD_VALUES)))
            target = params if key in ("overlay", "overlay6", "underlay", "underlayInterface", "hostReserve",
                                       "dataDir", "logLevel", "routes") or plugin == "fan" else None
            if target is not None and isinstance(config.get("ipam", config), dict):
                target[key] = draw(st.sampled_from(BAD_VALUES[key]))
                found["key"] = BAD_CONFIG if verb != "VERSION" else OK
        elif kind == "unknown_key" and isinstance(config, dict):
            config[draw(st.sampled_from(["x-unknown", "Overlay", "ipam2", "plugins"]))] = draw(json_values)
            found["unknown_key"] = None
        elif kind == "prev" and isinstance(config, dict):
            config["prevResult"] = draw(json_values | st.fixed_dictionaries(
                {"cniVersion": st.just(version), "interfaces": json_values, "ips": json_values}))
            found["prev"] = None
        elif kind == "nul_in_config" and isinstance(config, dict):
            key = draw(st.sampled_from(["name", "overlay", "dataDir"] + (["bridge"] if plugin == "fan" else [])))
            target = params if key in ("overlay", "dataDir") else config
            target[key] = f"{target.get(key) or 'x'}\x00../evil"
            found["nul"] = BAD_CONFIG if verb != "VERSION" else None
        elif kind == "env_noise":
            env[draw(st.sampled_from(["CNI_EXTRA", "CNI_PATH", "CNI_FAN_LOG_LEVEL", "LANG"]))] = draw(env_text)
        elif kind == "deep":
            config = b"[" * 100_000 + b"]" * 100_000 if draw(st.booleans()) else b'{"a":' * 50_000 + b"1" + b"}" * 50_000
            for gone in config_fields:
                found.pop(gone, None)
            found["stdin"] = DECODE
        elif kind == "big":
            config = b'{"cniVersion": "1.0.0", "pad": "' + b"x" * (1 << 20) + b'"}'
            for gone in config_fields:
                found.pop(gone, None)
            found["stdin"] = DECODE
    faults = sorted(found)
    if not found:
        expect = {"ADD": OK, "DEL": OK, "VERSION": OK, "GC": OK, "STATUS": OK, "CHECK": 104}[verb]
    else:
        expect = next(iter(found.values())) if len(found) == 1 else None
    return Call(plugin=plugin, verb=verb, env=env, config=config, faults=faults, expect=expect)


# == running and checking ==========================================================================

def _run(box: Sandbox, call: Call, server: bool) -> tuple[int, str, str]:
    env = dict(call.env)
    env["CNI_FAN_AGENT_SOCKET"] = str(box.lab.socket) if server else "none"
    proc = subprocess.Popen([str(CNI_BIN / call.plugin)], env=env, cwd=box.cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=box.lab._enter_node)
    out, err = proc.communicate(call.stdin(), timeout=180)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check_modes(data: Path) -> None:
    networks = data / "networks"
    if not networks.exists():
        return
    for net in networks.iterdir():
        assert stat.S_IMODE(net.stat().st_mode) == 0o700, f"{net} is {oct(net.stat().st_mode)}"
        for path in net.rglob("*"):
            if path.is_symlink():  # the owner index (ipam/store.py): a symlink's own mode means nothing
                continue
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert not mode & 0o077, f"{path} is readable by others: {oct(mode)}"


def _answer_is_protocol(call: Call, code: int, out: str, err: str) -> None:
    where = f"\ncall: {call.plugin} {call.env.get('CNI_COMMAND')!r} faults={call.faults}\nstdout: {out[:2000]}\n" \
            f"stderr: {err[-2000:]}"
    assert TRACEBACK not in out and TRACEBACK not in err, "traceback" + where
    if code == 0:
        if call.verb in ("ADD", "VERSION"):
            answer = json.loads(out)
            assert isinstance(answer, dict) and answer.get("cniVersion") in VERSIONS, where
            if call.verb == "ADD":
                assert answer.get("ips"), where
            else:
                assert answer.get("supportedVersions"), where
        else:
            assert out.strip() == "", where
    else:
        answer = json.loads(out)
        assert isinstance(answer, dict), where
        assert answer.get("code") in KNOWN_CODES, "unexpected code" + where
        assert isinstance(answer.get("msg"), str) and answer["msg"], where
        assert answer.get("cniVersion") in VERSIONS, where
        assert out.count("\n") == out.strip().count("\n") + 1, "more than one object" + where
    if call.expect is not None:
        got = 0 if code == 0 else json.loads(out).get("code")
        if call.verb == "STATUS" and call.expect == OK:
            assert got in (0, 50), where
        else:
            assert got == call.expect, f"expected {call.expect}, got {got}" + where


def _exercise(box: Sandbox, call: Call, server: bool) -> None:
    before = _files(box.root)
    code, out, err = _run(box, call, server)
    try:
        _answer_is_protocol(call, code, out, err)
        if code == 0 and call.verb == "ADD":
            _check_modes(box.data)
    finally:  # undo a successful ADD even when a check failed: one failure must not cause the next
        if code == 0 and call.verb == "ADD":
            undo = Call(call.plugin, "DEL", dict(call.env, CNI_COMMAND="DEL"), call.config, [], OK)
            undo_code, undo_out, undo_err = _run(box, undo, server)
            assert undo_code == 0, f"DEL after a successful ADD failed: {undo_out} {undo_err[-2000:]}"
    _check_modes(box.data)
    after = _files(box.root)
    new = {f for f in after - before if not f.startswith(("data", "lab"))}
    assert not new, f"files outside the state dir: {sorted(new)[:10]}"
    assert _settled_links(box.lab.node) == box.baseline_node, "the node's interfaces changed"
    assert _links(box.pod.name) == box.baseline_pod, "the pod's interfaces changed"
    assert not list(Path("/run/cni-fan/networks").glob(f"{NET_PREFIX}*")), "state under the default dataDir"


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("server", [False, True], ids=["standalone", "server"])
@pytest.mark.parametrize("plugin", ["fan", "fan-ipam"])
def test_hostile_calls(sandbox: Sandbox, plugin: str, server: bool) -> None:
    @SETTINGS
    @given(st.data())
    def check(data) -> None:
        _exercise(sandbox, data.draw(calls(sandbox, plugin)), server)

    check()
