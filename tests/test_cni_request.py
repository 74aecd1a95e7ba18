"""parse_request: the CNI environment and stdin, validated as SPEC 1.1.0 and
FACTS.md section 3 say, with the error code the spec gives for each fault.

Pure: no root, no kernel, no files.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_fan.cni import errors
from cni_fan.cni.errors import CniError
from cni_fan.cni.request import (
    COMMANDS,
    MAX_STDIN,
    CniRequest,
    error_version,
    parse_cni_args,
    parse_request,
)
from cni_fan.cni.versions import SUPPORTED_VERSIONS, version_at_least

ALL_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# The codes parse_request may answer with: the spec's own set (FACTS.md 3).
SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}


def config(version: str | None = "1.1.0", **extra) -> bytes:
    raw: dict = {"name": "fannet", "type": "fan"}
    if version is not None:
        raw["cniVersion"] = version
    raw.update(extra)
    return json.dumps(raw).encode()


def environ(command: str | None = "ADD", **over: str | None) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "3f2a9c0d1e",
        "CNI_NETNS": "/var/run/netns/cni-1234",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def code_of(env: dict[str, str], stdin: bytes) -> int:
    with pytest.raises(CniError) as info:
        parse_request(env, stdin)
    return info.value.code


# -- every command ----------------------------------------------------------------


def test_versions_module_matches_the_spec_list() -> None:
    assert SUPPORTED_VERSIONS == ALL_VERSIONS
    assert set(COMMANDS) == {"ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_is_parsed_in_every_version(version: str) -> None:
    req = parse_request(environ("ADD", CNI_ARGS="K8S_POD_NAME=web;K8S_POD_NAMESPACE=default"), config(version))
    assert isinstance(req, CniRequest)
    assert req.command == "ADD"
    assert req.cni_version == version
    assert req.config["name"] == "fannet"
    assert req.container_id == "3f2a9c0d1e"
    assert req.netns == "/var/run/netns/cni-1234"
    assert req.ifname == "eth0"
    assert req.args == {"K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "default"}
    assert req.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert req.attachment == ("3f2a9c0d1e", "eth0")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_is_parsed_in_every_version(version: str) -> None:
    req = parse_request(environ("DEL"), config(version))
    assert (req.command, req.cni_version, req.ifname) == ("DEL", version, "eth0")


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_from_0_4_0(version: str) -> None:
    req = parse_request(environ("CHECK"), config(version))
    assert (req.command, req.cni_version) == ("CHECK", version)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_below_0_4_0_is_an_incompatible_version(version: str) -> None:
    assert code_of(environ("CHECK"), config(version)) == errors.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_need_no_attachment(command: str) -> None:
    # The runtime sets no container, netns or ifname for these verbs.
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
    stdin = config("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]})
    req = parse_request(env, stdin)
    assert (req.command, req.cni_version) == (command, "1.1.0")
    assert req.container_id == req.ifname == req.netns == ""
    assert req.path == ("/opt/cni/bin",)
    assert req.config["cni.dev/valid-attachments"] == [{"containerID": "a", "ifname": "eth0"}]


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_gc_and_status_below_1_1_0_are_incompatible(command: str, version: str) -> None:
    assert code_of(environ(command), config(version)) == errors.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_still_need_a_network_name(command: str) -> None:
    stdin = json.dumps({"cniVersion": "1.1.0"}).encode()
    assert code_of({"CNI_COMMAND": command}, stdin) == errors.INVALID_CONFIG


# -- the command itself ----------------------------------------------------------


@pytest.mark.parametrize("command", [None, "", "add", "Add", "DELETE", "UPDATE", "ADD ", "VERSION\n", "x" * 500,
                                     "ADD\x00"])
def test_missing_or_unknown_command_is_invalid_environment(command) -> None:
    with pytest.raises(CniError) as info:
        parse_request(environ(command), config())
    assert info.value.code == errors.INVALID_ENVIRONMENT
    assert "CNI_COMMAND" in info.value.msg
    assert len(info.value.msg) < 200  # a huge value is not echoed back whole


# -- VERSION --------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"", b"  \n", b"\n\t"])
def test_version_without_stdin_answers_in_the_newest_version(stdin: bytes) -> None:
    req = parse_request({"CNI_COMMAND": "VERSION"}, stdin)
    assert req.command == "VERSION"
    assert req.cni_version == "1.1.0"
    assert req.config == {}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_version_with_stdin_answers_in_the_asked_version(version: str) -> None:
    stdin = json.dumps({"cniVersion": version}).encode()  # VERSION gets no name
    req = parse_request({"CNI_COMMAND": "VERSION"}, stdin)
    assert req.cni_version == version


def test_version_ignores_the_attachment_environment() -> None:
    env = environ("VERSION", CNI_CONTAINERID="../bad", CNI_IFNAME="a/b", CNI_NETNS="relative", CNI_ARGS="bad")
    assert parse_request(env, b"").cni_version == "1.1.0"


def test_version_with_an_object_without_cniversion_answers_in_the_newest() -> None:
    assert parse_request({"CNI_COMMAND": "VERSION"}, b"{}").cni_version == "1.1.0"


@pytest.mark.parametrize("stdin, code", [
    (b"{not json", errors.DECODE_FAILURE),
    (b"[1, 2]", errors.DECODE_FAILURE),
    (b'"1.1.0"', errors.DECODE_FAILURE),
    (b'{"cniVersion": "2.0.0"}', errors.INCOMPATIBLE_VERSION),
    (b'{"cniVersion": "0.2.0"}', errors.INCOMPATIBLE_VERSION),
    (b'{"cniVersion": 1}', errors.INCOMPATIBLE_VERSION),
])
def test_version_with_bad_stdin(stdin: bytes, code: int) -> None:
    assert code_of({"CNI_COMMAND": "VERSION"}, stdin) == code


# -- decoding stdin --------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("stdin", [
    b"", b"   ", b"{", b"{'cniVersion': '1.1.0'}", b'{"cniVersion": "1.1.0",}', b"\xff\xfe\x00garbage",
    b'{"name": "a"} trailing', b"\x00",
])
def test_bad_json_is_a_decode_failure(command: str, stdin: bytes) -> None:
    assert code_of(environ(command), stdin) == errors.DECODE_FAILURE


@pytest.mark.parametrize("stdin", [b"[]", b"null", b"1", b'"text"', b"true", b'[{"cniVersion": "1.1.0"}]'])
def test_json_that_is_not_an_object_is_a_decode_failure(stdin: bytes) -> None:
    assert code_of(environ("ADD"), stdin) == errors.DECODE_FAILURE


def test_oversized_stdin_is_a_decode_failure() -> None:
    stdin = config(pad="x" * MAX_STDIN)
    assert code_of(environ("ADD"), stdin) == errors.DECODE_FAILURE


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_a_decode_failure_not_a_crash(opener: bytes) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting.
    assert code_of(environ("ADD"), opener * 200_000) == errors.DECODE_FAILURE
    assert code_of({"CNI_COMMAND": "VERSION"}, opener * 200_000) == errors.DECODE_FAILURE


def test_utf8_bom_and_whitespace_around_the_object_are_accepted() -> None:
    for stdin in (b"\n  " + config() + b"\n", b"\xef\xbb\xbf" + config()):
        assert parse_request(environ("ADD"), stdin).cni_version == "1.1.0"


# -- cniVersion -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_missing_cniversion_is_an_incompatible_version(command: str) -> None:
    assert code_of(environ(command), config(None)) == errors.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("version", ["", "0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.1", "1.1.0 ", "v1.1.0", 110, 1.1,
                                     None, ["1.1.0"], {"v": "1.1.0"}, True])
def test_unsupported_or_malformed_cniversion_is_an_incompatible_version(version) -> None:
    stdin = json.dumps({"cniVersion": version, "name": "fannet"}).encode()
    with pytest.raises(CniError) as info:
        parse_request(environ("ADD"), stdin)
    assert info.value.code == errors.INCOMPATIBLE_VERSION
    assert "1.1.0" in str(info.value)  # says what is supported


# -- network name -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fannet", "a", "0", "k8s-pod-network", "net_1.2", "A" * 200])
def test_valid_network_names(name: str) -> None:
    stdin = json.dumps({"cniVersion": "1.0.0", "name": name}).encode()
    assert parse_request(environ("ADD"), stdin).config["name"] == name


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("name", [None, "", "-net", "_net", ".net", "net/x", "../etc", "net work", "net\n", "net\x00",
                                  "nét", 5, ["fannet"], {"n": 1}, True])
def test_missing_or_invalid_network_name_is_invalid_config(command: str, name) -> None:
    raw = {"cniVersion": "1.1.0"}
    if name is not None:
        raw["name"] = name
    assert code_of(environ(command), json.dumps(raw).encode()) == errors.INVALID_CONFIG


# -- CNI_CONTAINERID ----------------------------------------------------------------


@pytest.mark.parametrize("cid", ["a", "0", "abc-DEF_1.2", "f" * 64, "x" * 256])
def test_valid_container_ids(cid: str) -> None:
    assert parse_request(environ("ADD", CNI_CONTAINERID=cid), config()).container_id == cid


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("cid", [None, "", "../x", "..", ".hidden", "a/b", "a b", " a", "a\x00b", "\x00", "-rf",
                                 "_a", "a" * 300, "a" * 257, "abc\n", "a\tb", "ä", "a:b", "a;b"])
def test_missing_or_invalid_container_id_is_invalid_environment(command: str, cid) -> None:
    assert code_of(environ(command, CNI_CONTAINERID=cid), config()) == errors.INVALID_ENVIRONMENT


def test_huge_container_id_is_not_echoed_back_whole() -> None:
    with pytest.raises(CniError) as info:
        parse_request(environ("ADD", CNI_CONTAINERID="a" * 5000), config())
    assert len(str(info.value)) < 400


# -- CNI_IFNAME --------------------------------------------------------------------


@pytest.mark.parametrize("ifname", ["eth0", "e", "net1", "a" * 15, "eth0.100", "veth-x_1"])
def test_valid_interface_names(ifname: str) -> None:
    assert parse_request(environ("ADD", CNI_IFNAME=ifname), config()).ifname == ifname


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("ifname", [None, "", "a" * 16, "a" * 100, "eth/0", "/", "eth:0", ":", ".", "..", "eth 0",
                                    " eth0", "eth0\n", "eth\t0", "eth\x00", "\x00"])
def test_missing_or_invalid_interface_name_is_invalid_environment(command: str, ifname) -> None:
    assert code_of(environ(command, CNI_IFNAME=ifname), config()) == errors.INVALID_ENVIRONMENT


# -- CNI_NETNS ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
@pytest.mark.parametrize("netns", [None, ""])
def test_netns_is_required_for_add_and_check(command: str, netns) -> None:
    with pytest.raises(CniError) as info:
        parse_request(environ(command, CNI_NETNS=netns), config())
    assert info.value.code == errors.INVALID_ENVIRONMENT
    assert "CNI_NETNS" in info.value.msg


@pytest.mark.parametrize("netns", [None, ""])
def test_netns_is_optional_for_del(netns) -> None:
    # DEL must succeed when the namespace is already gone (FACTS.md 3).
    req = parse_request(environ("DEL", CNI_NETNS=netns), config())
    assert req.netns == ""


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("netns", ["var/run/netns/x", "./x", "x", "netns", "~/x", "/proc/1/ns/net\x00"])
def test_relative_or_nul_netns_is_invalid_environment(command: str, netns: str) -> None:
    assert code_of(environ(command, CNI_NETNS=netns), config()) == errors.INVALID_ENVIRONMENT


def test_proc_path_netns_is_accepted() -> None:
    assert parse_request(environ("ADD", CNI_NETNS="/proc/4242/ns/net"), config()).netns == "/proc/4242/ns/net"


# -- CNI_ARGS ----------------------------------------------------------------------


@pytest.mark.parametrize("raw, parsed", [
    ("", {}),
    ("K=V", {"K": "V"}),
    ("K=V;K2=V2", {"K": "V", "K2": "V2"}),
    ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc",
     {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0",
      "K8S_POD_INFRA_CONTAINER_ID": "abc"}),
    ("K=", {"K": ""}),
    ("K=a=b", {"K": "a=b"}),
    ("TOKEN=abc==;X=1=2=3", {"TOKEN": "abc==", "X": "1=2=3"}),
    ("K=V;", {"K": "V"}),
    ("K=1;K=2", {"K": "2"}),
])
def test_cni_args_are_parsed(raw: str, parsed: dict) -> None:
    assert parse_cni_args(raw) == parsed
    assert parse_request(environ("ADD", CNI_ARGS=raw), config()).args == parsed


@pytest.mark.parametrize("raw", ["K", "K=V;X", "=V", "K=V;=W", "justtext", "K=V;K2"])
def test_bad_cni_args_pairs_are_invalid_environment(raw: str) -> None:
    with pytest.raises(CniError) as info:
        parse_cni_args(raw)
    assert info.value.code == errors.INVALID_ENVIRONMENT
    assert code_of(environ("ADD", CNI_ARGS=raw), config()) == errors.INVALID_ENVIRONMENT


def test_nul_in_cni_args_is_invalid_environment() -> None:
    assert code_of(environ("ADD", CNI_ARGS="K=V\x00"), config()) == errors.INVALID_ENVIRONMENT


def test_cni_path_is_split_and_empty_parts_dropped() -> None:
    assert parse_request(environ("ADD", CNI_PATH="/a::/b:"), config()).path == ("/a", "/b")
    assert parse_request(environ("ADD", CNI_PATH=None), config()).path == ()


# -- error_version -------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_error_version_is_the_configs_when_supported(version: str) -> None:
    assert error_version(config(version)) == version


@pytest.mark.parametrize("stdin", [
    b"", b"not json", b"[]", b"null", b'"x"', b"{}", b'{"cniVersion": "9.9.9"}', b'{"cniVersion": 1}',
    b'{"cniVersion": ["1.0.0"]}', b'{"cniVersion": {"a": 1}}', b"\xff", pytest.param(b"[" * 200_000, id="deep"),
])
def test_error_version_falls_back_to_the_newest(stdin: bytes) -> None:
    assert error_version(stdin) == "1.1.0"


# -- order of checks ---------------------------------------------------------------


def test_command_is_checked_before_stdin() -> None:
    assert code_of({"CNI_COMMAND": "BOGUS"}, b"not json") == errors.INVALID_ENVIRONMENT


def test_version_is_checked_before_the_environment() -> None:
    env = environ("ADD", CNI_CONTAINERID="../x")
    assert code_of(env, config("7.0.0")) == errors.INCOMPATIBLE_VERSION


# -- fuzz: only CniError, only spec codes ---------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_env_value = st.one_of(
    _text,
    st.sampled_from(["", "ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "eth0", "/var/run/netns/x", "abc",
                     "../x", "K=V;K2=V2", "=", ";", "a" * 16, "x" * 300, "\x00"]),
)
_env_key = st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
                            "PATH", "HOME"])
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)
_config_like = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.one_of(st.sampled_from(ALL_VERSIONS + ("0.2.0", "2.0.0", "")), _json_value),
        "name": st.one_of(st.sampled_from(["fannet", "", "-x", "a b"]), _json_value),
        "type": _json_value,
        "ipam": _json_value,
        "prevResult": _json_value,
    },
).map(lambda d: json.dumps(d).encode())
_stdin = st.one_of(st.binary(max_size=200), _config_like, _json_value.map(lambda v: json.dumps(v).encode()))


def _check_outcome(env: dict[str, str], stdin: bytes) -> None:
    try:
        req = parse_request(env, stdin)
    except CniError as exc:
        assert exc.code in SPEC_CODES
        assert isinstance(exc.msg, str) and exc.msg
        d = exc.to_dict(error_version(stdin))
        assert d["cniVersion"] in SUPPORTED_VERSIONS
        json.dumps(d)  # always serialisable
        return
    assert req.command in COMMANDS
    assert req.cni_version in SUPPORTED_VERSIONS
    if req.command == "CHECK":
        assert version_at_least(req.cni_version, "0.4.0")
    if req.command in ("GC", "STATUS"):
        assert req.cni_version == "1.1.0"
    if req.command in ("ADD", "DEL", "CHECK"):
        assert req.container_id and req.ifname
        assert len(req.ifname) <= 15 and "\n" not in req.ifname + req.container_id
        assert not req.netns or req.netns.startswith("/")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=st.dictionaries(_env_key, _env_value, max_size=8), stdin=_stdin)
def test_fuzz_random_env_and_stdin_only_raise_cni_errors(env: dict[str, str], stdin: bytes) -> None:
    _check_outcome(env, stdin)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), over=st.dictionaries(_env_key, _env_value, max_size=4), stdin=_stdin)
def test_fuzz_valid_command_with_random_env_and_stdin(command: str, over: dict[str, str], stdin: bytes) -> None:
    env = environ(command)
    env.update(over)
    env["CNI_COMMAND"] = command
    _check_outcome(env, stdin)
