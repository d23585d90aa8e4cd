"""The kernels a decode step launches, from Inductor's CUDA code for each unit, on a machine without a GPU.

    python -m scripts.count_decode_kernels --preset e2b[,31b:int4,...] [--layers 5] [--out counts.json] [--compile]

Why: at decode every launch costs ~1.4-3 us on the H200 whatever it does (scripts/launch_floor.py), and the
small variants' steps are bound by their count (E2B: 434 a step). This counts them without a GPU: the
model built as an export builds it, shapes only (the meta device: the int4 recipe's CUDA layout, int8 embedding),
each unit of its chain (export/chain.py) exported for one token on fake CUDA tensors as the backend receives it
(torch.export, run_decompositions, then the module with our ops that write their arguments called in place again:
export/passes/inplace_triton_ops.py) and compiled by Inductor with the decode method's options (the CUDA backend's
with `--no-autotune`; decode's row reductions) for an sm_90 target, up to the generated code, whose launches are
listed in order. Our ops' Triton kernels appear under their own names (`_int4_gemv1_kernel`, `_attn_body`, ...),
Inductor's as `triton_*`. One of our ops left as a fallback call (`torch.ops.gemma4.*`, which the `.so` cannot
make) is listed and fails the run (exit 1). It is Inductor's Python wrapper, not the AOTInductor `.so`: the same
scheduler and fusions, not the same launcher (nor PDL, which changes no count). A decode step is the embed unit,
each layer's unit and the head (units serve several layers), plus what the runner adds (sampling: an argmax, a copy
of the token id).

`--compile` also compiles our ops' Triton kernels for sm_90 as the generated code holds them (the source
Inductor splices together for each, which AOTInductor compiles into the `.so`): a kernel calling a helper
Inductor does not copy fails here, on the CPU, as it would minutes into an export on the GPU.

Making Inductor generate CUDA code with no driver takes patches of torch's device queries (an H200's
properties), of Python indexing on CUDA tensors (a device guard in C++ otherwise calls the driver; basic
indexing goes through aten ops instead), of the pattern-matcher's init (it builds real CUDA tensors) and of
Triton's active driver (an sm_90 target); `cuda_without_gpu()` applies them for the block and undoes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from collections import namedtuple
from pathlib import Path
from typing import Iterator

import torch

H200 = namedtuple("H200", "name major minor total_memory multi_processor_count regs_per_multiprocessor "
                          "max_threads_per_multi_processor warp_size gcnArchName L2_cache_size "
                          "shared_memory_per_block_optin shared_memory_per_multiprocessor max_threads_per_block")(
    "NVIDIA H200", 9, 0, 140 << 30, 132, 65536, 2048, 32, "", 50 << 20, 232448, 233472, 1024)


class _Sm90Driver:
    """Triton's active driver, answering for one sm_90 GPU (compiles only: nothing launches)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_current_device(self):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


def _basic_getitem(original):
    """Tensor indexing with None / slices / ints / Ellipsis / index tensors as aten ops on a CUDA tensor
    (the C++ `__getitem__` takes a device guard, which asks the driver)."""
    def getitem(self, idx):
        if self.device.type != "cuda":
            return original(self, idx)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            real = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:k] + (slice(None),) * (self.dim() - real) + idx[k + 1:]
        out, d, gathers = self, 0, {}
        for i in idx:
            if i is None:
                out = torch.ops.aten.unsqueeze.default(out, d)
                d += 1
            elif isinstance(i, slice):
                if i != slice(None):
                    stop = out.shape[d] if i.stop is None else i.stop
                    out = torch.ops.aten.slice.Tensor(out, d, i.start or 0, stop, i.step or 1)
                d += 1
            elif isinstance(i, (int, torch.SymInt)):
                out = torch.ops.aten.select.int(out, d, i)
            elif isinstance(i, torch.Tensor):
                gathers[d] = i
                d += 1
            else:
                raise NotImplementedError(f"index {i!r} of a CUDA tensor without a GPU")
        if gathers:
            out = torch.ops.aten.index.Tensor(out, [gathers.get(k) for k in range(max(gathers) + 1)])
        return out
    return getitem


_INHERITED = object()


@contextlib.contextmanager
def cuda_without_gpu() -> Iterator[None]:
    """torch and Triton answering as one H200 for the block (see the module docstring); restored after."""
    import triton
    import torch._dynamo.device_interface as di
    import torch._inductor.fx_passes.joint_graph as jg
    import torch._subclasses.fake_tensor as ft
    from torch._inductor import config

    cuda = di.CudaInterface
    saved: list[tuple[object, str, object]] = []

    def put(owner, name, value):  # a class's own entry (a staticmethod stays one), or none: inherited
        old = vars(owner).get(name, _INHERITED) if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, old))
        setattr(owner, name, value)

    put(torch.cuda, "is_available", lambda: True)
    put(torch.cuda, "device_count", lambda: 1)
    put(torch.cuda, "current_device", lambda: 0)
    put(torch.cuda, "get_device_properties", lambda d=None: H200)
    put(torch.cuda, "get_device_capability", lambda d=None: (H200.major, H200.minor))
    put(torch.cuda, "get_device_name", lambda d=None: H200.name)
    put(torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8))
    put(torch.cuda, "set_rng_state", lambda *a, **k: None)
    put(torch.cuda, "synchronize", lambda *a, **k: None)
    put(torch.cuda, "set_device", lambda *a, **k: None)
    put(torch.cuda, "_exchange_device", lambda idx: 0)
    put(torch.cuda, "_maybe_exchange_device", lambda idx: 0)
    put(torch.cuda.random, "current_device", lambda: 0)
    put(cuda, "get_device_properties", staticmethod(lambda d=None: H200))
    put(cuda, "current_device", staticmethod(lambda: 0))
    put(cuda, "device_count", staticmethod(lambda: 1))
    put(cuda, "is_available", staticmethod(lambda: True))
    put(cuda, "get_compute_capability", staticmethod(lambda d=None: 90))
    put(cuda.Worker, "get_device_properties", staticmethod(lambda d=None: H200))
    put(cuda.Worker, "current_device", staticmethod(lambda: 0))
    put(ft, "init_gpu_context", lambda d: None)
    put(jg, "lazy_init", lambda *a, **k: None)
    put(torch.Tensor, "__getitem__", _basic_getitem(torch.Tensor.__getitem__))
    put(torch.Tensor, "copy_", lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src,
                                                                                                  non_blocking))
    driver = triton.runtime.driver._active  # None until asked: asking would create the real one (no libcuda here)
    triton.runtime.driver.set_active(_Sm90Driver())
    try:
        with config.patch({"pattern_matcher": False}):
            yield
    finally:
        triton.runtime.driver._active = driver
        for owner, name, value in reversed(saved):
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def generated_code(gm: torch.fx.GraphModule, inputs: list, options: dict) -> str:
    """Inductor's wrapper code for `gm` (its kernels' sources included), stopped before it is loaded."""
    import torch._inductor.codecache as cc
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    class Generated(BaseException):  # not an Exception: Inductor wraps those on their way out
        pass

    code: list[str] = []

    def keep(key, path, *args, **kwargs):
        code.append(Path(path).read_text())
        raise Generated

    load = cc.PyCodeCache.load_by_key_path
    cc.PyCodeCache.load_by_key_path = keep
    try:
        with config.patch(options):
            compile_fx(gm, inputs)
    except Generated:
        pass
    finally:
        cc.PyCodeCache.load_by_key_path = load
    if not code:
        raise RuntimeError("Inductor generated no code")
    return code[-1]


def launches(code: str) -> list[str]:
    """The kernels the wrapper launches, in order (`name.run(` calls)."""
    return re.findall(r"^\s+(\w+)\.run\(", code, re.M)


def fallbacks(code: str) -> list[str]:
    """Our ops the wrapper calls as fallbacks (`torch.ops.gemma4.<op>.<overload>(`), in order: an AOTInductor
    `.so` would need a proxy executor to call them, which the runtime does not have."""
    return re.findall(r"torch\.ops\.gemma4\.(\w+)\.\w+\(", code)


_USER_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('(\w+)', '''(.*?)''', device_str='cuda'\)", re.S | re.M)


def compile_user_kernels(code: str) -> tuple[int, list[str]]:
    """Compile for sm_90 each of our ops' Triton kernels (`custom_kernel=True`) as the generated code holds it:
    the source Inductor spliced together (the kernel and the jit functions it calls, found by name), which is
    what AOTInductor compiles into the `.so`. A kernel reaching a helper Inductor did not copy (through a
    module attribute, say) fails here as it would in an export on the GPU. -> (compiled, ["name: error"])."""
    import tempfile
    import types
    from unittest import mock

    import triton
    from torch._inductor.runtime import triton_heuristics
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done, failed = 0, []
    folder = Path(tempfile.mkdtemp(prefix="gemma4_kernels_"))  # Triton reads a jit function's source from its file
    for var, name, src in _USER_KERNEL.findall(code):
        if "custom_kernel=True" not in src:
            continue
        seen: dict = {}

        def user_autotune(configs, triton_meta, **_):
            def keep(fn):
                seen.update(fn=fn, meta=triton_meta, config=dict(configs[0]) if configs else {})
                return fn
            return keep

        module = types.ModuleType(f"generated_{var}")
        module.__file__ = str(folder / f"{var}.py")
        Path(module.__file__).write_text(src)
        try:
            with mock.patch.object(triton_heuristics, "user_autotune", user_autotune):
                exec(compile(src, module.__file__, "exec"), module.__dict__)
            cfg, meta = seen["config"], seen["meta"]
            options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
            cfg = {k: v for k, v in cfg.items() if k not in ("num_ctas", "maxnreg")}  # the rest: its constexprs
            signature = {a: "constexpr" if a in cfg else t for a, t in meta["signature"].items()}
            attrs = meta["configs"][0] if meta.get("configs") else {}
            triton.compile(ASTSource(seen["fn"], signature, {**meta["constants"], **cfg}, attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
            done += 1
        except Exception as e:  # noqa: BLE001  (each failure is reported with its kernel)
            failed.append(f"{var}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    shutil.rmtree(folder, ignore_errors=True)
    return done, failed


def decode_options() -> dict:
    """The Inductor options the CUDA backend compiles the decode method with (`--no-autotune`), less
    AOTInductor's own (this generates Inductor's Python wrapper), on one compile thread."""
    from export.backends.cuda import Gemma4CudaBackend
    from export.backends.options import BackendOptions

    options = Gemma4CudaBackend.compile_options(BackendOptions(method="decode", autotune=False))
    return {k: v for k, v in options.items() if not k.startswith("aot_inductor.")} | {"compile_threads": 1}


def unit_code(unit: torch.nn.Module, mode, in_place: bool = True) -> str:
    """Inductor's CUDA code for one unit decoding one token, under `cuda_without_gpu()` and the fake mode `mode`
    that holds the unit's tensors: exported as the backend receives it (torch.export, run_decompositions, the
    module), our ops that write their arguments called in place again unless `in_place` is False (the program
    as Inductor got it before export/passes/inplace_triton_ops.py), compiled with the decode method's options."""
    from export.backends.cuda import row_reductions_in_registers
    from export.chain import example_inputs
    from export.host_tma import host_tma_descriptors
    from export.kernels import int4_matmul
    from export.passes.inplace_triton_ops import inplace_triton_ops

    with mode, int4_matmul.one_config(), host_tma_descriptors():  # as the export traces and lowers
        args = [torch.empty_like(a, device="cuda") for a in example_inputs(unit, 1)]
        gm = torch.export.export(unit, tuple(args)).run_decompositions({}).module()
        if in_place:
            inplace_triton_ops(gm)
    with mode, int4_matmul.one_config(), row_reductions_in_registers(), host_tma_descriptors():
        return generated_code(gm, args, decode_options())


@torch.no_grad()
def count(preset: str, layers: int | None, kv_dtype: str, ctx: int, source: Path | None = None,
          compile_kernels: bool = False) -> dict:
    """{"units": [{unit, steps, launches, kernels, fallbacks}], "step": launches of one decode step (units by their
    steps)}; with `compile_kernels` each unit also holds `compiled` and `compile_failures` (`compile_user_kernels`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from export.backends.options import TargetDevice
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model
    from export.gemma4.options import EmbeddingQuant
    from export.gemma4.quant import QuantRecipe, quantize_

    cfg = PRESETS[preset]
    cfg = cfg.with_layers(layers) if layers else cfg
    with torch.device("meta"):  # shapes and dtypes are what the count depends on, not values
        model = Gemma4Model(cfg, ctx=ctx, prefill_chunk=min(128, ctx), dtype=torch.bfloat16, kv_dtype=kv_dtype)
        model = model.to(torch.bfloat16).eval().requires_grad_(False)
        quantize_(model, QuantRecipe(group_size=128, embedding=EmbeddingQuant.INT8), TargetDevice.CUDA)
    rows = []
    with cuda_without_gpu():
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model._apply(lambda t: torch.empty_like(t, device="cuda"))
            chain = model.chain()
        steps = [s.unit for s in chain.steps]
        for name, unit in chain.units.items():
            code = unit_code(unit, mode)
            if source:
                source.mkdir(parents=True, exist_ok=True)
                (source / f"{preset}_{name}.py").write_text(code)
            kernels = launches(code)
            rows.append({"unit": name, "steps": steps.count(name), "launches": len(kernels), "kernels": kernels,
                         "fallbacks": fallbacks(code)})
            if compile_kernels:
                rows[-1]["compiled"], rows[-1]["compile_failures"] = compile_user_kernels(code)
    return {"preset": preset, "layers": cfg.num_hidden_layers, "kv_dtype": kv_dtype, "ctx": ctx, "units": rows,
            "step": sum(r["launches"] * r["steps"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="e2b", help="comma-separated presets, each optionally PRESET:KV_DTYPE")
    ap.add_argument("--layers", type=int, default=None, help="the first N layers (default: all)")
    ap.add_argument("--kv-dtype", default="bf16", choices=["bf16", "int8", "int4"], help="unless a preset names one")
    ap.add_argument("--ctx", type=int, default=1024, help="cache length (the count does not depend on it)")
    ap.add_argument("--out", type=Path, default=None, help="write the counts as JSON")
    ap.add_argument("--source", type=Path, default=None, help="write each unit's generated code into this folder")
    ap.add_argument("--compile", action="store_true",
                    help="also compile our ops' Triton kernels as the generated code holds them, for sm_90 (what an "
                         "export compiles into the .so); exit 1 if any fails")
    a = ap.parse_args(argv)
    from export.gemma4.config import PRESETS
    runs = [(p.partition(":")[0], p.partition(":")[2] or a.kv_dtype) for p in a.preset.split(",")]
    for preset, kv in runs:
        if preset not in PRESETS or kv not in ("bf16", "int8", "int4"):
            print(f"--preset {preset!r}{':' + kv if kv != a.kv_dtype else ''}: a preset of {', '.join(PRESETS)}, "
                  f"optionally :bf16 / :int8 / :int4", file=sys.stderr)
            return 2
    docs, failures = [], []
    for preset, kv in runs:
        doc = count(preset, a.layers, kv, a.ctx, a.source, a.compile)
        docs.append(doc)
        print(f"{preset}, {doc['layers']} layers, {kv} cache: the kernels each unit launches for one token")
        print(f"{'unit':12} {'steps':>5} {'launches':>8}  kernels")
        for r in doc["units"]:
            names = " ".join(re.sub(r"_\d+$", "", k) for k in r["kernels"])
            print(f"{r['unit']:12} {r['steps']:5} {r['launches']:8}  {names}")
        print(f"a decode step: {doc['step']} launches (and the runner's sampling)")
        calls = [f"{preset} {r['unit']} {op}" for r in doc["units"] for op in r["fallbacks"]]
        failures += calls
        for c in calls:
            print(f"  FALLBACK (the .so cannot call it) {c}")
        if a.compile:
            bad = [f"{preset} {r['unit']} {f}" for r in doc["units"] for f in r["compile_failures"]]
            failures += bad
            print(f"our kernels compiled for sm_90: {sum(r['compiled'] for r in doc['units'])}, failed: {len(bad)}")
            for f in bad:
                print(f"  FAILED {f}")
        print()
    if a.out:
        a.out.write_text(json.dumps({"models": docs}, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
