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
A6, R_A6, R_B6, B6 = "fd00:31::1", "fd00:31::fe", "fd00:32::fe", "fd00:32::1"
NOBODY6 = "fd00:32::99"
NARROW_MTU = 1400
IP_HEADER, ICMP_HEADER = 20, 8
IPV6_HEADER = 40


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


# -- the ICMPv6 codec (pure): the socket gives the message alone, no IPv6 header ---------

def _ipv6_header(src: str, dst: str, payload_len: int, *, next_header: int = 58, hops: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, next_header, hops,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))


def test_an_echo6_request_leaves_the_checksum_to_the_kernel() -> None:
    request = icmp.echo_request6(0x1234, 7, b"abc")
    assert struct.unpack("!BBHHH", request[:8]) == (icmp.ECHO6_REQUEST, 0, 0, 0x1234, 7) and request[8:] == b"abc"


def test_parse6_names_replies_requests_and_errors_by_the_echo_they_are_about() -> None:
    request = icmp.echo_request6(0xBEEF, 3, bytes(16))
    reply = bytes([icmp.ECHO6_REPLY]) + request[1:]
    assert icmp.parse6(reply, B6, 63) == icmp.IcmpMessage("reply", B6, 63, 0xBEEF, 3,
                                                          size=IPV6_HEADER + len(request))
    assert icmp.parse6(request, A6).kind == "request"
    quoted = _ipv6_header(A6, B6, len(request)) + request
    expired = struct.pack("!BBHI", 3, 0, 0, 0) + quoted
    assert icmp.parse6(expired, R_A6, 64) == icmp.IcmpMessage("time-exceeded", R_A6, 64, 0xBEEF, 3,
                                                              size=IPV6_HEADER + len(expired))
    too_big = icmp.parse6(struct.pack("!BBHI", 2, 0, 0, NARROW_MTU) + quoted, R_A6)
    assert (too_big.kind, too_big.mtu, too_big.ident, too_big.seq) == ("too-big", NARROW_MTU, 0xBEEF, 3)
    unreachable = icmp.parse6(struct.pack("!BBHI", 1, 3, 0, 0) + quoted, R_A6)
    assert (unreachable.kind, unreachable.code, unreachable.mtu) == ("unreachable", 3, 0)


def test_parse6_refuses_what_is_no_echo_of_ours() -> None:
    request = icmp.echo_request6(1, 1)
    assert icmp.parse6(b"", A6) is None
    assert icmp.parse6(request[:4], A6) is None                                         # truncated
    assert icmp.parse6(struct.pack("!BBHI", 135, 0, 0, 0) + bytes(16), A6) is None       # neighbour solicitation
    udp_quoted = _ipv6_header(A6, B6, 8, next_header=17) + bytes(8)
    assert icmp.parse6(struct.pack("!BBHI", 1, 4, 0, 0) + udp_quoted, R_A6) is None
    hop_by_hop = _ipv6_header(A6, B6, 8 + len(request), next_header=0) + bytes(8) + request
    assert icmp.parse6(struct.pack("!BBHI", 3, 0, 0, 0) + hop_by_hop, R_A6) is None      # not walked


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
            # The outage test takes a link down: IPv6 addresses must survive it.
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.keep_addr_on_down=1",
                            "net.ipv6.conf.default.keep_addr_on_down=1"], check=True)
        _ip("-n", names["a"], "link", "add", "eth0", "type", "veth", "peer", "name", "ra", "netns", names["r"])
        _ip("-n", names["b"], "link", "add", "eth0", "mtu", str(NARROW_MTU), "type", "veth", "peer", "name", "rb",
            "mtu", str(NARROW_MTU), "netns", names["r"])
        for ns, dev, cidr, cidr6 in ((names["a"], "eth0", f"{A}/24", f"{A6}/64"),
                                     (names["r"], "ra", f"{R_A}/24", f"{R_A6}/64"),
                                     (names["r"], "rb", f"{R_B}/24", f"{R_B6}/64"),
                                     (names["b"], "eth0", f"{B}/24", f"{B6}/64")):
            _ip("-n", ns, "addr", "add", cidr, "dev", dev)
            _ip("-n", ns, "addr", "add", cidr6, "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", names["a"], "route", "add", "default", "via", R_A)
        _ip("-n", names["b"], "route", "add", "default", "via", R_B)
        _ip("-n", names["a"], "-6", "route", "add", "default", "via", R_A6)
        _ip("-n", names["b"], "-6", "route", "add", "default", "via", R_B6)
        subprocess.run(["ip", "netns", "exec", names["r"], "sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv6.conf.all.forwarding=1"], check=True)
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("family", [4, 6], ids=["IPv4", "IPv6"])
def test_ping_gets_the_reply_or_the_error_about_its_echo(path, family) -> None:
    """IPv6 the same way: ICMPv6 sockets, the same identifiers, retries and timeouts."""
    b, router, nobody, header = (B, R_A, NOBODY, IP_HEADER) if family == 4 else (B6, R_A6, NOBODY6, IPV6_HEADER)
    reply = probes.ping(path["a"], b)
    assert (reply.kind, reply.src, reply.ttl) == ("reply", b, 63)

    expired = probes.ping(path["a"], b, ttl=1)
    assert (expired.kind, expired.src) == ("time-exceeded", router)

    assert probes.ping(path["a"], nobody, tries=1, timeout=0.5) is None

    fits = NARROW_MTU - header - ICMP_HEADER
    assert probes.ping(path["a"], b, payload=fits).kind == "reply"
    too_big = probes.ping(path["a"], b, payload=fits + 1)
    if family == 4:
        assert (too_big.kind, too_big.code, too_big.mtu, too_big.src) == ("unreachable", 4, NARROW_MTU, router)
    else:
        assert (too_big.kind, too_big.mtu, too_big.src) == ("too-big", NARROW_MTU, router)
    with pytest.raises(OSError):  # `a` has learned the path's MTU: the next one is refused before it leaves
        probes.ping(path["a"], b, payload=fits + 1)


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


# -- IPv6 on the same path: ICMPv6 sockets, the same identifiers, retries and timeouts ------------

@pytest.mark.kernel
@needs_root
def test_a_watcher6_in_the_destination_sees_the_request_arrive(path) -> None:
    with probes.icmp_socket(path["b"], family=socket.AF_INET6) as watch:
        answer = probes.ping(path["a"], B6, ttl=9)
        seen = probes.receive(watch, lambda m: m.kind == "request" and (m.ident, m.seq) == (answer.ident, answer.seq),
                              timeout=2.0)
    assert seen is not None and (seen.src, seen.ttl) == (A6, 8)


@pytest.mark.kernel
@needs_root
def test_ping_all_mixes_families_each_pair_on_its_own(path) -> None:
    pairs = [(path["a"], B6), (path["b"], A6), (path["a"], B), (path["a"], "fd00:31:0::fe"), (path["a"], NOBODY6)]
    rtts = probes.ping_all(pairs, timeout=2.0)
    assert set(rtts) == set(pairs)
    assert all(rtts[pair] is not None for pair in pairs[:4]), rtts  # R_A6 written another way still counts
    assert rtts[(path["a"], NOBODY6)] is None


@pytest.mark.kernel
@needs_root
def test_a_pinger6_sees_replies(path) -> None:
    with probes.Pinger(path["a"], B6, interval=0.02) as pinger:
        assert pinger.wait_replies(5)
        sent, received = pinger.stop()
    assert received >= 5 and not pinger.missing()
