"""eBPF instruction encoding and a tiny assembler with symbolic labels.

Pure: no system calls. The encoding follows the kernel's instruction-set
document (Documentation/bpf/standardization/instruction-set.rst) and
``struct bpf_insn`` in ``include/uapi/linux/bpf.h``: every instruction is an
8-byte record ``opcode:u8, dst:4 | src:4 << 4, off:s16, imm:s32`` in the
host's byte order; ``lddw`` (64-bit immediate load) takes two records.

We generate programs in Python instead of compiling C because the product may
not depend on clang; the assembler keeps the generated program readable
(named jump targets instead of hand-counted offsets).
"""
from __future__ import annotations

import struct
import sys
from enum import IntEnum
from typing import NamedTuple

__all__ = [
    "Reg", "R0", "R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8", "R9", "R10",
    "FP", "Insn", "Assembler", "AsmError", "BPF_PSEUDO_MAP_FD",
]


def ne(value: int, size: int) -> int:
    """The integer a native load of ``value``'s network-order bytes gives.

    Immediate stores write the host's byte order; this makes them write
    network order instead.
    """
    return int.from_bytes(value.to_bytes(size, "big"), sys.byteorder)


class Reg(IntEnum):
    """The eleven eBPF registers; R10 is the read-only frame pointer."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = tuple(Reg)
FP = R10

# Instruction classes (low 3 bits of the opcode).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# Source operand: immediate (K) or register (X).
K, X = 0x00, 0x08
# Load/store sizes and modes.
SIZES = {"W": 0x00, "H": 0x08, "B": 0x10, "DW": 0x18}
SIZE_BYTES = {"W": 4, "H": 2, "B": 1, "DW": 8}
MODE_IMM, MODE_MEM = 0x00, 0x60
# Arithmetic operations (high 4 bits of the opcode).
ALU_OPS = {
    "ADD": 0x00, "SUB": 0x10, "MUL": 0x20, "DIV": 0x30, "OR": 0x40,
    "AND": 0x50, "LSH": 0x60, "RSH": 0x70, "NEG": 0x80, "MOD": 0x90,
    "XOR": 0xA0, "MOV": 0xB0, "ARSH": 0xC0,
}
END = 0xD0
TO_LE, TO_BE = 0x00, 0x08
# Jump operations.
JMP_OPS = {
    "JEQ": 0x10, "JGT": 0x20, "JGE": 0x30, "JSET": 0x40, "JNE": 0x50,
    "JSGT": 0x60, "JSGE": 0x70, "JLT": 0xA0, "JLE": 0xB0, "JSLT": 0xC0,
    "JSLE": 0xD0,
}
JA, CALL, EXIT = 0x00, 0x80, 0x90
# src_reg of an lddw whose immediate is a map file descriptor.
BPF_PSEUDO_MAP_FD = 1

_S32 = (-(1 << 31), (1 << 31) - 1)


class AsmError(ValueError):
    """A malformed instruction or program (bad operand, unknown label...)."""


class Insn(NamedTuple):
    """One 8-byte eBPF instruction record."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        if not 0 <= self.code <= 0xFF:
            raise AsmError(f"opcode out of range: {self.code:#x}")
        if not (0 <= self.dst <= 10 and 0 <= self.src <= 10):
            raise AsmError(f"register out of range in {self}")
        if not -(1 << 15) <= self.off < (1 << 15):
            raise AsmError(f"offset does not fit 16 bits: {self.off}")
        if not _S32[0] <= self.imm <= _S32[1]:
            raise AsmError(f"immediate does not fit 32 bits: {self.imm}")
        regs = (self.src << 4) | self.dst if sys.byteorder == "little" \
            else (self.dst << 4) | self.src
        return struct.pack("=BBhi", self.code, regs, self.off, self.imm)


def _signed32(value: int, what: str) -> int:
    if not _S32[0] <= value <= _S32[1]:
        raise AsmError(f"{what} {value:#x} does not fit a sign-extended 32-bit "
                       "immediate: use the 32-bit form or ld_imm64")
    return value


def _wrap32(value: int, what: str) -> int:
    """A 32-bit operand given signed or unsigned, as the s32 field holds it."""
    if not _S32[0] <= value < (1 << 32):
        raise AsmError(f"{what} {value:#x} does not fit 32 bits")
    return value - (1 << 32) if value > _S32[1] else value


def _reg(r: int) -> int:
    if not 0 <= int(r) <= 10:
        raise AsmError(f"no such register: {r}")
    return int(r)


def _op(table: dict[str, int], name: str) -> int:
    try:
        return table[name.upper()]
    except KeyError:
        raise AsmError(f"unknown operation {name!r}") from None


class _Jump(NamedTuple):
    """A jump whose offset is resolved when the program is assembled."""

    code: int
    dst: int
    src: int
    imm: int
    label: str


class Assembler:
    """Collects instructions and labels; :meth:`assemble` resolves jumps.

    Method names follow the kernel's mnemonic families: ``alu64_imm('ADD',
    R1, 4)`` is ``r1 += 4``, ``jmp32_imm('JNE', R2, x, 'pass')`` compares the
    low 32 bits of r2 with ``x`` (the 32-bit forms avoid the sign extension
    that 64-bit immediates get, which matters for IPv4 addresses).
    """

    def __init__(self) -> None:
        self._items: list[Insn | _Jump] = []
        self._labels: dict[str, int] = {}

    # -- bookkeeping ------------------------------------------------------
    def __len__(self) -> int:
        """Number of 8-byte slots emitted so far."""
        return len(self._items)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise AsmError(f"label defined twice: {name!r}")
        self._labels[name] = len(self._items)

    def referenced(self, label: str) -> bool:
        """Whether any jump so far targets ``label`` (the verifier rejects
        unreachable code, so optional blocks are emitted only if used)."""
        return any(isinstance(i, _Jump) and i.label == label
                   for i in self._items)

    def emit(self, insn: Insn) -> None:
        self._items.append(insn)

    # -- ALU ----------------------------------------------------------------
    def alu64_imm(self, op: str, dst: int, imm: int) -> None:
        self.emit(Insn(ALU64 | K | _op(ALU_OPS, op), _reg(dst), 0, 0,
                       _signed32(imm, "immediate")))

    def alu64_reg(self, op: str, dst: int, src: int) -> None:
        self.emit(Insn(ALU64 | X | _op(ALU_OPS, op), _reg(dst), _reg(src)))

    def alu32_imm(self, op: str, dst: int, imm: int) -> None:
        """32-bit ALU: operates on the low halves and zeroes the upper half."""
        self.emit(Insn(ALU | K | _op(ALU_OPS, op), _reg(dst), 0, 0,
                       _wrap32(imm, "immediate")))

    def alu32_reg(self, op: str, dst: int, src: int) -> None:
        self.emit(Insn(ALU | X | _op(ALU_OPS, op), _reg(dst), _reg(src)))

    def mov64_imm(self, dst: int, imm: int) -> None:
        self.alu64_imm("MOV", dst, imm)

    def mov64_reg(self, dst: int, src: int) -> None:
        self.alu64_reg("MOV", dst, src)

    def mov32_imm(self, dst: int, imm: int) -> None:
        self.alu32_imm("MOV", dst, imm)

    def mov32_reg(self, dst: int, src: int) -> None:
        self.alu32_reg("MOV", dst, src)

    def to_be(self, dst: int, bits: int) -> None:
        """Host order <-> network order (a byte swap on little-endian hosts;
        on big-endian hosts it only truncates to ``bits``)."""
        if bits not in (16, 32, 64):
            raise AsmError(f"byte swap width must be 16, 32 or 64: {bits}")
        self.emit(Insn(ALU | END | TO_BE, _reg(dst), 0, 0, bits))

    def ld_imm64(self, dst: int, imm: int, src: int = 0) -> None:
        """Load a full 64-bit constant (two slots)."""
        if not -(1 << 63) <= imm < (1 << 64):
            raise AsmError(f"immediate does not fit 64 bits: {imm:#x}")
        imm &= (1 << 64) - 1
        lo, hi = imm & 0xFFFFFFFF, imm >> 32
        self.emit(Insn(LD | 0x18 | MODE_IMM, _reg(dst), src, 0,
                       _wrap32(lo, "low half")))
        self.emit(Insn(0, 0, 0, 0, _wrap32(hi, "high half")))

    def ld_map_fd(self, dst: int, map_fd: int) -> None:
        """Load a map reference; the kernel swaps the fd for the map."""
        self.ld_imm64(dst, map_fd, src=BPF_PSEUDO_MAP_FD)

    # -- memory -------------------------------------------------------------
    def ldx(self, size: str, dst: int, src: int, off: int) -> None:
        """``dst = *(size *)(src + off)``."""
        self.emit(Insn(LDX | MODE_MEM | _op(SIZES, size), _reg(dst),
                       _reg(src), off))

    def stx(self, size: str, dst: int, off: int, src: int) -> None:
        """``*(size *)(dst + off) = src``."""
        self.emit(Insn(STX | MODE_MEM | _op(SIZES, size), _reg(dst),
                       _reg(src), off))

    def st_imm(self, size: str, dst: int, off: int, imm: int) -> None:
        """``*(size *)(dst + off) = imm``; DW stores sign-extend ``imm``."""
        size = size.upper()
        if size == "DW":
            imm = _signed32(imm, "immediate")
        else:
            bits = 8 * SIZE_BYTES[size] if size in SIZE_BYTES else 0
            if not 0 <= imm < (1 << bits):
                raise AsmError(f"immediate {imm:#x} does not fit {size}")
            imm = _wrap32(imm, "immediate")
        self.emit(Insn(ST | MODE_MEM | _op(SIZES, size), _reg(dst), 0, off,
                       imm))

    # -- jumps --------------------------------------------------------------
    def _jump(self, cls: int, src_mode: int, op: str, dst: int, src: int,
              imm: int, label: str) -> None:
        self._items.append(_Jump(cls | src_mode | _op(JMP_OPS, op), dst, src,
                                 imm, label))

    def jmp_imm(self, op: str, dst: int, imm: int, label: str) -> None:
        self._jump(JMP, K, op, _reg(dst), 0, _signed32(imm, "immediate"),
                   label)

    def jmp_reg(self, op: str, dst: int, src: int, label: str) -> None:
        self._jump(JMP, X, op, _reg(dst), _reg(src), 0, label)

    def jmp32_imm(self, op: str, dst: int, imm: int, label: str) -> None:
        self._jump(JMP32, K, op, _reg(dst), 0, _wrap32(imm, "immediate"),
                   label)

    def jmp32_reg(self, op: str, dst: int, src: int, label: str) -> None:
        self._jump(JMP32, X, op, _reg(dst), _reg(src), 0, label)

    def ja(self, label: str) -> None:
        self._items.append(_Jump(JMP | JA, 0, 0, 0, label))

    def call(self, helper: int) -> None:
        self.emit(Insn(JMP | CALL, 0, 0, 0, helper))

    def exit(self) -> None:
        self.emit(Insn(JMP | EXIT))

    # -- output -------------------------------------------------------------
    def instructions(self) -> list[Insn]:
        """The program with every label resolved to a relative offset."""
        out: list[Insn] = []
        for pc, item in enumerate(self._items):
            if isinstance(item, Insn):
                out.append(item)
                continue
            if item.label not in self._labels:
                raise AsmError(f"jump to undefined label {item.label!r}")
            off = self._labels[item.label] - (pc + 1)
            out.append(Insn(item.code, item.dst, item.src, off, item.imm))
        return out

    def assemble(self) -> bytes:
        if not self._items:
            raise AsmError("empty program")
        return b"".join(i.encode() for i in self.instructions())
