"""The raw rtnetlink codec: constants, attributes, and one socket.

For the paths where pyroute2's per-request cost or its coverage does not
fit (docs/architecture.md says which): the port guard's batch on every ADD,
the bulk writer's tens of thousands of messages, and tc filters (pyroute2
does not decode the bpf filter's flags, tag and id). Messages are packed
with `struct`; attributes are read in place by offset, so a dump of many
messages makes no Python object per attribute it does not ask for.

Standard library only. Constants are those of include/uapi/linux/
{netlink,rtnetlink,neighbour,if_link,pkt_sched,pkt_cls}.h, declared once here.
"""
from __future__ import annotations

import os
import select
import socket
import struct
from typing import Iterable, Iterator, NamedTuple

from cni_fan.net.nsenter import switched

# -- netlink ------------------------------------------------------------------------
NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# -- message types -------------------------------------------------------------------
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWQDISC = 36
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46

AF_UNSPEC, AF_INET, AF_BRIDGE, AF_INET6 = 0, 2, 7, 10

# -- links ---------------------------------------------------------------------------
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 4, 10, 18, 20
IFLA_NET_NS_FD, IFLA_EXT_MASK = 28, 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_DATA = 1, 2, 5
VETH_INFO_PEER = 1
IFF_UP = 0x1

# -- addresses -----------------------------------------------------------------------
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS = 1, 2, 3, 8
IFA_F_NODAD = 0x02
IFLA_BRPORT_MODE, IFLA_BRPORT_LEARNING, IFLA_BRPORT_UNICAST_FLOOD = 4, 8, 9
IFLA_BRPORT_PROXYARP, IFLA_BRPORT_PROXYARP_WIFI = 10, 12
IFLA_BRPORT_MCAST_FLOOD, IFLA_BRPORT_BCAST_FLOOD, IFLA_BRPORT_NEIGH_SUPPRESS = 27, 30, 32

# -- neighbours ----------------------------------------------------------------------
NDA_DST, NDA_LLADDR, NDA_IFINDEX, NDA_MASTER, NDA_PROTOCOL = 1, 2, 8, 9, 12
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF, NTF_MASTER = 0x02, 0x04

# -- routes --------------------------------------------------------------------------
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
RTN_UNICAST, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_TABLE_MAIN = 1, 0, 253, 254
RTPROT_BOOT = 3
RTNH_F_ONLINK = 0x4

# -- tc ------------------------------------------------------------------------------
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG, TCA_BPF_ID = 6, 7, 8, 10, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
TC_H_MIN_INGRESS, TC_H_MIN_EGRESS = 0xFFF2, 0xFFF3
ETH_P_ALL = 0x0003

# -- fixed headers ---------------------------------------------------------------------
NLMSGHDR = struct.Struct("=IHHII")      # length, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")    # family, type, index, flags, change
NDMSG = struct.Struct("=BxxxiHBB")      # family, ifindex, state, flags, type
TCMSG = struct.Struct("=BxxxiIII")      # family, ifindex, handle, parent, info
RTMSG = struct.Struct("=BBBBBBBBI")     # family, dst_len, src_len, tos, table, protocol, scope, type, flags
IFADDRMSG = struct.Struct("=BBBBi")     # family, prefixlen, flags, scope, index
RTA = struct.Struct("=HH")              # attribute header: length, type
_U32 = struct.Struct("=I")


# -- encoding --------------------------------------------------------------------------

def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = RTA.size + len(payload)
    return RTA.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A whole netlink message: header, then `body`."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


# -- decoding: attributes are read where they lie ------------------------------------------------

def parse_attrs(data: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Every attribute in data[start:end], by type (the last of a type wins)."""
    end = len(data) if end is None else end
    out: dict[int, bytes] = {}
    while start + RTA.size <= end:
        length, kind = RTA.unpack_from(data, start)
        if length < RTA.size or start + length > end:
            break
        out[kind & NLA_TYPE_MASK] = data[start + RTA.size:start + length]
        start += (length + 3) & ~3
    return out


def find_attr(data: bytes, kind: int, start: int = 0, end: int | None = None) -> bytes | None:
    """The payload of the first attribute of type `kind` in data[start:end]; nothing else is copied.

    For streams of many messages (the bulk writer's route dumps), where a
    dict per message would be the cost; so the type is compared as sent
    (a nested attribute's type carries NLA_F_NESTED: use parse_attrs).
    """
    end = len(data) if end is None else end
    while start + RTA.size <= end:
        length, k = RTA.unpack_from(data, start)
        if length < RTA.size:
            return None
        if k == kind:
            return data[start + RTA.size:start + length] if start + length <= end else None
        start += (length + 3) & ~3
    return None


def u32(raw: bytes | None) -> int | None:
    return _U32.unpack_from(raw)[0] if raw is not None and len(raw) >= 4 else None


def cstr(raw: bytes | None) -> str | None:
    """A NUL-terminated string attribute."""
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


def mac_text(raw: bytes | None) -> str | None:
    return ":".join(f"{b:02x}" for b in raw) if raw else None


def family_of(ip: str) -> int:
    """AF_INET6 or AF_INET for an address in text."""
    return AF_INET6 if ":" in ip else AF_INET


def ip_bytes(ip: str) -> tuple[int, bytes]:
    """(family, the address as an attribute carries it) of an IPv4 or IPv6 address in text."""
    family = family_of(ip)
    return family, socket.inet_pton(family, ip)


def mac_bytes(mac: str) -> bytes:
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


# -- the socket ----------------------------------------------------------------------------------

class Reply(NamedTuple):
    """One answer of the kernel to one request: an error code (0 = ok) or a message body."""
    errno: int
    type: int = 0
    body: bytes = b""


Request = tuple[int, int, bytes]   # (message type, flags, body); NLM_F_REQUEST and seq are added on sending


class Rtnl:
    """A raw NETLINK_ROUTE socket, bound to the namespace it was created in.

    `batch` sends many requests in one `send` and returns one Reply each;
    `dump` yields the messages of a dump; `send_all` streams prebuilt
    messages without acknowledgements and returns the errnos the kernel
    reported. `buffer_bytes` sizes the socket's buffers for streaming.
    """
    CHUNK = 64
    TIMEOUT = 30.0

    def __init__(self, buffer_bytes: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        if buffer_bytes:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self.sock.bind((0, 0))
        self.sock.settimeout(self.TIMEOUT)  # a lost answer becomes an error, not a hang
        self.seq = 0

    @classmethod
    def in_netns(cls, netns: int | str, buffer_bytes: int | None = None) -> "Rtnl":
        """A socket in another namespace: a descriptor, a path, or a name under /var/run/netns."""
        if isinstance(netns, int):
            with switched(netns):
                return cls(buffer_bytes)
        fd = os.open(netns if "/" in netns else f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with switched(fd):
                return cls(buffer_bytes)
        finally:
            os.close(fd)

    @classmethod
    def adopt(cls, fd: int) -> "Rtnl":
        """A NETLINK_ROUTE socket opened elsewhere (the thin client, in a pod); takes `fd` over.

        Not bound here: a socket that was used before is bound already, and
        an unbound one is bound by the kernel at its first send.
        """
        self = cls.__new__(cls)
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(cls.TIMEOUT)
        self.seq = 0
        return self

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- requests with one answer each -----------------------------------------------
    def batch(self, requests: Iterable[Request]) -> list[Reply]:
        """One Reply per request, in order.

        Sent CHUNK at a time: every request gets its own ack, and a few
        hundred acks would overflow the socket's receive buffer.
        """
        requests = list(requests)
        out: list[Reply] = []
        for start in range(0, len(requests), self.CHUNK):
            out += self._batch(requests[start:start + self.CHUNK])
        return out

    def _batch(self, requests: list[Request]) -> list[Reply]:
        if not requests:
            return []
        first = self.seq + 1
        self.sock.send(b"".join(message(kind, flags | NLM_F_REQUEST, self.next_seq(), body)
                                for kind, flags, body in requests))
        pending = set(range(first, self.seq + 1))
        replies: list[Reply | None] = [None] * len(requests)
        while pending:
            data = self.sock.recv(1 << 16)
            for kind, seq, start, end in self._messages(data):
                if seq not in pending:
                    continue
                pending.discard(seq)
                if kind == NLMSG_ERROR:
                    replies[seq - first] = Reply(-struct.unpack_from("=i", data, start)[0])
                else:
                    replies[seq - first] = Reply(0, kind, data[start:end])
        return replies  # type: ignore[return-value]

    # -- dumps ----------------------------------------------------------------------------
    def dump(self, kind: int, body: bytes) -> Iterator[tuple[int, bytes, int, int]]:
        """(message type, buffer, start, end) of each message of a dump; its body is buffer[start:end].

        Raises OSError when the kernel refuses the dump.
        """
        seq = self.next_seq()
        self.sock.send(message(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):  # inline, not _messages: dumps can be very long
                length, msg_kind, _flags, msg_seq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    break
                start, end = offset + NLMSGHDR.size, offset + length
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if msg_kind == NLMSG_DONE:
                    return
                if msg_kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, start)[0]
                    raise OSError(code, f"netlink dump {kind} failed: {os.strerror(code)}")
                yield msg_kind, data, start, end

    @staticmethod
    def _messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
        """(type, seq, body start, body end) of each message in a received buffer."""
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size:
                break
            yield kind, seq, offset + NLMSGHDR.size, offset + length
            offset += (length + 3) & ~3

    # -- streaming ----------------------------------------------------------------------------
    def send_all(self, messages: Iterable[bytes], chunk: int = 1 << 16) -> list[int]:
        """Stream prebuilt messages (their own seq, no ACK flag); returns the errnos of those refused.

        The kernel answers only failures; a final acknowledged request
        tells when it has processed everything before it.
        """
        failures: list[int] = []
        buf: list[bytes] = []
        size = 0
        for msg in messages:
            buf.append(msg)
            size += len(msg)
            if size >= chunk:
                self.sock.send(b"".join(buf))
                buf, size = [], 0
                failures += [e for _, e in self._errors(block=False) if e]
        if buf:
            self.sock.send(b"".join(buf))
        fence = self.next_seq()
        self.sock.send(message(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_ACK, fence,
                               RTMSG.pack(AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, bytes(4))))
        while True:
            got = list(self._errors(block=True))
            failures += [e for s, e in got if e and s != fence]
            if any(s == fence for s, _ in got):
                return failures

    def _errors(self, block: bool) -> Iterator[tuple[int, int]]:
        """(seq, errno) of every NLMSG_ERROR waiting (errno 0 = an ACK); with `block`, of one receive."""
        while block or select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(1 << 20)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
                if kind == NLMSG_ERROR:
                    yield seq, -struct.unpack_from("=i", data, pos + NLMSGHDR.size)[0]
                pos += (length + 3) & ~3
            if block:
                return


def check(replies: list[Reply], what: list[tuple[str, tuple[int, ...]]]) -> tuple[str, int] | None:
    """(label, errno) of the first request that failed with an errno it does not tolerate, else None."""
    for reply, (label, tolerated) in zip(replies, what):
        if reply.errno and reply.errno not in tolerated:
            return label, reply.errno
    return None
