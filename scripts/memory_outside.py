"""Device memory a runtime process holds outside torch's caching allocator, stage by stage.

A measuring tool, CUDA only: the CUDA context, each program's `.so` opened alone (an AOTInductor
container allocates its own constants blob with cudaMalloc where its `.so` says it holds
constants), then the runner's load, first prefill, first decode (the CUDA graph's capture) and
the steps after; within the first prefill, each program's first run. "outside" is this process's NVML
figure minus `torch.cuda.memory_reserved()`. Beside it, the context's stack size limit (the driver
raises it, and reserves that much local memory for every thread the device can hold, when a kernel
needs more than it: on an H200 ~264 MiB per KiB a thread), and with --kernels the register / stack /
local figures of every kernel compiled into the artifact's programs (cubins found in each `.so`,
read by cuobjdump), those with a stack first.

    python -m scripts.memory_outside --model /tmp/var/e2b [--prompt 2048] [--kernels] [--json out.json]

Why: E2B's whole-model runtime measured 5.62 GiB (NVML, the process) on 2026-12-03 against 5.05 on
2026-12-02 with the allocator's peak and reserve unchanged to 0.01 GiB (variants.json). It was the context's
stack reserve, raised by one prefill kernel (scripts/measurements/memory_outside_e2b.json)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import torch

GIB = 2**30
CU_LIMIT_STACK_SIZE = 0


def stack_limit() -> int | None:
    """The current context's stack size a thread (driver API), None where it cannot be read."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_size_t()
    return value.value if lib.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE) == 0 else None


def artifact_kernels(artifact) -> list[dict]:
    """Every kernel of every program's `.so`, with its program, the largest stack first."""
    from export.cubins import cubins, kernel_resources

    rows = []
    for program in artifact.metadata.programs():
        for cubin in cubins(artifact.so_blob(program)):
            rows += [{"program": program, **r} for r in kernel_resources(cubin)]
    return sorted(rows, key=lambda r: (-max(r["stack"], r["local"]), r["program"], r["kernel"]))


class Probe:
    """NVML's figure for this process against the allocator's, printed and kept per stage."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.rows: list[dict] = []

    def process_bytes(self) -> int | None:
        for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if p.pid == os.getpid():
                return p.usedGpuMemory
        return None  # not listed (another pid namespace): the device's figure is no substitute

    def stage(self, name: str) -> dict:
        torch.cuda.synchronize()
        used = self.process_bytes()
        reserved = torch.cuda.memory_reserved()
        row = {"stage": name, "nvml_process_gib": None if used is None else used / GIB,
               "reserved_gib": reserved / GIB, "allocated_gib": torch.cuda.memory_allocated() / GIB,
               "outside_gib": None if used is None else (used - reserved) / GIB, "stack_bytes": stack_limit()}
        self.rows.append(row)
        fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
        print(f"{name:40s} process {fmt(row['nvml_process_gib'])}  reserved {fmt(row['reserved_gib'])}  "
              f"outside {fmt(row['outside_gib'])} GiB  stack {row['stack_bytes']} B", flush=True)
        return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="an export's output directory (CUDA artifact)")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens of the timed-like prefill")
    ap.add_argument("--steps", type=int, default=16, help="decode steps after the first")
    ap.add_argument("--kernels", action="store_true",
                    help="also list every compiled kernel's registers / stack / local memory (cuobjdump)")
    ap.add_argument("--json", type=Path, default=None, help="write the stages here")
    a = ap.parse_args(argv)
    from runtime.aoti import load_method
    from runtime.artifact import Artifact, ArtifactError
    from runtime.runner import Runner

    try:
        artifact = Artifact.open(a.model)
    except ArtifactError as e:
        print(f"memory_outside: --model {a.model}: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("memory_outside: needs a CUDA device (the figures are NVML's and the CUDA allocator's)", file=sys.stderr)
        return 2
    probe = Probe()
    torch.zeros(1, device="cuda")
    probe.stage("context")
    for program in artifact.metadata.programs():  # each container alone, then dropped
        method = load_method(program, artifact.so_blob(program), "cuda")
        probe.stage(f"open {program}")
        del method
    probe.stage("containers dropped")
    runner = Runner(artifact)
    probe.stage("runner loaded")
    meta = artifact.metadata
    ids = torch.randint(3, meta.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    for program in runner.methods["prefill"].programs:  # each program's first run, then as it was
        def first_run(inputs, _program=program, _run=program.run):
            out = _run(inputs)
            del _program.run
            probe.stage(f"prefill: {_program.name} first run")
            return out
        program.run = first_run
    token = int(runner.prefill(ids).argmax())
    probe.stage("first prefill")
    token = int(runner.decode(token).argmax())
    probe.stage("first decode (graph capture)")
    for _ in range(a.steps):
        token = int(runner.decode(token).argmax())
    probe.stage(f"{a.steps} more decodes")
    runner.reset()
    token = int(runner.prefill(ids).argmax())
    probe.stage("second prefill")
    kernels = artifact_kernels(artifact) if a.kernels else []
    if a.kernels:
        print(f"{len(kernels)} kernels in the programs' .so; the largest stacks / local memory:")
        for r in kernels[:12]:
            print(f"  {r['program']:18s} {r['kernel'][:60]:60s} reg {r['reg']:3d} stack {r['stack']:6d} "
                  f"local {r['local']:6d}")
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "device": torch.cuda.get_device_name(),
                                      "stages": probe.rows, "kernels": kernels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
