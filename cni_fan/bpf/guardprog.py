"""The port guard's anti-spoofing program: pure, one per pod (docs/portguard.md).

A tc ingress program for a pod's host veth that passes only what the pod
may send. It is assembled once per process with placeholder constants (at
import, so the plugin server's children inherit it); each pod's program
only patches the immediates.
"""
from __future__ import annotations

import socket
import struct
import sys

from cni_fan.bpf.guardprog6 import ETH_P_IPV6, emit_ipv6
from cni_fan.bpf.insn import R0, R1, R2, R3, R4, R6, Assembler

TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806


def _mac_bytes(mac: str) -> bytes:
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def guard_program(mac: str, ip: str | None, ip6: str | None = None) -> bytes:
    """tc ingress program of a pod's host veth: pass only what the pod may send.

    Pass (TC_ACT_UNSPEC: on to the next filter, if any, else the bridge):
    untagged IPv4 from `mac` with source `ip`; untagged Ethernet/IPv4 ARP
    from `mac` whose sender MAC is `mac` and sender address is `ip`; with
    `ip6`, the IPv6 that guardprog6 allows. Drop (TC_ACT_SHOT) everything
    else (all IPv6 without `ip6`; all IPv4 and ARP without `ip`: a pod of
    an IPv6-only cluster).
    """
    if ip is None and ip6 is None:
        raise ValueError("a guard needs the pod's IPv4 or IPv6 address")
    m = _mac_bytes(mac)
    values = [m[0:4], m[4:6]]
    template, offsets = _TEMPLATE6ONLY, _PATCH_OFFSETS6ONLY
    if ip is not None:
        values.append(socket.inet_aton(ip))
        template, offsets = _TEMPLATE, _PATCH_OFFSETS
    if ip6 is not None:
        a6 = socket.inet_pton(socket.AF_INET6, ip6)
        values += [a6[0:4], a6[4:8], a6[8:12], a6[12:16]]
        if ip is not None:
            template, offsets = _TEMPLATE6, _PATCH_OFFSETS6
    code = bytearray(template)
    for offset, value in zip(offsets, values):
        for at in offset:
            struct.pack_into("=I", code, at, int.from_bytes(value, sys.byteorder))
    return bytes(code)


def assemble_guard_program(m: bytes, a: bytes | None, a6: bytes | None = None) -> bytes:
    """The program for MAC bytes `m`, address bytes `a` (and IPv6 address bytes `a6`), by the assembler.

    Without `a` (an IPv6-only pod) it has no IPv4 and ARP branches: both are dropped."""
    native = lambda b: int.from_bytes(b, sys.byteorder)  # noqa: E731  (loads are in host order)
    vlan_present, data, data_end = 20, 76, 80  # offsets in struct __sk_buff
    asm = Assembler()
    asm.mov64_reg(R6, R1)
    asm.ldx("W", R0, R6, vlan_present)
    asm.jmp32_imm("JNE", R0, 0, "drop")
    asm.ldx("W", R2, R6, data)
    asm.ldx("W", R3, R6, data_end)
    asm.mov64_reg(R4, R2)
    asm.alu64_imm("ADD", R4, 14)
    asm.jmp_reg("JGT", R4, R3, "drop")
    asm.ldx("W", R0, R2, 6)                       # Ethernet source
    asm.jmp32_imm("JNE", R0, native(m[0:4]), "drop")
    asm.ldx("H", R0, R2, 10)
    asm.jmp32_imm("JNE", R0, native(m[4:6]), "drop")
    asm.ldx("H", R0, R2, 12)                      # ethertype
    if a is None:
        assert a6 is not None
        asm.jmp32_imm("JEQ", R0, native(ETH_P_IPV6.to_bytes(2, "big")), "ipv6")
        asm.ja("drop")
        emit_ipv6(asm, m, a6)
        return _finish(asm)
    asm.jmp32_imm("JEQ", R0, native(ETH_P_IP.to_bytes(2, "big")), "ipv4")
    asm.jmp32_imm("JEQ", R0, native(ETH_P_ARP.to_bytes(2, "big")), "arp")
    if a6 is not None:
        asm.jmp32_imm("JEQ", R0, native(ETH_P_IPV6.to_bytes(2, "big")), "ipv6")
    asm.ja("drop")
    asm.label("ipv4")
    asm.mov64_reg(R4, R2)
    asm.alu64_imm("ADD", R4, 14 + 20)
    asm.jmp_reg("JGT", R4, R3, "drop")
    asm.ldx("W", R0, R2, 14 + 12)                 # IPv4 source
    asm.jmp32_imm("JNE", R0, native(a), "drop")
    asm.ja("pass")
    asm.label("arp")
    asm.mov64_reg(R4, R2)
    asm.alu64_imm("ADD", R4, 14 + 28)
    asm.jmp_reg("JGT", R4, R3, "drop")
    asm.ldx("W", R0, R2, 14)                      # htype 1, ptype IPv4
    asm.jmp32_imm("JNE", R0, native(bytes([0, 1, 8, 0])), "drop")
    asm.ldx("H", R0, R2, 18)                      # hlen 6, plen 4
    asm.jmp32_imm("JNE", R0, native(bytes([6, 4])), "drop")
    asm.ldx("W", R0, R2, 22)                      # sender MAC
    asm.jmp32_imm("JNE", R0, native(m[0:4]), "drop")
    asm.ldx("H", R0, R2, 26)
    asm.jmp32_imm("JNE", R0, native(m[4:6]), "drop")
    asm.ldx("W", R0, R2, 28)                      # sender address
    asm.jmp32_imm("JNE", R0, native(a), "drop")
    if a6 is not None:
        asm.ja("pass")
        emit_ipv6(asm, m, a6)
    return _finish(asm)


def _finish(asm: Assembler) -> bytes:
    """The two exits every variant ends with."""
    asm.label("pass")
    asm.mov64_imm(R0, TC_ACT_UNSPEC)              # continue: later filters, then the bridge
    asm.exit()
    asm.label("drop")
    asm.mov64_imm(R0, TC_ACT_SHOT)
    asm.exit()
    return asm.assemble()


def _template(dual: bool, ipv4: bool = True) -> tuple[bytes, tuple[tuple[int, ...], ...]]:
    """The program with placeholder constants, and where each constant's immediates are."""
    placeholders = [b"\x5a\xa5\x5a\xa1", b"\x5a\xa2"] + ([b"\x5a\xa5\x5a\xa3"] if ipv4 else [])
    v6 = [b"\x5a\xa5\x5a\xb0", b"\x5a\xa5\x5a\xb1", b"\x5a\xa5\x5a\xb2", b"\x5a\xa5\x5a\xb3"]
    code = assemble_guard_program(placeholders[0] + placeholders[1], placeholders[2] if ipv4 else None,
                                  b"".join(v6) if dual else None)
    placeholders += v6 if dual else []
    imms = [struct.unpack_from("=I", code, at)[0] for at in range(4, len(code), 8)]
    offsets = tuple(tuple(8 * i + 4 for i, imm in enumerate(imms) if imm == int.from_bytes(p, sys.byteorder))
                    for p in placeholders)
    assert all(offsets), offsets
    return code, offsets


_TEMPLATE, _PATCH_OFFSETS = _template(False)
_TEMPLATE6, _PATCH_OFFSETS6 = _template(True)
_TEMPLATE6ONLY, _PATCH_OFFSETS6ONLY = _template(True, ipv4=False)
