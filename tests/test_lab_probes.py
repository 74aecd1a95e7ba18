"""The lab's ICMP probes (cni_fan.lab.icmp, cni_fan.lab.probes).

The codec on hand-made packets, then the probes on a real path: namespace
`a` and `b` joined through a router `r` whose link towards `b` has a
smaller MTU, so a ping can come back as a reply, a "time exceeded" (TTL
1) or a "fragmentation needed" that names the MTU.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import time
from typing import Iterator

import pytest

from cni_fan.lab import icmp, probes

A, R_A, R_B, B = "198.18.31.1", "198.18.31.254", "198.18.32.254", "198.18.32.1"
NOBODY = "198.18.32.99"
NARROW_MTU = 1400
IP_HEADER, ICMP_HEADER = 20, 8


# -- the codec (pure) ---------------------------------------------------------------

def _ipv4(src: str, dst: str, body: bytes, *, ttl: int = 64, proto: int = 1) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP_HEADER + len(body), 1, 0, ttl, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + body


def _reply_to(request: bytes) -> bytes:
    reply = bytearray(request)
    reply[0], reply[2:4] = icmp.ECHO_REPLY, b"\0\0"
    reply[2:4] = icmp.checksum(bytes(reply)).to_bytes(2, "big")
    return bytes(reply)


def test_an_echo_request_carries_a_valid_checksum_and_its_numbers() -> None:
    request = icmp.echo_request(0x1234, 7, b"abc")
    assert icmp.checksum(request) == 0
    assert struct.unpack("!BBHHH", request[:8])[0::3] == (icmp.ECHO_REQUEST, 0x1234)
    assert struct.unpack("!H", request[6:8])[0] == 7 and request[8:] == b"abc"


def test_parse_names_replies_requests_and_errors_by_the_echo_they_are_about() -> None:
    request = icmp.echo_request(0xBEEF, 3, bytes(16))
    reply = icmp.parse(_ipv4(B, A, _reply_to(request), ttl=63))
    assert reply == icmp.IcmpMessage("reply", B, 63, 0xBEEF, 3, size=IP_HEADER + len(request))
    assert icmp.parse(_ipv4(A, B, request)).kind == "request"

    quoted = _ipv4(A, B, request)[:IP_HEADER + ICMP_HEADER]
    expired = struct.pack("!BBHI", icmp.TIME_EXCEEDED, 0, 0, 0) + quoted
    assert icmp.parse(_ipv4(R_A, A, expired)) == icmp.IcmpMessage("time-exceeded", R_A, 64, 0xBEEF, 3,
                                                                  size=IP_HEADER + len(expired))
    too_big = struct.pack("!BBHHH", icmp.DEST_UNREACHABLE, icmp.FRAGMENTATION_NEEDED, 0, 0, NARROW_MTU) + quoted
    parsed = icmp.parse(_ipv4(R_A, A, too_big))
    assert (parsed.kind, parsed.code, parsed.mtu, parsed.ident, parsed.seq) == ("unreachable", 4, NARROW_MTU, 0xBEEF, 3)


def test_parse_refuses_what_is_no_echo_of_ours() -> None:
    request = icmp.echo_request(1, 1)
    assert icmp.parse(b"") is None
    assert icmp.parse(_ipv4(A, B, request)[:IP_HEADER + 4]) is None                      # truncated
    assert icmp.parse(_ipv4(A, B, struct.pack("!BBHI", 13, 0, 0, 0))) is None           # a timestamp request
    udp_quoted = _ipv4(A, B, bytes(8), proto=17)
    assert icmp.parse(_ipv4(R_A, A, struct.pack("!BBHI", icmp.DEST_UNREACHABLE, 3, 0, 0) + udp_quoted)) is None


# -- the probes on a real path ---------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def path() -> Iterator[dict[str, str]]:
    """a -- r -- b, the r-b link narrower; the namespaces' names by role."""
    prefix = f"tpr{secrets.token_hex(2)}-"
    names = {role: f"{prefix}{role}" for role in ("a", "r", "b")}
    try:
        for name in names.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", names["a"], "link", "add", "eth0", "type", "veth", "peer", "name", "ra", "netns", names["r"])
        _ip("-n", names["b"], "link", "add", "eth0", "mtu", str(NARROW_MTU), "type", "veth", "peer", "name", "rb",
            "mtu", str(NARROW_MTU), "netns", names["r"])
        for ns, dev, cidr in ((names["a"], "eth0", f"{A}/24"), (names["r"], "ra", f"{R_A}/24"),
                              (names["r"], "rb", f"{R_B}/24"), (names["b"], "eth0", f"{B}/24")):
            _ip("-n", ns, "addr", "add", cidr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", names["a"], "route", "add", "default", "via", R_A)
        _ip("-n", names["b"], "route", "add", "default", "via", R_B)
        subprocess.run(["ip", "netns", "exec", names["r"], "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.kernel
@needs_root
def test_ping_gets_the_reply_or_the_error_about_its_echo(path) -> None:
    reply = probes.ping(path["a"], B)
    assert (reply.kind, reply.src, reply.ttl) == ("reply", B, 63)

    expired = probes.ping(path["a"], B, ttl=1)
    assert (expired.kind, expired.src) == ("time-exceeded", R_A)

    assert probes.ping(path["a"], NOBODY, tries=1, timeout=0.5) is None

    fits = NARROW_MTU - IP_HEADER - ICMP_HEADER
    assert probes.ping(path["a"], B, payload=fits).kind == "reply"
    too_big = probes.ping(path["a"], B, payload=fits + 1)
    assert (too_big.kind, too_big.code, too_big.mtu, too_big.src) == ("unreachable", 4, NARROW_MTU, R_A)
    with pytest.raises(OSError):  # `a` has learned the path's MTU: the next one is refused before it leaves
        probes.ping(path["a"], B, payload=fits + 1)


@pytest.mark.kernel
@needs_root
def test_a_watcher_in_the_destination_sees_the_request_arrive(path) -> None:
    with probes.icmp_socket(path["b"]) as watch:
        answer = probes.ping(path["a"], B, ttl=9)
        seen = probes.receive(watch, lambda m: m.kind == "request" and (m.ident, m.seq) == (answer.ident, answer.seq),
                              timeout=2.0)
    assert seen is not None and (seen.src, seen.ttl) == (A, 8)


@pytest.mark.kernel
@needs_root
def test_ping_all_answers_each_pair_on_its_own(path) -> None:
    pairs = [(path["a"], B), (path["b"], A), (path["a"], R_A), (path["a"], NOBODY)]
    rtts = probes.ping_all(pairs, timeout=2.0)
    assert set(rtts) == set(pairs)
    assert all(rtts[pair] is not None and rtts[pair] >= 0 for pair in pairs[:3])
    assert rtts[(path["a"], NOBODY)] is None


@pytest.mark.kernel
@needs_root
def test_a_pinger_sees_an_outage_and_the_traffic_coming_back(path) -> None:
    with probes.Pinger(path["a"], B, interval=0.02) as pinger:
        assert pinger.wait_replies(5)
        try:
            _ip("-n", path["r"], "link", "set", "rb", "down")
            lost_from = pinger.sent
            deadline = time.monotonic() + 10
            while pinger.sent < lost_from + 10 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            _ip("-n", path["r"], "link", "set", "rb", "up")
        back_at = time.time()
        assert pinger.first_reply_after(back_at, timeout=10) is not None
        sent, received = pinger.stop()
    assert 5 <= received < sent
    missing = pinger.missing()
    assert missing and all(seq > lost_from - 5 for seq in missing)
    assert len(missing) <= sent - received
