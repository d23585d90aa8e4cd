"""Programmatic dependent launch (PDL) for the M == 1 int4 GEMV in a decode layer: whether letting
`_int4_gemv1_kernel` start while `_quant_x_kernel` finishes (and that one while the kernel before it
does) hides the GEMV's start-up, on the 31B's layers, in one GPU call (a measuring tool).

    python -m scripts.gemv1_pdl_variants [--out gemv1_pdl_variants.json] [--budget 90] [--prewarm 12]
        [--reps 64] [--layers sliding,full,lm_head] [--variants off,both/after]
    python -m scripts.gemv1_pdl_variants --smoke [--out smoke.json]  # Triton's interpreter, tiny shapes
    python -m scripts.gemv1_pdl_variants --sass [--out sass.json]  # offline sm_90 compiles, no GPU

Why: a layer's four GEMVs (each `_quant_x_kernel`, ~1.5 us, then the GEMV) take 94 us (sliding) and
102 us (full) as one CUDA graph on the H200 against ~58 us of weight bytes at the copy bandwidth
(scripts/measurements/int4_gemv1_launch_lane_tile.json); the mid shapes (5-23 MB) lose several us a
kernel to the launch, the ramp-up and the tail. A kernel launched with the programmatic-stream-
serialization attribute may start while the kernel before it finishes: everything before its
`griddepcontrol.wait` (here the GEMV's first weight tile and scales, constants) overlaps that kernel
(`export.kernels.pdl.pdl_wait`). PDL is sm_90+: the H200 (sm_90) and the RTX 5090 (sm_120) have it, the
RTX 4090 (sm_89) does not, and the script refuses such a GPU. AOTInductor's C++ launcher does not set
the attribute (torch/_inductor/codegen/cpp_wrapper_gpu.py), nor does torch's wrap_triton: the first
run measured the potential with direct Triton launches in CUDA graphs (a layer's projections 3 us
faster). `graph/after` is how the compiled artifact could have it: both kernels in mode 2 launched
without the attribute, as AOTInductor launches them, and the captured graph's edges into them made
programmatic before it is instantiated (scripts/graph_pdl.py). Each layer graph's edges are recorded
by kind (`replay_checks.edges`: what capture writes for a launch with the attribute, and the edit).

Variants (`VARIANTS`, (quantize, GEMV) PDL modes; mode 1 calls `griddepcontrol.launch_dependents`
first thing, mode 2 right after the wait): `off` today's launches; `gemv` the GEMV only; `both/start`
and `both/after` both kernels, the quantize kernel letting the GEMV's programs start at its own start
or after its wait; `graph/after` as `both/after` through an edited graph (above). The kernel
before each quantize kernel is an ordinary torch elementwise kernel making its x (as a norm or an
activation does: x = src * gain), launched without the attribute. Every projection runs as the op runs it (`gemv1_plan`'s tiles and K slices, the split sums in the
GEMV's last program, its counters zeroed by the quantize kernel).

Correctness first: on a ragged shape (N 1000, K 36 groups) at 1, 3 and 8 slices for each plan tile,
and on every 31B shape, each variant on a fresh x with NaN-poisoned outputs against an fp32 matmul on
the dequantized weight and bitwise against `off`, the split-sum counters back at 0 after each call;
then each layer (and the lm_head) as one CUDA graph per variant, replayed `--reps` times with fresh
x: each variant's outputs bitwise `off`'s, `off`'s within 1e-2 of fp32, every counter back at 0; the
op itself (`int4_linear`) on every shape. Timing: CUDA-graph replays (median), the weights rotated
over copies so they come from HBM (`gemv1_variants.rotated_weights`), the variants alternated; per
shape (elementwise + quantize + GEMV over every copy), then a sliding and a full layer's four
projections and the lm_head as one graph each, with the graph of the elementwise kernels alone
beside them; copy bandwidth measured in the same run. Table on stdout, one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from export.kernels import int4_matmul as im
from scripts.gemv1_launch_variants import LAYERS, op_check, poison
from scripts.gemv1_variants import (bench_graph, finish_sweep, launch_directly, main_in_interpreter, rel,
                                    rotated_weights, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.float32 if _INTERPRET else torch.bfloat16  # (the interpreter's bf16 casts)
GROUP = 128
VARIANTS = {"off": (0, 0), "gemv": (0, 2), "both/start": (1, 1), "both/after": (2, 2), "graph/after": (2, 2, "graph")}
# "graph/after": both kernels in mode 2 launched without the attribute (as AOTInductor launches them),
# their graph's edges into them made programmatic after capture (scripts/graph_pdl.py). H200, twice
# (gemv1_pdl_graph.json): the edited graph had capture's edge kinds for `both/after` exactly, yet timed as
# `off` (+0.1 / +0.2 us a layer where `both/after` took -3.2 / -3.5); a kernel node carries no
# programmatic attribute of its own to set (cuGraphKernelNodeGet/SetAttribute: invalid value)
PDL_KERNELS = ("_quant_x_kernel", "_int4_gemv1_kernel")
ROUNDS = (1, 1) if _INTERPRET else (3, 2)  # the variants' turns in a layer's graph and in a projection's
# the 31B's M == 1 shapes in the interpreter: tiny stand-ins, `gemv1_plan`'s thresholds scaled to them
# (one slice from 96 rows; below, 128-row tiles and 64-row ones from 52 rows, K in slices of >= 512)
TINY_SHAPES = {"qkv_proj.sliding": (48, 1024), "o_proj.sliding": (40, 1024), "mlp.gate_up_proj": (96, 512),
               "mlp.down_proj": (40, 1280), "qk_proj.full": (56, 1024), "o_proj.full": (40, 1536),
               "lm_head": (128, 512)}


def select_variants(names: str) -> dict:
    """The variants a run compares: `off` and those named (comma-separated, `--variants`)."""
    unknown = [nm for nm in names.split(",") if nm and nm not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    chosen = {"off": VARIANTS["off"]}
    chosen.update({nm: VARIANTS[nm] for nm in names.split(",") if nm and nm != "off"})
    return chosen


def project(x, q, s, pdl, splits=None, cfg=None):
    """x [1, K] @ dequant(W).T as the op runs it (`gemv1_plan`, or the given tile and slices), the
    quantize kernel and the GEMV launched in PDL modes pdl = (quantize, GEMV[, "graph": without the
    launch attribute])."""
    n, k = q.shape[0], q.shape[1] * 2
    pc, ps, *_ = im.gemv1_plan(n, k, GROUP)
    return im.int4_gemv1(x, q, s, ps if splits is None else splits, kernel=im._gemv1_kernel(cfg or pc),
                         pdl_quant=pdl[0], pdl_gemv=pdl[1], pdl_attr="graph" not in pdl[2:])


def graph_edit(pdl):
    """What a capture of these PDL modes needs before it is instantiated: for "graph" variants, the
    edges into the quantize kernels and GEMVs made programmatic; else nothing."""
    if "graph" not in pdl[2:]:
        return None
    from scripts.graph_pdl import make_programmatic
    return lambda graph: make_programmatic(graph, PDL_KERNELS)


@contextlib.contextmanager
def counters(found: list):
    """`int4_matmul._quant_x` recording in `found` the split-sum counters it has the quantize kernel
    zero (cnt[:ncnt]), to read them after the GEMVs: each must be back at 0."""
    orig = im._quant_x

    def recording(x2, G, cnt, ncnt, *args, **kwargs):
        if ncnt:
            found.append(cnt[:ncnt])
        return orig(x2, G, cnt, ncnt, *args, **kwargs)

    im._quant_x = recording
    try:
        yield found
    finally:
        im._quant_x = orig


def counters_zero(found: list) -> bool:
    return all(int(c.count_nonzero()) == 0 for c in found)


class Captured:
    """fn (a list of outputs) as one CUDA graph, its outputs refreshed by each replay, and the split
    counters its launches use; in the interpreter fn itself, run again at each replay. edit: a
    function of the captured graph's handle, run before it is instantiated (`graph_edit`)."""

    def __init__(self, fn, edit=None):
        self.fn, self.cnt = fn, []
        if _INTERPRET:
            self.replay()
            return
        fn()
        torch.cuda.synchronize()
        self.g = torch.cuda.CUDAGraph(keep_graph=True)  # its edges read (and edited) before instantiating
        with counters(self.cnt), torch.cuda.graph(self.g):
            self.out = fn()
        self.edges = {"captured": _edge_kinds(self.g.raw_cuda_graph())}
        if edit is not None:
            self.edges["made_programmatic"] = edit(self.g.raw_cuda_graph())
            self.edges["edited"] = _edge_kinds(self.g.raw_cuda_graph())
        self.g.instantiate()

    def replay(self):
        if _INTERPRET:
            self.cnt = []
            with counters(self.cnt):
                self.out = self.fn()
        else:
            self.g.replay()
            torch.cuda.synchronize()
        return self.out


def _edge_kinds(graph) -> dict:
    """The graph's edges by (from port, to port, type) (scripts/graph_pdl.py), or why not."""
    try:
        from scripts.graph_pdl import edge_kinds
        return edge_kinds(graph)
    except Exception as e:  # a diagnostic: reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def checked(pdl, q, s, ref_w, vs_off=False, splits=None, cfg=None):
    """(rel err vs fp32, bitwise equal to `off` on the same x (when vs_off), the split counters back
    at 0) of PDL modes `pdl` on a fresh x, its outputs NaN-poisoned."""
    n, k = q.shape[0], q.shape[1] * 2
    x = torch.randn(1, k, device=DEVICE, dtype=XDT)
    try:
        base = project(x, q, s, VARIANTS["off"], splits, cfg) if vs_off else None
        poison(2 * n, 4 * n, 48 * n, n)
        found = []
        with counters(found):
            y = project(x, q, s, pdl, splits, cfg)
        if not _INTERPRET:
            torch.cuda.synchronize()
    except Exception as e:  # a variant that fails to compile or launch is reported and fails, not fatal
        print(f"  PDL {pdl} on {n}x{k}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan"), False, False
    return rel(y, x.float() @ ref_w.t()), base is None or torch.equal(y, base), counters_zero(found)


def ragged_checks(doc) -> bool:
    """Each variant at each plan tile and 1, 3, 8 slices on a shape no tile divides."""
    n, k = (40, 1280) if _INTERPRET else (1000, 4608)
    q, s = im.quantize_int4(torch.randn(n, k, device=DEVICE), GROUP)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    tiles = {im.gemv1_plan(*shp, GROUP)[0].kwargs["BLOCK_N"]: im.gemv1_plan(*shp, GROUP)[0]
             for shp in ((5376, 8192), (16384, 5376))}  # the plan's two tiles (128 and 64 rows)
    bad, worst, count = [], 0.0, 0
    for bn, cfg in sorted(tiles.items()):
        for sp in (1, 3) if _INTERPRET else (1, 3, 8):
            for name, pdl in VARIANTS.items():
                err, same, zero = checked(pdl, q, s, ref_w, name != "off", sp, cfg)
                worst, count = max(worst, err), count + 1
                if not (err <= 1e-2 and same and zero):
                    bad.append((bn, sp, name, err, same, zero))
    doc["ragged"] = {"n": n, "k": k, "checks": count, "worst_rel_err": worst, "bad": bad}
    print(f"ragged checks ({count}, N {n}, K {k}): worst rel err {worst:.1e}; "
          f"{'all bitwise = off, counters 0' if not bad else f'FAIL {bad}'}", flush=True)
    return not bad


class Block:
    """Projections as a decode layer runs them: per weight copy and projection, x = src * gain (one
    elementwise torch kernel, what a norm or an activation leaves), then the projection. src is the
    same tensor for every variant, refreshed between replays."""

    def __init__(self, names, shapes, weights):
        self.names, self.weights = names, weights
        self.src = {nm: torch.randn(1, shapes[nm][1], device=DEVICE, dtype=XDT) for nm in names}
        self.gain = {nm: torch.rand(shapes[nm][1], device=DEVICE, dtype=XDT) + 0.5 for nm in names}

    def x(self, nm):
        return torch.mul(self.src[nm], self.gain[nm])

    def run(self, pdl, copies):
        return [project(self.x(nm), *self.weights[nm][c], pdl) for c in range(copies) for nm in self.names]

    def x_only(self, copies):
        return [self.x(nm) for _ in range(copies) for nm in self.names]

    def refresh(self):
        for t in self.src.values():
            t.copy_(torch.randn_like(t))


def replay_checks(block: Block, refs: dict, reps: int) -> dict:
    """Each variant's graph of the block (the last weight copy), replayed `reps` times with fresh x:
    bitwise `off`'s outputs, `off`'s against fp32, every split counter back at 0 after each replay."""
    graphs, errors = {}, {}
    for name, pdl in VARIANTS.items():
        try:
            graphs[name] = Captured(lambda pdl=pdl: block.run(pdl, 1), graph_edit(pdl))
        except Exception as e:  # a variant that fails to capture is reported (and fails the checks), not fatal
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {name}: {errors[name]}", flush=True)
    if "off" not in graphs:
        return {"reps": 0, "mismatches": {"off": 1}, "counter_not_zero": {}, "off_worst_rel_err": float("nan"),
                "counter_buffers": {}, "errors": errors}
    mism = {name: (0 if name in graphs else 1) for name in VARIANTS}
    nonzero = {name: 0 for name in VARIANTS}
    worst = 0.0
    for _ in range(reps):
        block.refresh()
        outs = {name: g.replay() for name, g in graphs.items()}
        for name, g in graphs.items():
            mism[name] += sum(not torch.equal(a, b) for a, b in zip(outs[name], outs["off"]))
            nonzero[name] += not counters_zero(g.cnt)
        for nm, y in zip(block.names, outs["off"]):
            worst = max(worst, rel(y, block.x(nm).float() @ refs[nm].t()))
    counts = {name: len(g.cnt) for name, g in graphs.items()}
    edges = {name: getattr(g, "edges", None) for name, g in graphs.items()}
    del graphs
    return {"reps": reps, "mismatches": mism, "counter_not_zero": nonzero, "off_worst_rel_err": worst,
            "counter_buffers": counts, "errors": errors, "edges": edges}


def median(ts: list) -> float:
    return sorted(ts)[len(ts) // 2]


def alternated(fns: dict, copies: int, rounds: int) -> dict:
    """us per copy of each graph (median of its replays), the graphs timed in turn, `rounds` times
    (a variant's graph edited as `graph_edit` says)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            try:
                times[name].append(bench_graph(fn, copies, edit=graph_edit(VARIANTS.get(name, (0, 0)))))
            except Exception as e:  # reported, not fatal (its checks fail first)
                print(f"  {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                times[name].append(float("nan"))
    return times


def _prewarm_worker(idx, count):
    """Compiles each (tile, split sum, PDL modes) the run launches (Triton's disk cache)."""
    launch_directly("gemv1_pdl_variants prewarm")
    tiles = [im.gemv1_plan(5376, 8192, GROUP)[0], im.gemv1_plan(16384, 5376, GROUP)[0]]  # 128 and 64 rows
    # one slice or split (the sum's mode), x's group count and the counters' (their specializations)
    jobs = [(cfg, sp, pdl, k, n) for cfg in tiles for sp in (1, 2) for pdl in VARIANTS.values()
            for k in (5376, 8192) for n in (256, 1000)]
    for cfg, sp, pdl, k, n in jobs[idx::count]:
        q, s = im.quantize_int4(torch.randn(n, k, device=DEVICE), GROUP)
        try:
            project(torch.randn(1, k, device=DEVICE, dtype=XDT), q, s, pdl, sp, cfg)
        except Exception:
            pass
    torch.cuda.synchronize()


def compile_sm90(pdl: int | None, red: int = 2) -> dict:
    """Offline, no GPU: `_quant_x_kernel` and the GEMV at `gemv1_plan`'s 128-row tile (x as levels,
    split sum `red`) compiled for sm_90 in PDL mode `pdl` (None: the
    argument left out, the kernels' default): {kernel: {"ptx": its code without the debug sections and
    line marks (source line numbers), "sass": cuobjdump's, "res": its registers and stack ("REG:n
    STACK:m")}}."""
    import re
    import tempfile

    import triton
    from scripts.gemv1_tile_variants import _compile_sm90
    extra = {} if pdl is None else {"PDL": pdl}
    cfg = im.gemv1_plan(5376, 8192, GROUP)[0]
    sig = {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16",
           "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
           "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32"}
    const = {"GROUP": GROUP, **{k: cfg.kwargs[k] for k in ("BLOCK_N", "PARTS", "GROUPS", "DEPTH")}, "RED": red,
             "XQ": True, "ASM": True, **extra}
    ks = {"gemv": _compile_sm90(im._int4_gemv1_kernel, sig, const, cfg.num_warps,
                                ["x_ptr", "xf_ptr", "xc_ptr", "w_ptr", "s_ptr", "part_ptr", "y_ptr", "cnt_ptr",
                                 "stride_ww"]),
          "quant": _compile_sm90(im._quant_x_kernel, {"x_ptr": "*bf16", "u_ptr": "*bf16", "xq_ptr": "*i32",
                                                      "xf_ptr": "*fp32", "xc_ptr": "*i32", "cnt_ptr": "*i32",
                                                      "NG": "i32", "NCNT": "i32"},
                                 {"GROUP": GROUP, "GB": im.QUANT_X_GROUPS, **extra}, 4,
                                 ["x_ptr", "u_ptr", "xq_ptr", "xf_ptr", "xc_ptr", "cnt_ptr"])}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = {}
    for name, k in ks.items():
        ptx = k.asm["ptx"].split("\t.section\t.debug")[0]
        ptx = "\n".join(ln for ln in ptx.splitlines() if not re.match(r"\s*\.(loc|file)\b", ln))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True).stdout
            res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        out[name] = {"ptx": ptx, "sass": sass, "res": " ".join(re.findall(r"REG:\d+|STACK:\d+", res))}
    return out


def sass_order(sass: str) -> list[str]:
    """The SASS's global loads, stores, atomics and grid-dependency ops in order, as short tags: ldg128
    (a weight tile's 16 bytes), ldg32 / ldg32nc (x's levels, factor, correction; nc: non-coherent),
    ldg16nc (a scale), stg, atom, wait (ACQBULK: griddepcontrol.wait), release (PREEXIT:
    griddepcontrol.launch_dependents)."""
    tags = []
    for line in sass.splitlines():
        op = line.split(";")[0].split("*/")[-1].strip()
        op = op.split(" ", 1)[1] if op.startswith("@") else op
        word = op.split(" ")[0]
        if word.startswith("LDG"):
            tags.append("ldg128" if ".128" in word else "ldg16nc" if ".U16" in word else
                        "ldg32nc" if ".CONSTANT" in word else "ldg32")
        elif word.startswith(("STG", "ATOMG", "RED.")):
            tags.append("stg" if word.startswith("STG") else "atom")
        elif word in ("ACQBULK", "PREEXIT"):
            tags.append({"ACQBULK": "wait", "PREEXIT": "release"}[word])
    return tags


def sass_report(out: Path) -> int:
    """`--sass`: the offline compiles' hashes (PDL left out, 0, 1, 2) and their order of loads and waits."""
    import hashlib
    doc = {}
    for pdl in (None, 0, 1, 2):
        for red in (0, 2):
            for name, k in compile_sm90(pdl, red).items():
                if name == "quant" and red == 0:
                    continue
                order = sass_order(k["sass"])
                key = f"{name}{'' if name == 'quant' else f'/r{red}'}/pdl {pdl}"
                doc[key] = {"ptx_sha256": hashlib.sha256(k["ptx"].encode()).hexdigest()[:16],
                            "sass_sha256": hashlib.sha256(k["sass"].encode()).hexdigest()[:16],
                            "before_wait": order[:order.index("wait")] if "wait" in order else None,
                            "order": " ".join(order)}
                print(f"{key:18} ptx {doc[key]['ptx_sha256']} sass {doc[key]['sass_sha256']} "
                      f"before the wait: {doc[key]['before_wait']}", flush=True)
    out.write_text(json.dumps({"target": "sm_90 (offline)", "kernels": doc}, indent=1) + "\n")
    return 0


def shapes_31b() -> dict:
    if _INTERPRET:  # the logic on tiny stand-ins
        im.GEMV1_SMALL_N, im.GEMV1_LARGE_N, im.GEMV1_MID_SPLITS, im.GEMV1_WIDE_N = 8, 96, 3, 52
        im.GEMV1_STEP_MAX_K = im.GEMV1_THIN_N = 0  # the 31B's plan: no small-weight tile
        return dict(TINY_SHAPES)
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes
    return {(names if isinstance(names, str) else "+".join(names)): (n, k)
            for (n, k), (names, _) in linear_shapes(PRESETS["31b"]).items()}


def main(argv=None) -> int:
    global VARIANTS  # --variants chooses them
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_pdl_variants.json"))
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; what is left when it runs out is skipped")
    ap.add_argument("--prewarm", type=int, default=12)
    ap.add_argument("--reps", type=int, default=64, help="graph replays with fresh x per variant and layer")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, of " + ", ".join(LAYERS)
                    + ": these graphs and their projections' shapes only")
    ap.add_argument("--smoke", action="store_true", help="this run in Triton's interpreter on tiny shapes")
    ap.add_argument("--sass", action="store_true", help="offline: compile for sm_90, hashes and the order of loads")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS)
                    + " (comma-separated; off always runs; default all)")
    a = ap.parse_args(argv)
    VARIANTS = select_variants(a.variants)
    if a.sass:
        return sass_report(a.out)
    if a.smoke and not _INTERPRET:
        rest = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--smoke"]
        return main_in_interpreter("scripts.gemv1_pdl_variants", rest)
    t0 = time.time()
    if not launch_directly("gemv1_pdl_variants"):
        return 2
    if not _INTERPRET and torch.cuda.get_device_capability() < (9, 0):
        cc = "%d%d" % torch.cuda.get_device_capability()
        print(f"gemv1_pdl_variants: {torch.cuda.get_device_name()} is sm_{cc}; programmatic dependent launch "
              "needs sm_90+ (H100 / H200 sm_90, RTX 5090 sm_120; not the RTX 4090, sm_89)", file=sys.stderr)
        return 2
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 45)
    t = torch.zeros(1, device=DEVICE)
    launch_us = bench_graph(lambda: [t.add_(1) for _ in range(20)], 20)
    print(f"copy {gbps:.0f} GB/s, a tiny kernel in a graph {launch_us:.2f} us ({dev})", flush=True)
    doc = {"device": dev, "copy_gbps": gbps, "tiny_kernel_graph_us": launch_us, "variants": VARIANTS,
           "shapes": [], "layers": {}}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    ok = ragged_checks(doc)
    save()
    layers = {nm: LAYERS[nm] for nm in a.layers.split(",")}
    shapes = {nm: shp for nm, shp in shapes_31b().items() if any(nm in ps for ps in layers.values())}
    weights, refs, floors = {}, {}, {}
    for name in sorted(shapes, key=lambda nm: shapes[nm][0] * shapes[nm][1]):  # weights and eager checks
        n, k = shapes[name]
        nbytes, ws, ref_w = rotated_weights(n, k, GROUP)
        weights[name], refs[name], floors[name] = ws, ref_w, nbytes / gbps / 1e3
        op_err = op_check(ws[-1][0], ws[-1][1], ref_w)
        checks = {v: checked(pdl, ws[-1][0], ws[-1][1], ref_w, v != "off") for v, pdl in VARIANTS.items()}
        shape_ok = op_err <= 1e-2 and all(e <= 1e-2 and same and zero for e, same, zero in checks.values())
        ok = ok and shape_ok
        doc["shapes"].append({"shape": name, "n": n, "k": k, "floor_us": floors[name], "copies": len(ws),
                              "plan": str(im.gemv1_plan(n, k, GROUP)), "op_rel_err": op_err,
                              "checks": {v: {"rel_err": e, "bitwise_off": same, "counters_zero": zero}
                                         for v, (e, same, zero) in checks.items()}})
        print(f"{name:18} {n:6}x{k:<5} the op {op_err:.1e}, off {checks['off'][0]:.1e}: "
              f"{'every variant bitwise = off, counters 0' if shape_ok else f'FAIL {checks}'}", flush=True)
    print(f"checks done at {time.time() - t0:.0f} s", flush=True)
    save()
    names = list(VARIANTS)
    print(f"\n{'graph (us)':18} {'floor':>6} {'x only':>6} | " + " ".join(f"{n:>17}" for n in names)
          + "   (rounds)", flush=True)
    fmt = lambda ts: " ".join(f"{t_:5.1f}" for t_ in ts)
    for lname, lnames in layers.items():
        if time.time() - t0 > a.budget:
            print(f"budget spent: {lname} skipped", flush=True)
            continue
        block = Block(list(lnames), shapes, weights)
        rc = replay_checks(block, refs, 2 if _INTERPRET else a.reps)
        layer_ok = (not any(rc["mismatches"].values()) and not any(rc["counter_not_zero"].values())
                    and rc["off_worst_rel_err"] <= 1e-2)
        ok = ok and layer_ok
        copies = 1 if _INTERPRET else min(2, min(len(weights[nm]) for nm in lnames))
        fns = {v: (lambda pdl=pdl: block.run(pdl, copies)) for v, pdl in VARIANTS.items()}
        times = alternated({**fns, "x only": lambda: block.x_only(copies)}, copies, ROUNDS[0])
        floor = sum(floors[nm] for nm in lnames)
        doc["layers"][lname] = {"projections": list(lnames), "floor_us": floor, "copies": copies, "us": times,
                                "replay_checks": rc}
        print(f"{lname:18} {floor:6.1f} {median(times['x only']):6.1f} | "
              + " ".join(f"{fmt(times[v]):>17}" for v in names)
              + f"   {rc['reps']} replays: {'bitwise = off, counters 0' if layer_ok else f'FAIL {rc}'}", flush=True)
        save()
    if doc["layers"]:
        print(f"\n{'medians (us)':18} {'floor':>6} | " + " ".join(f"{n:>10}" for n in names)
              + "   (PDL's change against off)", flush=True)
    for lname, lay in doc["layers"].items():
        med = {v: median(lay["us"][v]) for v in names}
        print(f"{lname:18} {lay['floor_us']:6.1f} | " + " ".join(f"{med[v]:10.1f}" for v in names) + "   "
              + " ".join(f"{v} {med[v] - med['off']:+.1f}" for v in names[1:]), flush=True)
    print(f"\n{'projection (us)':18} {'floor':>6} {'x only':>6} | " + " ".join(f"{n:>11}" for n in names), flush=True)
    for name in sorted(shapes, key=lambda nm: shapes[nm][0] * shapes[nm][1]):
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        copies = 1 if _INTERPRET else len(weights[name])
        block = Block([name], shapes, weights)
        fns = {v: (lambda pdl=pdl: block.run(pdl, copies)) for v, pdl in VARIANTS.items()}
        times = alternated({**fns, "x only": lambda: block.x_only(copies)}, copies, ROUNDS[1])
        row = next(r for r in doc["shapes"] if r["shape"] == name)
        row["us"] = times
        print(f"{name[:18]:18} {floors[name]:6.1f} {median(times['x only']):6.1f} | "
              + " ".join(f"{fmt(times[v]):>11}" for v in names), flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
