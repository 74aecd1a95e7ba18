"""The Fan mapping for IPIP: set the tunnel key on a collect-metadata device.

IPIP is layer 3, so the MAC tricks VXLAN needs do not apply: the program
on the egress of an `ipip external` device only computes the outer
destination with the Fan reverse map and calls `bpf_skb_set_tunnel_key`;
the device does the encapsulation. On an L3 device `skb->data` starts at
the IPv4 header. This kernel has no ipip module, so the program is
checked by the verifier and by BPF_PROG_TEST_RUN here, never attached.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .fanprog import emit_reverse_map
from .insn import FP, R0, R1, R2, R3, R4, R6, R7, R8, R9, Assembler

HELPER_SKB_SET_TUNNEL_KEY = 21
TC_ACT_OK, TC_ACT_SHOT = 0, 2
SKB_DATA, SKB_DATA_END = 76, 80
# struct bpf_tunnel_key up to tunnel_label: id, remote_ipv4[4 words], tos,
# ttl, ext, label = 28 bytes (accepted by the kernel; FACTS.md section 6).
KEY_SIZE = 28
KEY_ON_STACK = -32
OUTER_TTL = 64


@dataclass(frozen=True)
class IpipKeyParams:
    overlay: ipaddress.IPv4Network
    underlay: ipaddress.IPv4Network
    local_underlay: ipaddress.IPv4Address

    @property
    def container_bits(self) -> int:
        return 32 - (self.overlay.prefixlen + 32 - self.underlay.prefixlen)

    @property
    def local_slice(self) -> ipaddress.IPv4Network:
        host = int(self.local_underlay) & int(self.underlay.hostmask)
        first = int(self.overlay.network_address) | (host << self.container_bits)
        return ipaddress.IPv4Network((first, 32 - self.container_bits))


def build_ipip_key_program(p: IpipKeyParams) -> bytes:
    a = Assembler()
    cmask = (1 << p.container_bits) - 1
    a.mov64_reg(R6, R1)
    a.ldx("W", R7, R6, SKB_DATA)
    a.ldx("W", R8, R6, SKB_DATA_END)
    a.mov64_reg(R2, R7)
    a.alu64_imm("ADD", R2, 20)
    a.jmp_reg("JGT", R2, R8, "pass")
    a.ldx("B", R2, R7, 0)                      # version | IHL
    a.alu32_imm("AND", R2, 0xF0)
    a.jmp32_imm("JNE", R2, 0x40, "pass")
    a.ldx("W", R9, R7, 16)                     # inner destination
    a.to_be(R9, 32)                            # -> host order
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, int(p.overlay.netmask))
    a.jmp32_imm("JNE", R3, int(p.overlay.network_address), "pass")
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, int(p.local_slice.netmask))
    a.jmp32_imm("JEQ", R3, int(p.local_slice.network_address), "pass")
    a.mov32_reg(R3, R9)
    a.alu32_imm("AND", R3, cmask)
    a.jmp32_imm("JEQ", R3, 0, "drop")
    a.jmp32_imm("JEQ", R3, cmask, "drop")
    emit_reverse_map(a, R9, p.overlay, p.underlay, p.container_bits, "drop")
    # The key, fully initialised on the stack (the verifier insists).
    for off in range(0, KEY_SIZE, 4):
        a.st_imm("W", FP, KEY_ON_STACK + off, 0)
    a.stx("W", FP, KEY_ON_STACK + 4, R9)      # remote_ipv4, host byte order
    a.st_imm("B", FP, KEY_ON_STACK + 21, OUTER_TTL)  # tunnel_ttl
    a.mov64_reg(R1, R6)
    a.mov64_reg(R2, FP)
    a.alu64_imm("ADD", R2, KEY_ON_STACK)
    a.mov64_imm(R3, KEY_SIZE)
    a.mov64_imm(R4, 0)
    a.call(HELPER_SKB_SET_TUNNEL_KEY)
    a.jmp32_imm("JNE", R0, 0, "drop")
    a.label("pass")
    a.mov64_imm(R0, TC_ACT_OK)
    a.exit()
    a.label("drop")
    a.mov64_imm(R0, TC_ACT_SHOT)
    a.exit()
    return a.assemble()
