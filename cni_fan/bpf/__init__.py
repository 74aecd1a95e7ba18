"""The Fan datapath in eBPF: instruction encoding (``insn``), the generated
program (``fanprog``), bpf(2) (``syscall``) and tc attachment (``attach``).

Submodules are imported explicitly so that the pure ones stay free of
pyroute2's import cost.
"""
