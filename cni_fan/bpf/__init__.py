"""eBPF without clang: instruction encoding (``insn``), the generated
programs (``fanprog``, ``fanprog_u6`` for IPv6 underlays, ``tunnelkey``,
the port guard's ``guardprog``) and bpf(2) (``syscall``). Attaching them
with tc is ``cni_fan.net.tc``.

Submodules are imported explicitly so that the pure ones stay free of
pyroute2's import cost.
"""
