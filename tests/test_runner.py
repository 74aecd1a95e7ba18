"""run_local: the paths that need no kernel. VERSION, every parse error, an
unknown command, a verb that raises (turned into code 100), and the rule
that stdout carries the protocol only while logs go to the stderr stream.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from cni_fan import runner
from cni_fan.cni import errors
from cni_fan.cni.call import CallContext, PluginVerbs
from cni_fan.cni.errors import CniError
from cni_fan.cni.result import Interface, IPConfig, Result, Route

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("restore_cni_fan_logging")


def config(version: str = "1.1.0", **extra) -> bytes:
    return json.dumps({"cniVersion": version, "name": "fannet", "type": "fan", **extra}).encode()


def env(command: str = "ADD", **over) -> dict[str, str]:
    out = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def run(environ, stdin: bytes, plugin: str = "fan"):
    stderr = io.StringIO()
    out, code = runner.run_local(plugin, environ, stdin, CallContext(log_stream=stderr))
    assert isinstance(out, bytes)
    return out, code, stderr.getvalue()


def assert_error(out: bytes, code: int, expect_code: int, expect_version: str) -> dict:
    assert code != 0
    answer = json.loads(out)
    assert set(answer) <= {"cniVersion", "code", "msg", "details"}
    assert answer["cniVersion"] == expect_version
    assert answer["code"] == expect_code
    assert isinstance(answer["msg"], str) and answer["msg"]
    return answer


# -- VERSION -------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["fan", "fan-ipam"])
@pytest.mark.parametrize("stdin", [b"", b"\n"])
def test_version_without_stdin(plugin: str, stdin: bytes) -> None:
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, stdin, plugin)
    assert code == 0
    assert json.loads(out) == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_version_answers_in_the_asked_version(version: str) -> None:
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}).encode())
    assert code == 0
    answer = json.loads(out)
    assert answer["cniVersion"] == version
    assert answer["supportedVersions"] == ALL_VERSIONS


def test_version_with_a_full_config_on_stdin() -> None:
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, config("0.4.0", overlay="250.0.0.0/8"))
    assert (code, json.loads(out)["cniVersion"]) == (0, "0.4.0")


def test_version_does_not_load_the_verbs(monkeypatch) -> None:
    def no_verbs(plugin):
        raise AssertionError("VERSION must not import the verbs")

    monkeypatch.setattr(runner, "_plugin", no_verbs)
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0


# -- parse errors ----------------------------------------------------------------


@pytest.mark.parametrize("environ, stdin, expect_code, expect_version", [
    ({}, config("0.3.1"), errors.INVALID_ENVIRONMENT, "0.3.1"),
    (env("BOGUS"), config("1.0.0"), errors.INVALID_ENVIRONMENT, "1.0.0"),
    (env("add"), config(), errors.INVALID_ENVIRONMENT, "1.1.0"),
    (env("ADD"), b"{nope", errors.DECODE_FAILURE, "1.1.0"),
    (env("ADD"), b"[1,2,3]", errors.DECODE_FAILURE, "1.1.0"),
    (env("ADD"), b"", errors.DECODE_FAILURE, "1.1.0"),
    pytest.param(env("ADD"), b"[" * 200_000, errors.DECODE_FAILURE, "1.1.0", id="deep-list"),
    pytest.param(env("VERSION"), b'{"a":' * 200_000, errors.DECODE_FAILURE, "1.1.0", id="deep-object"),
    (env("VERSION"), b"null", errors.DECODE_FAILURE, "1.1.0"),
    (env("ADD"), json.dumps({"name": "fannet"}).encode(), errors.INCOMPATIBLE_VERSION, "1.1.0"),
    (env("ADD"), config("9.9.9"), errors.INCOMPATIBLE_VERSION, "1.1.0"),
    (env("VERSION"), config("0.2.0"), errors.INCOMPATIBLE_VERSION, "1.1.0"),
    (env("CHECK"), config("0.3.1"), errors.INCOMPATIBLE_VERSION, "0.3.1"),
    (env("GC"), config("1.0.0"), errors.INCOMPATIBLE_VERSION, "1.0.0"),
    (env("STATUS"), config("0.4.0"), errors.INCOMPATIBLE_VERSION, "0.4.0"),
    (env("ADD"), json.dumps({"cniVersion": "0.4.0"}).encode(), errors.INVALID_CONFIG, "0.4.0"),
    (env("ADD"), json.dumps({"cniVersion": "1.0.0", "name": "../x"}).encode(), errors.INVALID_CONFIG, "1.0.0"),
    (env("ADD", CNI_CONTAINERID=None), config("1.0.0"), errors.INVALID_ENVIRONMENT, "1.0.0"),
    (env("DEL", CNI_CONTAINERID="../x"), config("0.3.0"), errors.INVALID_ENVIRONMENT, "0.3.0"),
    (env("ADD", CNI_IFNAME="a" * 16), config(), errors.INVALID_ENVIRONMENT, "1.1.0"),
    (env("ADD", CNI_NETNS=None), config(), errors.INVALID_ENVIRONMENT, "1.1.0"),
    (env("CHECK", CNI_NETNS="relative/ns"), config(), errors.INVALID_ENVIRONMENT, "1.1.0"),
    (env("ADD", CNI_ARGS="novalue"), config("0.4.0"), errors.INVALID_ENVIRONMENT, "0.4.0"),
])
def test_parse_errors_are_protocol_errors(environ, stdin, expect_code, expect_version, monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", lambda plugin: pytest.fail("a bad request reached the verbs"))
    out, code, log = run(environ, stdin)
    assert code == 1
    assert_error(out, code, expect_code, expect_version)
    assert "failed" in log  # logged to the stderr stream


def test_unknown_command_names_the_command() -> None:
    out, code, _ = run(env("UPDATE"), config())
    answer = assert_error(out, code, errors.INVALID_ENVIRONMENT, "1.1.0")
    assert "UPDATE" in answer["msg"]
    assert "ADD" in answer["details"]


# -- dispatch to the verbs (faked) -----------------------------------------------------


def _fake_verbs(calls: list, result: Result | None = None, raise_exc: BaseException | None = None):
    def verb(req, parsed, ctx):
        assert parsed == ("parsed", req.config["name"])
        assert isinstance(ctx, CallContext)
        calls.append(req)
        if raise_exc is not None:
            raise raise_exc
        return result

    def parse(raw):
        return ("parsed", raw["name"])

    return lambda plugin: PluginVerbs(parse_config=parse,
                                      verbs={name: verb for name in ("ADD", "DEL", "CHECK", "GC", "STATUS")})


SAMPLE = Result(
    interfaces=(Interface(name="fan-250-0-28", mac="0a:58:fa:00:1c:01", mtu=1450),
                Interface(name="eth0", mac="0a:58:fa:00:1c:02", mtu=1450, sandbox="/var/run/netns/x")),
    ips=(IPConfig(address="250.0.28.2/24", gateway="250.0.28.1", interface=1),),
    routes=(Route(dst="0.0.0.0/0", gw="250.0.28.1"),),
    dns={"nameservers": ["10.96.0.10"]},
)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_result_is_answered_in_the_asked_version(version: str, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(runner, "_plugin", _fake_verbs(calls, SAMPLE))
    out, code, _ = run(env("ADD"), config(version))
    assert code == 0
    assert json.loads(out) == SAMPLE.to_dict(version)
    assert json.loads(out)["cniVersion"] == version
    assert [c.command for c in calls] == ["ADD"]


def test_the_verb_gets_the_config_parsed_once_and_the_callers_context(monkeypatch) -> None:
    parsed: list = []
    seen: list = []

    def parse(raw):
        parsed.append(raw)
        return ("parsed", raw["name"])

    def verb(req, config, ctx):
        seen.append((config, ctx))

    monkeypatch.setattr(runner, "_plugin", lambda plugin: PluginVerbs(parse_config=parse, verbs={"DEL": verb}))
    context = CallContext(netns_fds={"/var/run/netns/x": 7}, client_alive=lambda: False, log_stream=io.StringIO())
    out, code = runner.run_local("fan", env("DEL"), config(), context)
    assert (out, code) == (b"", 0)
    assert parsed == [json.loads(config())]
    assert seen == [(("parsed", "fannet"), context)]


def test_the_standalone_context_has_nothing_preopened_and_a_live_client(capsys) -> None:
    context = CallContext.standalone()
    assert dict(context.netns_fds) == {} and context.client_alive() is True
    assert context.log_sink is sys.stderr  # this process's stderr, looked up when the call logs


@pytest.mark.parametrize("command", ["DEL", "CHECK", "GC", "STATUS"])
def test_other_verbs_print_nothing_on_success(command: str, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(runner, "_plugin", _fake_verbs(calls))
    out, code, _ = run(env(command), config("1.1.0"))
    assert (out, code) == (b"", 0)
    assert [c.command for c in calls] == [command]


def test_a_verbs_cni_error_is_passed_through(monkeypatch) -> None:
    exc = CniError(errors.POOL_FULL, "no free address in 250.0.28.0/24", "253 of 253 in use")
    monkeypatch.setattr(runner, "_plugin", _fake_verbs([], raise_exc=exc))
    out, code, log = run(env("ADD"), config("1.0.0"))
    answer = assert_error(out, code, errors.POOL_FULL, "1.0.0")
    assert answer["details"] == "253 of 253 in use"
    assert "no free address" in log


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("ifindex"), OSError(13, "Permission denied"),
                                 ZeroDivisionError("x")])
def test_an_internal_exception_becomes_code_100(exc: Exception, monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", _fake_verbs([], raise_exc=exc))
    out, code, log = run(env("ADD"), config("0.4.0"))
    answer = assert_error(out, code, errors.INTERNAL, "0.4.0")
    assert type(exc).__name__ in answer["msg"]
    assert "Traceback" not in out.decode()
    assert "internal error" in log


def test_a_missing_verb_is_an_internal_error_not_a_crash(monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", lambda plugin: PluginVerbs(parse_config=dict, verbs={}))
    out, code, _ = run(env("ADD"), config())
    assert_error(out, code, errors.INTERNAL, "1.1.0")


def test_huge_exception_messages_are_cut(monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", _fake_verbs([], raise_exc=RuntimeError("x" * 10_000)))
    out, code, _ = run(env("ADD"), config())
    assert len(json.loads(out)["msg"]) <= 500


def test_debug_level_logs_the_traceback_to_stderr_only(monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", _fake_verbs([], raise_exc=RuntimeError("boom")))
    out, code, log = run(env("ADD", CNI_FAN_LOG_LEVEL="debug"), config())
    assert "Traceback" in log and "RuntimeError: boom" in log
    assert b"Traceback" not in out


# -- stdout carries the protocol only ---------------------------------------------------


@pytest.mark.parametrize("environ, stdin", [
    ({"CNI_COMMAND": "VERSION"}, b""),
    (env("ADD"), b"{bad"),
    (env("BOGUS"), config()),
    (env("ADD", CNI_CONTAINERID=None), config()),
])
def test_nothing_is_written_to_the_real_stdout(environ, stdin, capfd) -> None:
    stderr = io.StringIO()
    out, _code = runner.run_local("fan", environ, stdin, CallContext(log_stream=stderr))
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""  # the log went to the stream given as stderr
    json.loads(out)


def test_log_level_from_config_and_environment(monkeypatch) -> None:
    monkeypatch.setattr(runner, "_plugin", _fake_verbs([]))
    _, _, log = run(env("DEL"), config(logLevel="error"))
    assert log == ""
    _, _, log = run(env("BOGUS"), config(logLevel="error"))
    assert "ERROR" in log
    # The environment overrides the config.
    _, _, log = run(env("BOGUS", CNI_FAN_LOG_LEVEL="critical"), config(logLevel="debug"))
    assert log == ""


@pytest.mark.parametrize("level", ["shutdown", "basic_format", "getLogger", "nonsense", "", 5, None, ["x"]])
def test_a_strange_log_level_does_not_break_the_call(level, monkeypatch) -> None:
    # logLevel is validated by FanConfig later; logging is set up before that
    # and must not turn every call (even VERSION) into an internal error.
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "1.0.0", "logLevel": level}).encode())
    assert (code, json.loads(out)["cniVersion"]) == (0, "1.0.0")
    out, code, _ = run({"CNI_COMMAND": "VERSION", "CNI_FAN_LOG_LEVEL": str(level)}, b"")
    assert code == 0


def test_log_file_from_the_config(tmp_path) -> None:
    log_file = tmp_path / "fan.log"
    out, code, _ = run(env("BOGUS"), config(logFile=str(log_file)))
    assert code == 1
    assert "BOGUS" in log_file.read_text()


def test_ipam_log_settings_are_read_from_the_ipam_object(tmp_path) -> None:
    log_file = tmp_path / "ipam.log"
    stdin = config(ipam={"type": "fan-ipam", "logFile": str(log_file), "logLevel": "debug"})
    run(env("BOGUS"), stdin, plugin="fan-ipam")
    assert "BOGUS" in log_file.read_text()


def test_an_unopenable_log_file_is_only_a_warning(tmp_path) -> None:
    out, code, log = run({"CNI_COMMAND": "VERSION"}, config(logFile=str(tmp_path)))  # a directory
    assert code == 0
    assert "cannot open logFile" in log


def _main(environ: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess:
    """`fan` run standalone (no plugin server), as the runtime runs it."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, "CNI_FAN_AGENT_SOCKET": "none",
            **environ}
    return subprocess.run([sys.executable, "-c", "from cni_fan.entry import fan_main; fan_main()"],
                          input=stdin, env=full, capture_output=True, timeout=30)


def test_the_standalone_entry_point_writes_only_the_answer_to_stdout() -> None:
    proc = _main({"CNI_COMMAND": "VERSION"}, b"")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}
    proc = _main({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "../x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
                 config("1.0.0"))
    assert proc.returncode == 1
    answer = json.loads(proc.stdout)
    assert (answer["cniVersion"], answer["code"]) == ("1.0.0", errors.INVALID_ENVIRONMENT)
    assert b"CNI_CONTAINERID" in proc.stderr  # the log line went to stderr
    assert b"Traceback" not in proc.stdout + proc.stderr
