"""eBPF instruction encoding: exact bytes of known instructions.

Expected bytes are worked out by hand from the kernel's instruction-set
document: opcode = operation | source | class, then one byte with dst in the
low nibble and src in the high nibble (little-endian host), then off (s16,
LE) and imm (s32, LE).
"""
from __future__ import annotations

import sys

import pytest

from cni_fan.bpf.insn import (FP, R0, R1, R2, R3, R4, R8, R9, Assembler,
                              AsmError, Insn)

pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="expected bytes are little-endian")


def one(build) -> str:
    a = Assembler()
    build(a)
    return a.assemble().hex(" ")


@pytest.mark.parametrize("build, expected", [
    # ALU64 (0x07) | K (0x00) | MOV (0xb0) = 0xb7; r1 = 2
    (lambda a: a.mov64_imm(R1, 2), "b7 01 00 00 02 00 00 00"),
    # ALU64 | X (0x08) | MOV = 0xbf; r6 = r1 -> dst 6, src 1 -> 0x16
    (lambda a: a.mov64_reg(6, R1), "bf 16 00 00 00 00 00 00"),
    # ALU (0x04) | X | MOV = 0xbc; w0 = w0
    (lambda a: a.mov32_reg(R0, R0), "bc 00 00 00 00 00 00 00"),
    # ALU | K | AND (0x50) = 0x54; w3 &= 0xff000000 (imm stored as s32)
    (lambda a: a.alu32_imm("AND", R3, 0xFF000000), "54 03 00 00 00 00 00 ff"),
    # ALU64 | K | RSH (0x70) = 0x77; r0 >>= 32
    (lambda a: a.alu64_imm("RSH", R0, 32), "77 00 00 00 20 00 00 00"),
    # ALU64 | K | ADD = 0x07; r2 += -40
    (lambda a: a.alu64_imm("ADD", R2, -40), "07 02 00 00 d8 ff ff ff"),
    # ALU64 | X | ADD = 0x0f; r1 += r4
    (lambda a: a.alu64_reg("ADD", R1, R4), "0f 41 00 00 00 00 00 00"),
    # ALU | END (0xd0) | TO_BE (0x08) = 0xdc, imm = width
    (lambda a: a.to_be(R9, 32), "dc 09 00 00 20 00 00 00"),
    (lambda a: a.to_be(R8, 16), "dc 08 00 00 10 00 00 00"),
    # LDX (0x01) | MEM (0x60) | W (0x00) = 0x61; r2 = *(u32 *)(r1 + 76)
    (lambda a: a.ldx("W", R2, R1, 76), "61 12 4c 00 00 00 00 00"),
    # LDX | MEM | B (0x10) = 0x71; r3 = *(u8 *)(r7 + 22)
    (lambda a: a.ldx("B", R3, 7, 22), "71 73 16 00 00 00 00 00"),
    # LDX | MEM | H (0x08) = 0x69
    (lambda a: a.ldx("H", R2, 7, 12), "69 72 0c 00 00 00 00 00"),
    # STX (0x03) | MEM | DW (0x18) = 0x7b; *(u64 *)(r10 - 16) = r3
    (lambda a: a.stx("DW", FP, -16, R3), "7b 3a f0 ff 00 00 00 00"),
    # ST (0x02) | MEM | H = 0x6a; *(u16 *)(r2 + 36) = 0xb512
    (lambda a: a.st_imm("H", R2, 36, 0xB512), "6a 02 24 00 12 b5 00 00"),
    # ST | MEM | W = 0x62, unsigned 32-bit value kept bit for bit
    (lambda a: a.st_imm("W", R2, 42, 0xFA000002), "62 02 2a 00 02 00 00 fa"),
    # JMP (0x05) | CALL (0x80) = 0x85, imm = helper id (152 = 0x98)
    (lambda a: a.call(152), "85 00 00 00 98 00 00 00"),
    # JMP | EXIT (0x90) = 0x95
    (lambda a: a.exit(), "95 00 00 00 00 00 00 00"),
])
def test_known_encodings(build, expected) -> None:
    assert one(build) == expected


def test_ld_imm64_takes_two_slots() -> None:
    a = Assembler()
    a.ld_imm64(R4, 0x0E00_0000_0000_0053)
    # LD (0x00) | IMM mode (0x00) | DW (0x18) = 0x18; low half then high half
    assert a.assemble().hex(" ") == ("18 04 00 00 53 00 00 00 "
                                     "00 00 00 00 00 00 00 0e")
    assert len(a) == 2


def test_ld_map_fd_marks_the_pseudo_source() -> None:
    a = Assembler()
    a.ld_map_fd(R1, 7)
    assert a.assemble()[:8].hex(" ") == "18 11 00 00 07 00 00 00"


def test_forward_and_backward_labels() -> None:
    a = Assembler()
    a.label("top")                       # pc 0
    a.jmp32_imm("JNE", R2, 0xF1000000, "out")   # pc 0 -> out at 3: off 2
    a.ld_imm64(R1, 1)                    # pc 1, 2
    a.label("out")
    a.jmp_reg("JGT", R2, R8, "top")      # pc 3 -> 0: off -4
    a.ja("end")                          # pc 4 -> 5: off 0
    a.label("end")
    a.exit()
    code = a.assemble()
    # JMP32 (0x06) | K | JNE (0x50) = 0x56
    assert code[0:8].hex(" ") == "56 02 02 00 00 00 00 f1"
    # JMP | X | JGT (0x20) = 0x2d; dst 2, src 8 -> 0x82; off -4
    assert code[24:32].hex(" ") == "2d 82 fc ff 00 00 00 00"
    assert code[32:40].hex(" ") == "05 00 00 00 00 00 00 00"


def test_undefined_and_duplicate_labels() -> None:
    a = Assembler()
    a.ja("nowhere")
    with pytest.raises(AsmError, match="undefined label"):
        a.assemble()
    a.label("x")
    with pytest.raises(AsmError, match="twice"):
        a.label("x")


def test_64bit_forms_refuse_values_that_would_be_sign_extended() -> None:
    a = Assembler()
    with pytest.raises(AsmError, match="sign-extended"):
        a.jmp_imm("JEQ", R1, 0xF1000000, "x")
    with pytest.raises(AsmError, match="sign-extended"):
        a.alu64_imm("AND", R1, 0xFFFF0000)
    a.jmp32_imm("JEQ", R1, 0xF1000000, "x")   # fine in the 32-bit form


def test_operand_checks() -> None:
    a = Assembler()
    with pytest.raises(AsmError):
        a.st_imm("B", R1, 0, 256)
    with pytest.raises(AsmError):
        a.alu64_imm("FROB", R1, 1)
    with pytest.raises(AsmError):
        a.mov64_imm(11, 1)
    with pytest.raises(AsmError):
        a.to_be(R1, 8)
    with pytest.raises(AsmError):
        Insn(0x95, off=1 << 15).encode()
    with pytest.raises(AsmError):
        Assembler().assemble()


def test_referenced_labels() -> None:
    a = Assembler()
    a.ja("used")
    assert a.referenced("used") and not a.referenced("unused")
