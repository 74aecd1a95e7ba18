"""The raw rtnetlink codec (cni_fan/net/rtnl.py) and the tc module on it (cni_fan/net/tc.py).

Encoding and decoding are pure and tested on bytes; the socket is tested
against the real kernel in a namespace of its own.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from typing import Iterator

import pytest

from cni_fan.net import bulk, rtnl, rtnl_links, tc
from cni_fan.net.rtnl import Rtnl
from harness.netlab import Netns


def test_attributes_are_padded_and_read_back() -> None:
    data = rtnl.attr_str(rtnl.IFLA_IFNAME, "eth0") + rtnl.attr_u8(7, 1) + rtnl.attr_u32(rtnl.IFLA_MASTER, 42)
    assert len(data) % 4 == 0
    assert rtnl.attr_str(3, "ab")[:4] == struct.pack("=HH", 7, 3)  # length counts the payload, not the padding
    attrs = rtnl.parse_attrs(data)
    assert rtnl.cstr(attrs[rtnl.IFLA_IFNAME]) == "eth0"
    assert attrs[7] == b"\x01"
    assert rtnl.u32(attrs[rtnl.IFLA_MASTER]) == 42


def test_nested_attributes_keep_their_type_without_the_nested_flag() -> None:
    inner = rtnl.attr_u8(rtnl.IFLA_BRPORT_LEARNING, 0) + rtnl.attr_u8(rtnl.IFLA_BRPORT_PROXYARP_WIFI, 1)
    data = rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.nested(rtnl.IFLA_INFO_SLAVE_DATA, inner))
    outer = rtnl.parse_attrs(data)
    assert list(outer) == [rtnl.IFLA_LINKINFO]
    slave = rtnl.parse_attrs(rtnl.parse_attrs(outer[rtnl.IFLA_LINKINFO])[rtnl.IFLA_INFO_SLAVE_DATA])
    assert slave == {rtnl.IFLA_BRPORT_LEARNING: b"\x00", rtnl.IFLA_BRPORT_PROXYARP_WIFI: b"\x01"}


def test_find_attr_reads_only_within_its_bounds() -> None:
    head = b"\xee" * 12
    first = rtnl.attr(rtnl.RTA_DST, bytes([241, 1, 0, 0])) + rtnl.attr_u32(rtnl.RTA_OIF, 9)
    second = rtnl.attr_u32(rtnl.RTA_OIF, 10)
    data = head + first + second
    assert rtnl.find_attr(data, rtnl.RTA_OIF, 12) == struct.pack("=I", 9)
    assert rtnl.find_attr(data, rtnl.RTA_OIF, 12 + len(first)) == struct.pack("=I", 10)
    assert rtnl.find_attr(data, rtnl.RTA_DST, 12, 12 + 4) is None  # the attribute does not fit in the bound
    assert rtnl.find_attr(data, rtnl.RTA_GATEWAY, 12) is None
    assert rtnl.parse_attrs(data, 12, 12 + len(first)) == {rtnl.RTA_DST: bytes([241, 1, 0, 0]),
                                                           rtnl.RTA_OIF: struct.pack("=I", 9)}


def test_a_truncated_attribute_ends_the_walk() -> None:
    data = rtnl.attr_u32(1, 5) + struct.pack("=HH", 2, 9)  # a header claiming less than its own size
    assert rtnl.parse_attrs(data) == {1: struct.pack("=I", 5)}
    assert rtnl.find_attr(data, 9) is None


def test_a_bpf_filter_message_decodes() -> None:
    options = rtnl.nested(rtnl.TCA_OPTIONS, rtnl.attr_str(rtnl.TCA_BPF_NAME, "cni-fan"),
                          rtnl.attr_u32(rtnl.TCA_BPF_FLAGS, rtnl.TCA_BPF_FLAG_ACT_DIRECT),
                          rtnl.attr_u32(rtnl.TCA_BPF_ID, 77), rtnl.attr(rtnl.TCA_BPF_TAG, bytes(range(8))))
    body = rtnl.TCMSG.pack(0, 5, 1, tc.PARENT["egress"], (3 << 16) | socket.htons(3)) \
        + rtnl.attr_str(rtnl.TCA_KIND, "bpf") + options
    data = b"\0" * 16 + body
    found = tc.decode_filter(5, "egress", data, 16, len(data))
    assert found == tc.AttachedProgram(ifindex=5, hook="egress", prio=3, handle=1, name="cni-fan", prog_id=77,
                                       tag="0001020304050607", direct_action=True, kind="bpf")
    head = rtnl.TCMSG.pack(0, 5, 0, tc.PARENT["egress"], 3 << 16) + rtnl.attr_str(rtnl.TCA_KIND, "bpf")
    assert tc.decode_filter(5, "egress", head, 0, len(head)) is None  # a prio's chain head, no handle


# -- against the kernel -----------------------------------------------------------------------------------

@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    ns = Netns("codec")
    try:
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.ip("link", "set", "d0", "up")
        yield ns.name
    finally:
        ns.delete()


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.kernel
def test_batch_answers_each_request_in_order(netns: str) -> None:
    with Rtnl.in_netns(netns) as sock:
        replies = sock.batch([rtnl_links.getlink("d0"), rtnl_links.getlink("nope0"), rtnl_links.getlink("lo")])
        assert [r.errno for r in replies] == [0, errno.ENODEV, 0]
        assert rtnl_links.link_info(replies[0].body).name == "d0"
        assert rtnl_links.link_info(replies[2].body).index == 1
        # More requests than one chunk: every one still gets its own answer.
        many = sock.batch([rtnl_links.getlink("lo")] * (Rtnl.CHUNK * 2 + 3))
        assert len(many) == Rtnl.CHUNK * 2 + 3 and all(rtnl_links.link_info(r.body).index == 1 for r in many)
        assert rtnl_links.get_link(sock, "nope0") is None


@pytest.mark.kernel
def test_dump_yields_every_link_once(netns: str) -> None:
    with Rtnl.in_netns(netns) as sock:
        body = rtnl.IFINFOMSG.pack(0, 0, 0, 0, 0)
        names = [rtnl_links.link_info(data, start, end).name
                 for _kind, data, start, end in sock.dump(rtnl.RTM_GETLINK, body)]
    assert sorted(names) == ["d0", "d1", "lo"]


@pytest.mark.kernel
def test_send_all_streams_and_reports_only_refusals(netns: str) -> None:
    index = int(_ip(netns, "-o", "link", "show", "d0").split(":")[0])
    _ip(netns, "addr", "add", "198.18.0.1/24", "dev", "d0")
    good = [bulk.neigh_add(100 + i, index, bytes([198, 18, 0, 10 + i]), bytes([2, 0, 0, 0, 0, i])) for i in range(200)]
    bad = bulk.neigh_add(999, 4242, bytes([198, 18, 0, 9]), bytes(6))  # no such device
    with Rtnl.in_netns(netns, buffer_bytes=bulk.BUFFER_BYTES) as sock:
        failures = sock.send_all(good[:100] + [bad] + good[100:], chunk=512)
    assert failures == [errno.ENODEV]
    assert _ip(netns, "neigh", "show", "dev", "d0").count("PERMANENT") == 200


@pytest.mark.kernel
def test_tc_attach_find_and_detach(netns: str) -> None:
    from cni_fan.bpf.insn import R0, Assembler
    from cni_fan.bpf.syscall import load_sched_cls, prog_info

    asm = Assembler()
    asm.mov64_imm(R0, -1)
    asm.exit()
    fd = load_sched_cls(asm.assemble(), name="tcodec_pass")
    try:
        with Rtnl.in_netns(netns) as sock:
            index = rtnl_links.get_link(sock, "d0").index
            assert tc.list_attached(sock, index, "ingress") == []  # no clsact yet: nothing, not an error
            tc.attach(sock, index, fd, "ingress", name="tcodec", prio=2, handle=7)
            tc.attach(sock, index, fd, "ingress", name="tcodec", prio=2, handle=7)  # replaces, no second filter
            [found] = tc.list_attached(sock, index, "ingress")
            assert (found.name, found.prio, found.handle, found.direct_action) == ("tcodec", 2, 7, True)
            assert found.prog_id == prog_info(fd).id
            assert tc.is_attached(sock, index, "ingress", prog_id=found.prog_id, prio=2, handle=7)
            assert tc.find(sock, index, "egress", prio=2, handle=7) is None
            assert tc.detach(sock, index, "ingress", prio=2, handle=7)
            assert not tc.detach(sock, index, "ingress", prio=2, handle=7)
        assert "tcodec" not in _ip(netns, "link", "show")  # sanity: the name is the filter's, not a link's
        out = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", "d0", "ingress"], check=True,
                             capture_output=True, text=True).stdout
        assert "tcodec" not in out
    finally:
        os.close(fd)
