"""Programmatic dependent launch in the artifact without a GPU: the launcher AOTInductor writes into
the `.so` (export/backends/cuda.py's `pdl_launcher`) sets the attribute for the waiting kernels only
(the op families' and Inductor's pointwise and reduction kernels, never its templates), and still
compiles; Inductor's kernels are made to wait before their first access; the ops' mode follows the
device."""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess

import pytest
import torch
from torch._inductor.codegen.cuda.device_op_overrides import CUDADeviceOpOverrides

from export.backends import cuda as backend
from export.kernels import int4_matmul as im
from export.kernels import pdl


def _driver(patch: bool) -> str:
    fn = CUDADeviceOpOverrides.kernel_driver
    if patch:
        fn = backend.pdl_launcher(im.PDL_KERNELS)(fn)
    return fn(CUDADeviceOpOverrides())


def _launch_body(src: str) -> str:
    return src[src.index("static inline void launchKernel("):]


def test_the_launcher_sets_the_attribute_for_the_waiting_kernels_alone():
    stock, ours = _driver(False), _driver(True)
    assert "cuLaunchKernelEx" not in stock and "PROGRAMMATIC_STREAM_SERIALIZATION" not in stock
    body = _launch_body(ours)
    # the attribute only behind the name test, and every other kernel launched as before
    guarded, rest = body.split("if (gemma4WaitsOnGrid(func)) {", 1)[1].split("return;", 1)
    assert "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION" in guarded and "cuLaunchKernelEx" in guarded
    assert "cuLaunchKernel(" in rest and "cuLaunchKernelEx" not in rest
    test = ours[ours.index("static inline bool gemma4WaitsOnGrid"):ours.index("static inline void launchKernel(")]
    for name in im.PDL_KERNELS:
        assert f'n.rfind("{name}", 0) == 0' in test
    assert test.count("rfind") == len(im.PDL_KERNELS) + 1  # and the env's list (PDL_ONLY_ENV)
    assert backend.PDL_ONLY_ENV in test and backend.PDL_OFF_ENV in test
    def squeeze(text: str) -> str:
        return "".join(text.split())

    assert squeeze(ours.replace(test, "").replace(body, "")) == squeeze(stock.replace(_launch_body(stock), ""))


def test_a_launcher_torch_moved_is_refused():
    def moved(self):
        return "static inline void launchKernel(CUfunction func) { cuLaunchKernel(func); }"

    with pytest.raises(RuntimeError, match="torch moved it"):
        backend.pdl_launcher(im.PDL_KERNELS)(moved)(None)


def _cuda_include() -> str | None:
    for sp in site.getsitepackages():
        for path in glob.glob(os.path.join(sp, "nvidia", "*", "include", "cuda.h")):
            return os.path.dirname(path)
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA driver header of the nvidia wheels")
def test_the_patched_launcher_compiles(tmp_path):
    """The patched helpers against the CUDA driver API's header (what AOTInductor's compile sees;
    cudaStream_t is the runtime header's alias of CUstream)."""
    for patch in (False, True):
        src = tmp_path / f"driver_{patch}.cpp"
        src.write_text("#include <cuda.h>\ntypedef struct CUstream_st *cudaStream_t;\n#include <filesystem>\n"
                       "#include <optional>\n#include <stdexcept>\n#include <string>\n" + _driver(patch)
                       + "\nint main() { return 0; }\n")
        r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-I", _cuda_include(), str(src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]


def test_the_op_compiles_waits_only_for_a_gpu_that_has_them(monkeypatch):
    assert im.op_pdl_mode(torch.device("cpu")) == 0
    if not torch.cuda.is_available():
        with backend.pdl_launches():  # no GPU to export for: the launcher stays stock
            assert "cuLaunchKernelEx" not in CUDADeviceOpOverrides().kernel_driver()
        return
    major = torch.cuda.get_device_capability()[0]
    assert im.op_pdl_mode(torch.device("cuda")) == (2 if major >= 9 else 0)
    monkeypatch.setattr(pdl, "OP_PDL", False)
    assert im.op_pdl_mode(torch.device("cuda")) == 0


def test_the_waiting_kernels_are_the_families_and_inductor_s_own(monkeypatch):
    from export.kernels import attention, hadamard, moe_int4

    names = backend.waiting_kernels()
    for family in (im.PDL_KERNELS, attention.PDL_KERNELS, hadamard.PDL_KERNELS, moe_int4.PDL_KERNELS,
                   backend.INDUCTOR_PDL_PREFIXES):
        assert set(family) <= set(names)
    # kernels compiled without a wait must match no prefix: Inductor's templates, prefill attention, the
    # other int4 kernels and the MoE prefill's
    no_wait = ("triton_tem_fused_mm_0", "_prefill_body", "_prefill_combine", "_int4_matmul_kernel",
               "_int4_dequant_kernel", "_sum_splits_kernel", "_int4_gemv_mma_kernel", "_align_kernel",
               "_sort_count_kernel", "_sort_scan_kernel", "_sort_scatter_kernel", "_grouped_kernel")
    assert not [k for k in no_wait for n in names if k.startswith(n)]
    monkeypatch.setattr(backend, "INDUCTOR_PDL", False)
    assert not any(n.startswith("triton_") for n in backend.waiting_kernels())


def test_inductor_kernels_wait_as_if_first():
    """The patched `_handle_pdl_before_access` sees no kernel before (so it always writes the wait) and
    leaves the scheduler's `previous_node` as it was."""
    import types

    from torch._inductor.virtualized import V

    seen = []

    def original(self, buffer, *deps, consider_reads=False):
        seen.append((V.graph.scheduler.previous_node, buffer, deps, consider_reads))

    graph = types.SimpleNamespace(scheduler=types.SimpleNamespace(previous_node="the kernel before"))
    with V.set_graph_handler(graph):
        backend.inductor_waits_first(original)(None, "loads", "buf0", consider_reads=True)
        assert graph.scheduler.previous_node == "the kernel before"
    assert seen == [(None, "loads", ("buf0",), True)]


def test_cuda_compiles_launch_independent_kernels_as_one():
    """Every decode program's CUDA compile has Inductor's combo kernels (a decode layer's q / k / v paths as
    one launch), no prefill program's (E2B's spilled to a 3264-byte stack a thread), and their pointwise-only
    form (`triton_for_*`) is among the kernels that wait on the grid."""
    from export.backends.options import BackendOptions

    for autotune in (True, False):
        for method in ("decode", "decode_layer4", "decode_embed", "prefill", "prefill_layer4"):
            options = backend.Gemma4CudaBackend.compile_options(BackendOptions(method, autotune=autotune))
            assert options.get("combo_kernels") is (True if method.startswith("decode") else None), method
    assert any("triton_for_fused_0".startswith(n) for n in backend.waiting_kernels())


def _rms(x, w=None):
    y = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
    return (y * w.float() if w is not None else y).to(x.dtype)


def _qkv_paths(x, wq, wk):
    """A decode layer's three independent paths after its q / k / v projection (norms, no RoPE)."""
    q, k, v = x.split([512, 256, 256], dim=-1)
    return _rms(q.view(1, 2, 256), wq), _rms(k.view(1, 1, 256), wk), _rms(v.view(1, 1, 256))


@pytest.mark.cuda
def test_a_combo_kernel_waits_in_every_part():
    """With the export's settings on an sm_90+ GPU, Inductor launches the three paths as one combo
    kernel, and each part of it (a range of its programs) waits on the grid before its first load: a
    part without its wait would read the projection before the GEMV that writes it has finished."""
    import re

    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm_90+ GPU (programmatic dependent launch)")
    torch._dynamo.reset()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    wq, wk = (torch.rand(256, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    with backend.pdl_launches(), config.patch({"combo_kernels": True}):
        out, sources = run_and_get_code(torch.compile(_qkv_paths), x, wq, wk)
    for got, want in zip(out, _qkv_paths(x, wq, wk)):
        torch.testing.assert_close(got, want)
    code = "\n".join(sources)
    kernels = re.split(r"async_compile\.triton\(", code)[1:]
    combos = [k for k in kernels if re.search(r"^\s*elif pid < ", k, re.M)]
    assert combos, "no combo kernel: Inductor launched the three paths separately"
    for kernel in combos:
        preamble, *parts = re.split(r"^\s*(?:if|elif) pid < .*$", kernel, flags=re.M)
        assert len(parts) >= 2
        body = preamble[preamble.index("def "):]  # after the decorator's arguments
        for part in parts:
            first_load = part.find("tl.load(")
            waits = "gdc_wait()" in body or 0 <= part.find("gdc_wait()") < first_load
            assert first_load < 0 or waits, part[:600]
