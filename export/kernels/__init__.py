"""Custom GPU kernels, one op family per file, registered as torch custom ops.

Each module registers its ops (namespace `gemma4`) when imported: a Triton kernel launched
through `torch.library.triton_op` + `wrap_triton` (AOTInductor compiles it into the method's
`.so`, no fallback kernel), a fake implementation for export, and an eager reference in plain
torch that CPU runs, CPU CI tests, and the CPU backend decomposes the op into.
"""
