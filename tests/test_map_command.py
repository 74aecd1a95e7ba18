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


# -- IPv6 overlays (issue 11): the same keys, addresses in the overlay's family ------------


def test_forward_map_of_an_ipv6_overlay_over_an_ipv4_underlay(capsys) -> None:
    code, out, err = run_map(["--overlay", "fd50::/48", "--underlay", "172.30.0.28/16"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "overlay": "fd50::/48",
        "underlay": "172.30.0.0/16",
        "host": "172.30.0.28",
        "host_reserve": 1,
        "slice": "fd50:0:0:1c::/64",
        "slice_prefixlen": 64,
        "gateway": "fd50:0:0:1c::1",
        "first": "fd50:0:0:1c::2",
        "last": "fd50::1c:ffff:ffff:ffff:fffe",
        "capacity": (1 << 64) - 3,
    }


def test_forward_map_of_an_ipv6_overlay_over_an_ipv6_underlay(capsys) -> None:
    code, out, err = run_map(
        ["--overlay", "fd50::/104", "--underlay", "fd00:198:18::1c/112", "--host-reserve", "2"], capsys
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "overlay": "fd50::/104",
        "underlay": "fd00:198:18::/112",
        "host": "fd00:198:18::1c",
        "host_reserve": 2,
        "slice": "fd50::1c00/120",
        "slice_prefixlen": 120,
        "gateway": "fd50::1c01",
        "first": "fd50::1c03",
        "last": "fd50::1cfe",
        "capacity": 252,
    }


@pytest.mark.parametrize(
    "underlay, address, host",
    [("172.30.0.0/16", "fd50:0:0:1c::5", "172.30.0.28"),
     ("fd00:198:18::/112", "fd50:0:0:1c:ffff::1", "fd00:198:18::1c")],
)
def test_reverse_map_of_an_ipv6_address(underlay: str, address: str, host: str, capsys) -> None:
    code, out, err = run_map(["--overlay", "fd50::/48", "--underlay", underlay, "--reverse", address], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == {"overlay_address": address, "underlay_host": host, "slice": "fd50:0:0:1c::/64"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--overlay", "250.0.0.0/8", "--underlay", "fd00:198:18::1c/112"],
         "underlay 'fd00:198:18::1c/112' is IPv6 but overlay '250.0.0.0/8' is IPv4"),
        (["--overlay", "fd50::/105", "--underlay", "172.30.0.28/16"],
         "gives /121 slices (105 + 32 - 16), fewer than the 256 addresses of an IPv4 /24 slice"),
        (["--overlay", "fd50::1/48", "--underlay", "172.30.0.28/16"],
         "overlay fd50::1/48 has host bits set; did you mean fd50::/48?"),
        (["--overlay", "fe80::/64", "--underlay", "172.30.0.28/16"],
         "overlay fe80::/64 overlaps fe80::/10 (link-local"),
        (["--overlay", "fd00::/8", "--underlay", "fd00:198:18::1c/112"],
         "overlay fd00::/8 overlaps underlay fd00:198:18::/112"),
        (["--overlay", "fd50::/48", "--underlay", "fd00:198:18::1/127"], "is a /127"),
        (["--overlay", "fd50::/48", "--underlay", "fd00:198:18::/112"],
         "underlay fd00:198:18::/112 names the network, not a host"),
        (["--overlay", "fd50::/48", "--underlay", "172.30.0.0/16", "--reverse", "250.0.28.5"],
         "overlay address 250.0.28.5 is IPv4; this fan's overlay fd50::/48 is IPv6"),
        (["--overlay", "fd50::/48", "--underlay", "fd00:198:18::/112", "--reverse", "fd50::9"],
         "fd50::9 maps to fd00:198:18::, the subnet-router anycast address of underlay"),
        (["--overlay", "fd50::/48", "--underlay", "172.30.0.0/16", "--reverse", "fd50::zz"],
         "overlay address 'fd50::zz' is not an IPv6 address"),
    ],
)
def test_bad_ipv6_input_is_one_line_on_stderr_and_exit_2(argv, message, capsys) -> None:
    code, out, err = run_map(argv, capsys)
    assert (code, out) == (2, "")
    assert err.startswith("cni-fan map: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_python_m_cni_fan_map_prints_an_ipv6_slice_and_its_owner() -> None:
    base = [sys.executable, "-m", "cni_fan", "map", "--overlay", "fd50::/48"]
    forward = subprocess.run([*base, "--underlay", "fd00:198:18::1c/112"], capture_output=True, text=True)
    assert (forward.returncode, forward.stderr) == (0, "")
    assert json.loads(forward.stdout)["slice"] == "fd50:0:0:1c::/64"
    reverse = subprocess.run([*base, "--underlay", "172.30.0.0/16", "--reverse", "fd50:0:0:1c::5"],
                             capture_output=True, text=True)
    assert (reverse.returncode, reverse.stderr) == (0, "")
    assert json.loads(reverse.stdout)["underlay_host"] == "172.30.0.28"


def test_python_m_cni_fan_map_refuses_a_mixed_fan_without_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cni_fan", "map", "--overlay", "250.0.0.0/8", "--underlay", "fd00::1/64"],
        capture_output=True, text=True,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("cni-fan map: underlay 'fd00::1/64' is IPv6 but overlay '250.0.0.0/8' is IPv4")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
