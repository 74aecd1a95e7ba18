"""The thin `fan` clients (native/fan-client.c, cni_fan.entry) and the wire format (cni_fan.wire).

A fake plugin server on a UNIX socket in a temporary directory (a thread
answering in the wire format) checks what the client sends (env, stdin, the
caller's namespace, stderr and the pod's namespace as SCM_RIGHTS descriptors)
and that the server's stdout and exit code reach the runtime unchanged.
One protocol, two clients: the `client` fixture runs each case through
both (harness/clients.py); the native one's local runs go to a stand-in
`cni-fan` that reports what it was given.
No root, no kernel features beyond UNIX sockets.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from cni_fan import __version__, entry, wire
from cni_fan.wire import FALLBACK, MAGIC, decode_reply, decode_request, encode_reply, encode_request, read_message
from harness import clients
from harness.system import CNI_BIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = b'{"cniVersion": "1.0.0", "name": "fannet", "type": "fan"}'


@pytest.fixture
def sockdir():
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes.
    path = tempfile.mkdtemp(prefix="fanw", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeServer:
    """Accepts one connection at a time and runs `handler(conn, request)`.

    `request` is what the client sent: (version, plugin, netns, stdin, env,
    fds); `handler` answers (or misbehaves). Received descriptors are
    described (inode, device) and closed by the server.
    """

    def __init__(self, path: str, handler, read_request: bool = True) -> None:
        self.path = path
        self.handler = handler
        self.read_request = read_request
        self.requests: list = []
        self.errors: list = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            self.errors.append(exc)
            return
        with conn:
            conn.settimeout(10)
            try:
                request = None
                if self.read_request:
                    first, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 8)
                    pending = [first]

                    def recv(n: int) -> bytes:
                        if pending[0]:
                            chunk, pending[0] = pending[0][:n], pending[0][n:]
                            return chunk
                        return conn.recv(n)

                    version, plugin, netns, stdin, env = decode_request(read_message(recv))
                    described = []
                    for fd in fds:
                        st = os.fstat(fd)
                        described.append((st.st_dev, st.st_ino))
                        os.close(fd)
                    request = (version, plugin, netns, stdin, env, described)
                    self.requests.append(request)
                self.handler(conn, request)
            except Exception as exc:  # surfaced by the test through .errors
                self.errors.append(exc)

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def native_client_dir(tmp_path_factory):
    return clients.native_dir(tmp_path_factory)


@pytest.fixture(params=["python", "native"])
def client(request, native_client_dir):
    if request.param == "python":
        return clients.PythonClient()
    return clients.NativeClient(native_client_dir)


@pytest.fixture
def native(native_client_dir) -> clients.NativeClient:
    return clients.NativeClient(native_client_dir)


@pytest.fixture
def serve(sockdir):
    servers: list[FakeServer] = []

    def start(handler, read_request: bool = True, name: str = "plugin.sock") -> FakeServer:
        server = FakeServer(os.path.join(sockdir, name), handler, read_request)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def reply(code: int, out: bytes):
    return lambda conn, request: conn.sendall(encode_reply(code, out))


def env(**over) -> dict[str, str]:
    out = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/none-such", "CNI_PATH": "/opt/cni/bin", "HOME": "/root", "SECRET": "x"}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def stat_key(path_or_fd) -> tuple[int, int]:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return (st.st_dev, st.st_ino)


def assert_try_again(answer) -> dict:
    assert answer is not None
    out, code = answer
    assert code == 1
    msg = json.loads(out)
    assert msg["code"] == 11
    assert set(msg) == {"cniVersion", "code", "msg", "details"}
    assert msg["cniVersion"] in ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
    return msg


# -- _socket_path ------------------------------------------------------------------


@pytest.mark.parametrize("environ, stdin, expected", [
    ({}, CONFIG, entry.DEFAULT_SOCKET),
    ({}, b"", entry.DEFAULT_SOCKET),  # VERSION without stdin
    ({}, b"not json at all", entry.DEFAULT_SOCKET),  # the server answers the decode error
    ({}, b'{"cniVersion": "1.0.0", "agentSocket": "/run/fan/a.sock"}', "/run/fan/a.sock"),
    ({}, b'{"agentSocket" :\n "/run/fan/b.sock", "name": "x"}', "/run/fan/b.sock"),
    ({}, b'{"ipam": {"type": "fan-ipam", "agentSocket": "/run/fan/ipam.sock"}}', "/run/fan/ipam.sock"),
    ({}, b'{"agentSocket": "relative.sock"}', None),
    ({}, b'{"agentSocket": ""}', None),
    ({}, b'{"agentSocket": 5}', None),
    ({}, b'{"agentSocket": null}', None),
    ({}, b'{"agentSocket": "/run/a\\"b.sock"}', None),  # escapes: let the full parser decide locally
    ({}, b'{"agentSocket": "/run/\\u0061.sock"}', None),
    ({}, b'{"agentSocket": "/run/\xff.sock"}', None),
    ({}, b'{"agentSocket": "/run/unterminated', None),
    ({"CNI_FAN_AGENT_SOCKET": "/tmp/override.sock"}, b'{"agentSocket": "/run/fan/a.sock"}', "/tmp/override.sock"),
    ({"CNI_FAN_AGENT_SOCKET": ""}, CONFIG, None),
    ({"CNI_FAN_AGENT_SOCKET": "none"}, CONFIG, None),
])
def test_socket_path_choice(environ, stdin: bytes, expected) -> None:
    assert entry._socket_path(environ, stdin) == expected


# -- no server: run locally ------------------------------------------------------------


def test_no_socket_file_means_run_locally(client, sockdir) -> None:
    assert client.call(os.path.join(sockdir, "absent.sock"), "fan", env(), CONFIG) is None


def test_a_regular_file_at_the_path_means_run_locally(client, sockdir) -> None:
    path = os.path.join(sockdir, "plugin.sock")
    open(path, "w").close()
    assert client.call(path, "fan", env(), CONFIG) is None


def test_a_socket_nobody_listens_on_means_run_locally(client, sockdir) -> None:
    path = os.path.join(sockdir, "plugin.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: connect is refused
    try:
        assert client.call(path, "fan", env(), CONFIG) is None
    finally:
        stale.close()


def test_a_stale_socket_left_by_a_dead_server_means_run_locally(client, sockdir) -> None:
    path = os.path.join(sockdir, "plugin.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()  # the file stays, the server is gone
    assert os.path.exists(path)
    assert client.call(path, "fan", env(), CONFIG) is None


def test_no_descriptor_leaks_on_the_local_path(sockdir) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        entry.call_server(os.path.join(sockdir, "absent.sock"), "fan", env(), CONFIG)
        path = os.path.join(sockdir, "file.sock")
        open(path, "w").close()
        entry.call_server(path, "fan", env(), CONFIG)
    assert set(os.listdir("/proc/self/fd")) == before


# -- the server answers ------------------------------------------------------------------


def test_stdout_and_exit_code_are_passed_through(client, serve) -> None:
    out = b'{"cniVersion": "1.0.0", "ips": [{"address": "250.0.28.2/24"}], "dns": {}}\n'
    server = serve(reply(0, out))
    assert client.call(server.path, "fan", env(), CONFIG) == (out, 0)


@pytest.mark.parametrize("code, out", [(1, b'{"code": 7, "msg": "overlay: is required"}\n'), (0, b""),
                                       (100, b"\x00\xff\xfe binary survives \r\n"), (1, b"x" * 300_000)],
                         ids=["error", "empty", "binary", "large"])
def test_error_codes_and_any_bytes_are_passed_through(client, serve, code: int, out: bytes) -> None:
    server = serve(reply(code, out))
    assert client.call(server.path, "fan-ipam", env(), CONFIG) == (out, code)


def test_the_request_carries_version_plugin_stdin_and_only_cni_env(client, serve) -> None:
    server = serve(reply(0, b""))
    stdin = CONFIG + b"\n\xff raw bytes"
    environ = env(CNI_ARGS="K8S_POD_NAME=web;X=a=b", CNI_FAN_LOG_LEVEL="debug")
    client.call(server.path, "fan-ipam", environ, stdin)
    server.close()
    assert not server.errors, server.errors
    [(version, plugin, netns, got_stdin, got_env, _fds)] = server.requests
    assert (version, plugin, got_stdin) == (__version__, "fan-ipam", stdin)
    assert got_env == client.sent_env(environ, server.path)
    assert "HOME" not in got_env and "SECRET" not in got_env
    assert got_env["CNI_ARGS"] == "K8S_POD_NAME=web;X=a=b"
    assert netns == ""  # the pod netns could not be opened, so none is named


def test_descriptors_arrive_with_scm_rights(client, serve, sockdir) -> None:
    pod_ns = os.path.join(sockdir, "pod-netns")  # any openable file stands in for /var/run/netns/x
    open(pod_ns, "w").close()
    server = serve(reply(0, b""))
    assert client.call(server.path, "fan", env(CNI_NETNS=pod_ns), CONFIG) == (b"", 0)
    server.close()
    assert not server.errors, server.errors
    [(_v, _p, netns, _s, got_env, fds)] = server.requests
    assert netns == pod_ns and got_env["CNI_NETNS"] == pod_ns
    assert len(fds) == 3
    own_ns, stderr, pod = fds
    assert own_ns == stat_key("/proc/thread-self/ns/net")  # the caller's network namespace
    assert stderr == stat_key(2)  # the runtime's stderr, for the server's log lines
    assert pod == stat_key(pod_ns)


def test_without_a_pod_netns_two_descriptors_are_sent(client, serve) -> None:
    server = serve(reply(0, b""))
    client.call(server.path, "fan", env(CNI_COMMAND="DEL", CNI_NETNS=None), CONFIG)
    server.close()
    [(_v, _p, netns, _s, _e, fds)] = server.requests
    assert netns == "" and len(fds) == 2


def test_the_client_closes_its_descriptors(serve, sockdir) -> None:
    pod_ns = os.path.join(sockdir, "pod-netns")
    open(pod_ns, "w").close()
    before = set(os.listdir("/proc/self/fd"))
    server = serve(reply(0, b"{}"))
    entry.call_server(server.path, "fan", env(CNI_NETNS=pod_ns), CONFIG)
    server.close()
    server.listener.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_fallback_reply_means_run_locally(client, serve) -> None:
    server = serve(reply(FALLBACK, b""))
    assert client.call(server.path, "fan", env(), CONFIG) is None


# -- the server misbehaves -----------------------------------------------------------------


def test_server_closing_after_the_request_gives_code_11(client, serve) -> None:
    server = serve(lambda conn, request: None)  # read the request, then hang up
    msg = assert_try_again(client.call(server.path, "fan", env(), CONFIG))
    assert "stopped" in msg["msg"]


def test_server_closing_mid_reply_gives_code_11(client, serve) -> None:
    def half(conn, request):
        conn.sendall(encode_reply(0, b'{"cniVersion": "1.0.0"}')[:15])

    server = serve(half)
    assert_try_again(client.call(server.path, "fan", env(), CONFIG))


@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 200 OK\r\n\r\n",
    MAGIC + wire.LENGTH.pack(wire.MAX_MESSAGE + 1),
    MAGIC + wire.LENGTH.pack(0),  # a body too short to hold the exit code
    MAGIC + wire.LENGTH.pack(2) + b"\x00\x00",
])
def test_a_malformed_reply_gives_code_11(client, serve, garbage: bytes) -> None:
    server = serve(lambda conn, request: conn.sendall(garbage))
    assert_try_again(client.call(server.path, "fan", env(), CONFIG))


def test_server_closing_before_reading_runs_locally_or_says_try_again(client, serve) -> None:
    # Whether the request was already queued decides between "nothing reached
    # the server" (run locally) and "it stopped before answering" (code 11).
    server = serve(lambda conn, request: None, read_request=False)
    answer = client.call(server.path, "fan", env(), CONFIG)
    if answer is not None:
        assert_try_again(answer)


def test_server_gone_before_the_send_runs_locally(serve, monkeypatch) -> None:
    # Make the order certain: the server hangs up before the client sends, so
    # nothing reached it and the call can safely run locally.
    import _socket

    closed = threading.Event()

    def hang_up(conn, request):
        conn.close()
        closed.set()

    class Sock(_socket.socket):
        def sendmsg(self, *args, **kwargs):
            assert closed.wait(10)
            return super().sendmsg(*args, **kwargs)

    server = serve(hang_up, read_request=False)
    monkeypatch.setattr(_socket, "socket", Sock)
    assert entry.call_server(server.path, "fan", env(), CONFIG) is None


# -- end to end through the real entry point (a subprocess) ----------------------------------


@pytest.fixture(params=["python", "native"])
def run_fan(request):
    """`fan` started as a runtime starts it: the Python entry point, or the installed native client
    (.cache/cni-bin/fan, the venv layout tools/setup.sh installs) with its real local program."""
    if request.param == "native":
        if os.path.realpath(CNI_BIN / "fan").rsplit("/", 1)[-1] != "fan-client":
            pytest.skip(f"{CNI_BIN}/fan is not the native client: run tools/setup.sh")

    def run(environ: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess:
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, **environ}
        argv = ([str(CNI_BIN / "fan")] if request.param == "native"
                else [sys.executable, "-c", "from cni_fan.entry import fan_main; fan_main()"])
        return subprocess.run(argv, input=stdin, env=full, capture_output=True, timeout=30)

    return run


def test_entry_point_prints_the_servers_answer_and_exits_with_its_code(run_fan, serve) -> None:
    out = b'{"cniVersion": "1.0.0", "code": 7, "msg": "from the server"}\n'
    server = serve(reply(3, out))
    proc = run_fan({"CNI_COMMAND": "ADD", "CNI_FAN_AGENT_SOCKET": server.path}, CONFIG)
    assert (proc.stdout, proc.returncode) == (out, 3)
    server.close()
    assert server.requests[0][3] == CONFIG


def test_entry_point_runs_locally_without_a_server(run_fan, sockdir) -> None:
    proc = run_fan({"CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": os.path.join(sockdir, "none.sock")}, b"")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def test_entry_point_falls_back_to_local_on_a_fallback_reply(run_fan, serve) -> None:
    server = serve(reply(FALLBACK, b""))
    stdin = b'{"cniVersion": "0.4.0"}'
    proc = run_fan({"CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": server.path}, stdin)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"
    standalone = run_fan({"CNI_COMMAND": "VERSION", "CNI_FAN_AGENT_SOCKET": "none"}, stdin)
    assert (proc.stdout, proc.returncode) == (standalone.stdout, standalone.returncode)
    server.close()
    assert len(server.requests) == 1  # the local run did not ask the server again


def test_entry_point_answers_a_real_add_error_the_same_either_way(run_fan, sockdir) -> None:
    """A config the verbs refuse: the local run's CNI error, through the whole local path."""
    proc = run_fan({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nonexistent",
                    "CNI_PATH": "/opt/cni/bin", "CNI_FAN_AGENT_SOCKET": os.path.join(sockdir, "none.sock")},
                   b'{"cniVersion": "1.0.0", "name": "fannet", "type": "fan", "underlay": 5}')
    assert proc.returncode != 0
    assert json.loads(proc.stdout)["code"] in (4, 7)
    assert b"Traceback" not in proc.stderr


# -- what only the native client has: its local run, its own errors ----------------------------


def _release(server: FakeServer) -> None:
    """Connect and hang up: the server's thread, which the client never called, stops waiting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
    server.close()


# The server listens at the path as a lax reader would take it from stdin (the
# raw bytes between the quotes), so a client that took such a path would be served.
@pytest.mark.parametrize("stdin_template, name, served", [
    (b'{"cniVersion": "1.0.0", "agentSocket": "%s"}', "plugin.sock", True),
    (b'{"agentSocket" :\n "%s", "name": "x"}', "plugin.sock", True),
    (b'{"ipam": {"type": "fan-ipam", "agentSocket": "%s"}}', "plugin.sock", True),
    (b'{"agentSocket": "%s"}', "pl\u00e9.sock", True),  # UTF-8 is fine
    (b'{"agentSocket": "plugin.sock"}', "plugin.sock", False),  # relative
    (b'{"agentSocket": ""}', "plugin.sock", False),
    (b'{"agentSocket": 5}', "plugin.sock", False),
    (b'{"agentSocket": null}', "plugin.sock", False),
    (b'{"agentSocket": "%s"}', "\\u0061.sock", False),  # escapes: the full parser decides locally
    (b'{"agentSocket": "%s"}', "pl\udcff.sock", False),  # not UTF-8
    (b'{"agentSocket": "%s"}', "pl\udcc0\udcaf.sock", False),  # an overlong encoding is not UTF-8 either
    (b'{"agentSocket": "%s"}', "pl\udced\udca0\udc80.sock", False),  # nor is a surrogate
    (b'{"agentSocket": "%s', "plugin.sock", False),
])
def test_native_socket_path_from_stdin(native, serve, stdin_template: bytes, name: str, served: bool) -> None:
    server = serve(reply(0, b"served\n"), name=name)
    stdin = stdin_template.replace(b"%s", os.fsencode(server.path))
    environ = {k: v for k, v in env().items() if k != "CNI_FAN_AGENT_SOCKET"}
    proc = native.run("fan", environ, stdin)
    report = clients.local_report(proc.stdout)
    if served:
        assert (proc.stdout, proc.returncode) == (b"served\n", 0)
    else:
        assert report is not None, proc.stdout
        _release(server)
        assert server.requests == []


@pytest.mark.parametrize("override", ["", "none"])
def test_native_override_none_means_no_server_whatever_stdin_says(native, serve, override: str) -> None:
    server = serve(reply(0, b"served\n"))
    proc = native.run("fan", env(CNI_FAN_AGENT_SOCKET=override), b'{"agentSocket": "%s"}' % server.path.encode())
    assert clients.local_report(proc.stdout) is not None
    _release(server)
    assert server.requests == []


@pytest.mark.parametrize("plugin", ["fan", "fan-ipam"])
def test_native_local_run_gets_the_call_and_nothing_else(native, sockdir, plugin: str) -> None:
    environ = env(HOME="/root", CNI_FAN_LOG_LEVEL="debug")
    assert native.call(os.path.join(sockdir, "absent.sock"), plugin, environ, CONFIG) is None
    report = native.last_local
    assert report["argv0"].endswith("cni-fan")  # a #! script sees its own path; the plugin comes in the env
    assert report["plugin"] == plugin
    assert report["agent_socket"] == "none"  # it must not ask the server again
    assert report["fds"] == [0, 1, 2, 3]  # nothing leaked into it (3: the listing's own descriptor)
    expected = dict(environ, CNI_FAN_AGENT_SOCKET="none", CNI_FAN_PLUGIN=plugin)
    report["env"].pop("LC_CTYPE", None)  # the stand-in's own Python sets it (C locale coercion, PEP 538)
    assert report["env"] == expected


def test_stdin_larger_than_64k_reaches_the_server_intact(client, serve) -> None:
    stdin = CONFIG + b" " + bytes(range(256)) * 1024 + b"\n"  # 256 KiB and more, every byte value
    server = serve(reply(0, b"{}"))
    assert client.call(server.path, "fan", env(), stdin) == (b"{}", 0)
    server.close()
    assert server.requests[0][3] == stdin


def test_stdin_larger_than_64k_reaches_the_local_run_intact(native, serve) -> None:
    stdin = CONFIG + b" " + bytes(range(256)) * 1024 + b"\n"
    server = serve(reply(FALLBACK, b""))
    assert native.call(server.path, "fan", env(), stdin) is None  # call() compares the digest
    assert native.last_local["stdin_len"] == len(stdin)


def test_native_client_under_another_name_is_a_cni_error(native) -> None:
    proc = subprocess.run(["bridge"], executable=native.client, input=CONFIG, capture_output=True, timeout=30,
                          env=env())
    assert proc.returncode == 1
    msg = json.loads(proc.stdout)
    assert msg["code"] == 4 and "fan or fan-ipam" in msg["msg"] and "bridge" in msg["details"]
    assert b"bridge" in proc.stderr


@pytest.mark.parametrize("program", ["missing", "not executable"])
def test_native_client_without_its_local_program_is_a_cni_error(native, tmp_path, sockdir, program: str) -> None:
    lonely = tmp_path / "fan-client"
    lonely.write_bytes(native.client.read_bytes())
    lonely.chmod(0o755)
    if program == "not executable":
        (tmp_path / "cni-fan").write_text("#!/bin/sh\necho should not run\n")
    proc = subprocess.run(["fan"], executable=lonely, input=CONFIG, capture_output=True, timeout=30,
                          env=env(CNI_FAN_AGENT_SOCKET=os.path.join(sockdir, "absent.sock")))
    assert proc.returncode == 1
    msg = json.loads(proc.stdout)
    assert msg["code"] == 11 and "cannot start" in msg["msg"]
    assert str(tmp_path / "cni-fan") in msg["details"]
    assert proc.stdout.count(b"\n") == 1 and b"Traceback" not in proc.stderr


# -- the wire format itself ----------------------------------------------------------------


def _reader(data: bytes, step: int):
    pos = [0]

    def recv(n: int) -> bytes:
        chunk = data[pos[0]:pos[0] + min(n, step)]
        pos[0] += len(chunk)
        return chunk

    return recv


@pytest.mark.parametrize("step", [1, 3, 7, 1 << 16])
def test_request_round_trip_in_any_chunking(step: int) -> None:
    environ = {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=x=y", "CNI_EMPTY": "", "CNI_U": "é\udcff"}
    data = encode_request("0.1.0", "fan", "/var/run/netns/x", b"\x00stdin\xff", environ)
    assert data.startswith(MAGIC)
    body = read_message(_reader(data, step))
    assert decode_request(body) == ("0.1.0", "fan", "/var/run/netns/x", b"\x00stdin\xff", environ)


@pytest.mark.parametrize("code", [0, 1, 11, 100, FALLBACK, 2**31 - 1])
def test_reply_round_trip(code: int) -> None:
    data = encode_reply(code, b"out\n")
    assert decode_reply(read_message(_reader(data, 5))) == (code, b"out\n")


@pytest.mark.parametrize("data", [b"", MAGIC[:4], MAGIC + b"\x00\x00", MAGIC + wire.LENGTH.pack(10) + b"short"])
def test_read_message_of_a_truncated_stream_is_a_connection_error(data: bytes) -> None:
    with pytest.raises(ConnectionError):
        read_message(_reader(data, 4))


@pytest.mark.parametrize("body", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x09abc",
                                  wire.LENGTH.pack(0) * 3, wire.LENGTH.pack(0) * 4 + b"\x00\x00"])
def test_a_malformed_request_body_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(body)


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00\x00"])
def test_a_reply_body_without_a_code_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_reply(body)


# -- the real server's --exit-with-parent ---------------------------------------------------


def _process_gone(pid: int) -> bool:
    """Exited (a zombie awaiting its new parent's wait counts) or reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(predicate, what: str, limit: float = 60.0) -> None:
    """Poll until `predicate()` holds; `limit` only bounds a hang, it is not the property tested."""
    import time

    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def test_serve_with_exit_with_parent_stops_when_its_parent_is_killed(sockdir) -> None:
    """For a server a script starts: its parent dies by SIGKILL, the server notices and removes its socket."""
    import signal

    path = os.path.join(sockdir, "plugin.sock")
    starter = ("import subprocess, sys\n"
               "server = subprocess.Popen([sys.executable, '-m', 'cni_fan', 'serve', '--socket', sys.argv[1],\n"
               "                           '--exit-with-parent'], stdin=subprocess.DEVNULL)\n"
               "print(server.pid, flush=True)\n"
               "sys.stdin.read()\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO}
    parent = subprocess.Popen([sys.executable, "-c", starter, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env)
    server_pid = int(parent.stdout.readline())
    try:
        _wait_for(lambda: os.path.exists(path), "the server's socket")
        parent.kill()
        parent.wait()
        _wait_for(lambda: _process_gone(server_pid), "the server to stop")
        assert not os.path.exists(path)
    finally:
        if not _process_gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        parent.stdout.close()
        parent.stdin.close()
