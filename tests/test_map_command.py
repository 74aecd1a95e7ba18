"""`cni-fan map`: JSON on stdout, one-line refusals on stderr with exit 2."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from cni_fan.commands import map as map_command


def run_map(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Parse as the `cni-fan` CLI would and run the chosen function."""
    parser = argparse.ArgumentParser(prog="cni-fan")
    map_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["map", *argv])
    assert args.func is map_command.run
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_forward_map_of_the_announcement_example(capsys) -> None:
    code, out, err = run_map(["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28/16"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "overlay": "250.0.0.0/8",
        "underlay": "172.30.0.0/16",
        "host": "172.30.0.28",
        "host_reserve": 1,
        "slice": "250.0.28.0/24",
        "slice_prefixlen": 24,
        "gateway": "250.0.28.1",
        "first": "250.0.28.2",
        "last": "250.0.28.254",
        "capacity": 253,
    }


def test_host_reserve_option(capsys) -> None:
    code, out, _ = run_map(
        ["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28/16", "--host-reserve", "4"], capsys
    )
    answer = json.loads(out)
    assert code == 0
    assert (answer["gateway"], answer["first"], answer["capacity"]) == ("250.0.28.1", "250.0.28.5", 250)


def test_reverse_map(capsys) -> None:
    code, out, err = run_map(
        ["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.0/16", "--reverse", "250.0.28.5"], capsys
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "overlay_address": "250.0.28.5",
        "underlay_host": "172.30.0.28",
        "slice": "250.0.28.0/24",
    }


def test_reverse_accepts_a_host_address_in_the_underlay(capsys) -> None:
    code, out, _ = run_map(
        ["--overlay", "99.0.0.0/8", "--underlay", "10.99.238.5/20", "--reverse", "99.224.80.7"], capsys
    )
    assert code == 0
    assert json.loads(out)["underlay_host"] == "10.99.238.5"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.0/16"],
         "underlay 172.30.0.0/16 names the network, not a host"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28"],
         "underlay '172.30.0.28' has no prefix length"),
        (["--overlay", "10.0.0.0/8", "--underlay", "10.1.0.28/16"],
         "overlay 10.0.0.0/8 overlaps underlay 10.1.0.0/16"),
        (["--overlay", "127.0.0.0/8", "--underlay", "172.30.0.28/16"],
         "overlay 127.0.0.0/8 overlaps 127.0.0.0/8 (loopback"),
        (["--overlay", "250.0.0.0/16", "--underlay", "172.30.0.28/16"], "gives /32 slices"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28/16", "--host-reserve", "x"],
         "--host-reserve must be a whole number, got 'x'"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.28/16", "--host-reserve", "0"],
         "host reserve 0 is below 1"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.0/16", "--reverse", "251.0.0.1"],
         "251.0.0.1 is not in overlay 250.0.0.0/8"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.0/16", "--reverse", "250.0.0.1"],
         "the network address of underlay 172.30.0.0/16, so no host owns it"),
        (["--overlay", "250.0.0.0/8", "--underlay", "172.30.0.0/16", "--reverse", "what"],
         "overlay address 'what' is not an IPv4 address"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, message, capsys) -> None:
    code, out, err = run_map(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("cni-fan map: ")
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_python_m_cni_fan_map_prints_the_slice() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cni_fan", "map",
         "--overlay", "100.64.0.0/10", "--underlay", "10.224.220.10/24"],
        capture_output=True, text=True,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["slice"] == "100.66.128.0/18"


def test_python_m_cni_fan_map_refuses_without_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cni_fan", "map",
         "--overlay", "224.0.0.0/8", "--underlay", "10.0.0.1/24"],
        capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("cni-fan map: overlay 224.0.0.0/8 overlaps 224.0.0.0/4")
    assert "Traceback" not in done.stderr
