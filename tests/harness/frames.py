"""Crafted frames and raw sockets: what the tests send past the kernel's own
stack (forged ARP and IPv4 for the port guard, VXLAN payloads for the
datapath) and how they watch what arrives.

One Internet checksum for all of them (RFC 1071).
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

from harness.system import in_netns, inside

ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q = 0x0003, 0x0800, 0x0806, 0x86DD, 0x8100
BROADCAST = "ff:ff:ff:ff:ff:ff"
PACKET_OUTGOING = 4


def checksum(data: bytes) -> int:
    """The Internet checksum of `data` (IPv4 header, ICMP)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def eth(dst: str, src: str, ethertype: int) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype)


def ipv4_udp(src: str, dst: str, payload: bytes, dport: int = 9) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_bytes(sha), socket.inet_aton(spa),
                       mac_bytes(tha), socket.inet_aton(tpa))


def icmp_echo_frame(dst_mac: str, src_mac: str, src: str, dst: str, ident: int, seq: int = 1) -> bytes:
    """An Ethernet frame carrying an ICMP echo request: the inner frame of a VXLAN packet."""
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"cni-fan-test" * 4)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0x4000, 64, 1, 0,
                                   ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return eth(dst_mac, src_mac, ETH_P_IP) + bytes(header) + bytes(icmp)


def vxlan_header(vni: int) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8)


def packet_socket(netns_path: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` of that namespace (sees every frame in and out)."""
    with inside(netns_path):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket, seconds: float = 0.0) -> list[bytes]:
    """Frames the socket's interface received (not the ones it sent), for `seconds`."""
    frames = []
    deadline = time.monotonic() + seconds
    while True:
        try:
            frame, address = sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING:
                frames.append(frame)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return frames
            time.sleep(0.02)


class IcmpWatcher:
    """Counts ICMP echo requests with a given identifier arriving in the
    namespace at `netns_path` (a raw socket sees every ICMP packet delivered
    to the host)."""

    def __init__(self, netns_path: str, ident: int) -> None:
        self.ident = ident
        self.seen = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

        def body() -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            sock.settimeout(0.1)
            self._ready.set()
            try:
                while not self._stop.is_set():
                    try:
                        data = sock.recv(65535)
                    except TimeoutError:
                        continue
                    ihl = (data[0] & 0x0F) * 4
                    if data[ihl] == 8 and struct.unpack_from("!H", data, ihl + 4)[0] == self.ident:
                        self.seen += 1
            finally:
                sock.close()

        def target() -> None:
            try:
                in_netns(netns_path, body)
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(5)
        return self.seen


# -- IPv6 (RFC 8200) --------------------------------------------------------

HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS, NO_NEXT = 0, 43, 44, 60, 59
PADN4 = b"\x01\x04\0\0\0\0"   # an option body that fills an 8-byte header


def ipv6(src: str, dst: str, payload: bytes = b"", *, next_header: int = 17, hop_limit: int = 64,
         traffic_class: int = 0, flow_label: int = 0,
         extensions: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """An IPv6 packet. `extensions`: (header type, body) pairs chained in
    order before the payload; a body is what follows the next-header and
    length bytes (6 + 8k bytes: `PADN4` for options, `fragment_body()`)."""
    chain = [t for t, _ in extensions] + [next_header]
    ext = b""
    for i, (_, body) in enumerate(extensions):
        if (len(body) + 2) % 8:
            raise ValueError("an extension header is a multiple of 8 bytes")
        ext += bytes([chain[i + 1], (len(body) + 2) // 8 - 1]) + body
    word = 6 << 28 | traffic_class << 20 | flow_label
    return struct.pack("!IHBB16s16s", word, len(ext) + len(payload), chain[0], hop_limit,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + ext + payload


def fragment_body(offset: int = 0, more: bool = True, ident: int = 1) -> bytes:
    """The 6 bytes of a fragment header after next-header and reserved."""
    return struct.pack("!HI", offset << 3 | int(more), ident)


def routing_body(segments_left: int = 0, routing_type: int = 253) -> bytes:
    """A routing header with no addresses (253: experimental, RFC 4727)."""
    return bytes([routing_type, segments_left]) + bytes(4)
