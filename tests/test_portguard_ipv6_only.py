"""The port guard of a pod of an IPv6-only cluster: no IPv4 address, so its program passes no IPv4 or ARP.

Pure (the alias and the program's patched template) and, in the kernel's
BPF_PROG_TEST_RUN, the program's verdicts on crafted frames.
"""
from __future__ import annotations

import os
import socket

import pytest

from cni_fan.bpf import guardprog
from cni_fan.net import portguard
from harness.frames import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, arp, eth, ipv4_udp
from harness.frames6 import echo_body, icmp6_frame, ns_frame, ra_body, udp6
from harness.system import require_kernel_lab

PASS, DROP = guardprog.TC_ACT_UNSPEC & 0xFFFFFFFF, guardprog.TC_ACT_SHOT
MAC, IP6 = "0a:00:00:00:00:05", "fd00:50:0:a::5"
OTHER_MAC, OTHER6 = "0a:00:00:00:00:06", "fd00:50:0:a::6"
GW_MAC, LL = "02:fc:00:0a:00:01", "fe80::800:ff:fe00:5"


def test_alias_names_no_ipv4_address_and_parses_back() -> None:
    alias = portguard.port_alias(None, "0A:00:00:00:00:05", IP6)
    assert alias == "cni-fan - 0a:00:00:00:00:05 fd00:50:0:a::5"
    assert portguard.parse_alias(alias) == (None, MAC) and portguard.alias_ip6(alias) == IP6
    assert portguard.parse_alias("cni-fan - 0a:00:00:00:00:05") is None  # neither family: not ours


def test_the_program_patches_the_same_code_the_assembler_builds() -> None:
    built = guardprog.assemble_guard_program(bytes.fromhex(MAC.replace(":", "")), None,
                                             socket.inet_pton(socket.AF_INET6, IP6))
    assert guardprog.guard_program(MAC, None, IP6) == built
    assert guardprog.guard_program(MAC, None, IP6) != guardprog.guard_program(MAC, None, OTHER6)
    with pytest.raises(ValueError):
        guardprog.guard_program(MAC, None, None)


CASES = {
    "honest echo": (icmp6_frame(OTHER_MAC, MAC, IP6, OTHER6, 128, echo_body(7, b"x" * 8)), PASS),
    "honest UDP": (eth(GW_MAC, MAC, ETH_P_IPV6) + udp6(IP6, "fd00:50:0:b::9", 40000, 53, b"q"), PASS),
    "honest NS": (ns_frame(MAC, IP6, OTHER6), PASS),
    "echo from another pod's address": (icmp6_frame(OTHER_MAC, MAC, OTHER6, IP6, 128, echo_body(7, b"x")), DROP),
    "echo from another MAC": (icmp6_frame(OTHER_MAC, OTHER_MAC, IP6, OTHER6, 128, echo_body(7, b"x")), DROP),
    "router advertisement": (icmp6_frame("33:33:00:00:00:01", MAC, LL, "ff02::1", 134, ra_body(MAC)), DROP),
    "any IPv4": (eth(GW_MAC, MAC, ETH_P_IP) + ipv4_udp("240.0.10.5", "8.8.8.8", b"x"), DROP),
    "IPv4 from 0.0.0.0": (eth(GW_MAC, MAC, ETH_P_IP) + ipv4_udp("0.0.0.0", "255.255.255.255", b"x"), DROP),
    "ARP": (eth("ff:ff:ff:ff:ff:ff", MAC, ETH_P_ARP) + arp(1, MAC, "0.0.0.0", "00:00:00:00:00:00", "240.0.10.1"),
            DROP),
}


@pytest.fixture(scope="module")
def guard_fd():
    require_kernel_lab(plugins=False)
    from cni_fan.bpf.syscall import load_sched_cls

    fd = load_sched_cls(guardprog.guard_program(MAC, None, IP6), name="tpg_guard6o")
    yield fd
    os.close(fd)


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES))
def test_guard_program_verdict(guard_fd, case) -> None:
    from cni_fan.bpf.syscall import test_run

    frame, want = CASES[case]
    assert test_run(guard_fd, frame).retval == want
