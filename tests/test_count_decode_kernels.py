"""scripts/count_decode_kernels.py: Inductor's CUDA code for each decode unit, generated on this machine (no GPU),
and the launches a decode step makes. The counts are the decode's launch budget: a change that adds a kernel to
every layer shows here (at ~1.4-3 us a launch it costs E2B 3-5% of its step), and one that saves one must lower
them. The figures come from the generated code (`--source` writes it)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import run_script

# Every count a test reads: (presets, layers, environment switches, more arguments). A count is one process on one
# core (Inductor's code generation, ~30 s); the module's fixture starts those of the selected tests as many at a
# time as the machine has cores (shared among pytest-xdist's workers), in the order the tests read them.
ROWS, FUSED_ATTENTION, FUSED_MLP, FUSED_CLOSE = ("GEMMA4_ATTENTION_ROWS", "GEMMA4_FUSED_ATTENTION", "GEMMA4_FUSED_MLP",
                                                 "GEMMA4_FUSED_CLOSE")
RUNS = {
    "e2b": ("e2b", "5", {}, ()),
    "31b": ("31b:int4", "6", {}, ()),
    "rows e2b": ("e2b", "5", {ROWS: "1"}, ()),
    "rows 31b": ("31b:int4", "6", {ROWS: "1"}, ()),
    "26b words": ("26b-a4b", "1", {"GEMMA4_MOE_GATE_UP_Q": "0"}, ()),
    "26b q": ("26b-a4b", "1", {"GEMMA4_MOE_GATE_UP_Q": "1"}, ()),
    "attention 31b": ("31b:int4", "6", {FUSED_ATTENTION: "1"}, ()),
    "attention 26b": ("26b-a4b", "1", {FUSED_ATTENTION: "1"}, ()),
    "mlp e2b unstaged": ("e2b", "5", {FUSED_MLP: "1", "GEMMA4_GEMV1_STAGED_MLP": "0"}, ()),
    "mlp e2b": ("e2b", "5", {FUSED_MLP: "1"}, ()),
    "mlp 31b": ("31b:int4", "6", {FUSED_MLP: "1"}, ()),
    "mlp attention 31b": ("31b:int4", "6", {FUSED_MLP: "1", FUSED_ATTENTION: "1"}, ()),
    "close e2b": ("e2b", "5", {FUSED_CLOSE: "1"}, ()),
    "close 31b": ("31b:int4", "6", {FUSED_CLOSE: "1"}, ()),
    "close attention 31b": ("31b:int4", "6", {FUSED_CLOSE: "1", FUSED_ATTENTION: "1"}, ()),
    "close 26b": ("26b-a4b", "1", {FUSED_CLOSE: "1"}, ()),
    "close attention mlp 26b": ("26b-a4b", "1", {FUSED_CLOSE: "1", FUSED_ATTENTION: "1", FUSED_MLP: "1"}, ()),
    "compile every switch": ("26b-a4b,31b:int4,e2b", "6", {"GEMMA4_MOE_GATE_UP_Q": "1", FUSED_ATTENTION: "1",
                                                          FUSED_MLP: "1", FUSED_CLOSE: "1", "GEMMA4_GEMV1_STAGE": "1"},
                             ("--compile",)),
    "compile 31b": ("31b:int4", "2", {}, ("--compile",)),
    "tma off 31b": ("31b:int4", "2", {"GEMMA4_GEMV1_TMA": "0"}, ()),
}
READS = {  # test: the counts it reads
    "test_e2b_units": ["e2b"],
    "test_31b_units_int4_cache": ["31b"],
    "test_attention_rows_switch_takes_the_norms_kernel": ["rows e2b", "rows 31b"],
    "test_26b_dp4a_gate_up_takes_the_norm_kernels_place": ["26b words", "26b q"],
    "test_fused_attention_switch_takes_the_o_projections_quantize_kernel": ["attention 31b", "attention 26b"],
    "test_fused_mlp_switch_takes_the_activations_quantize_kernel": ["mlp e2b unstaged", "mlp e2b", "mlp 31b",
                                                                    "mlp attention 31b"],
    "test_fused_close_switch_takes_the_closing_adds_kernel": ["close e2b", "close 31b", "close attention 31b",
                                                              "close 26b", "close attention mlp 26b"],
    "test_our_kernels_compile_as_the_generated_code_holds_them": ["compile every switch"],
    "test_tma_gemv_goes_through_inductor_and_compiles": ["compile 31b", "tma off 31b"],
}


class Counts:
    """The counts `keys` name, run in the background as many at a time as this process has cores (its share of
    them under pytest-xdist); `docs(key)` waits for one and gives its models' records, `units(key)` its one model's
    units by name."""

    def __init__(self, tmp, keys: list[str]):
        self.tmp = tmp
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)) // workers))
        self.futures = {key: self.pool.submit(self._run, key) for key in keys}

    def _run(self, key: str):
        presets, layers, env, more = RUNS[key]
        out = self.tmp / (key.replace(" ", "_") + ".json")
        r = run_script("scripts.count_decode_kernels", "--preset", presets, "--layers", layers, *more, "--out",
                       str(out), timeout=900, env=env)
        return r, out

    def docs(self, key: str) -> list[dict]:
        if key not in self.futures:  # a count READS does not list for the test: run now
            self.futures[key] = self.pool.submit(self._run, key)
        r, out = self.futures[key].result()
        assert r.returncode == 0, (key, r.stdout[-3000:] + r.stderr[-3000:])
        return json.loads(out.read_text())["models"]

    def units(self, key: str) -> dict:
        (doc,) = self.docs(key)
        return {u["unit"]: u for u in doc["units"]} | {"step": doc["step"]}


@pytest.fixture(scope="module")
def counts(request, tmp_path_factory):
    names = [item.originalname for item in request.session.items if item.module is request.module]
    keys = list(dict.fromkeys(key for name in names for key in READS.get(name, [])))
    c = Counts(tmp_path_factory.mktemp("counts"), keys)
    yield c
    c.pool.shutdown(cancel_futures=True)


def test_e2b_units(counts):
    """E2B's first five layers (four sliding, one full), bf16 cache: a sliding layer is 11 launches (q / k / v
    with the norm, their norms + RoPE + cache write as one combo kernel, attention and its combine, o, the GEMV of
    gate / up computing the residual add and both norms itself (a staged tile, bf16 x), the quantize kernel and
    GEMV of down (the TMA GEMV in K slices), the per-layer gate and projection, the closing norm), the full layer as
    many (its o projection's
    K of 4096 takes the staged tiles' one bf16-x launch, no quantize kernel); no launch copies the position (the
    attention op reads the method's pos); the head is 3 (the lm_head's quantize kernel computing the final norm,
    its GEMV, the soft cap)."""
    u = counts.units("e2b")
    assert (u["embed"]["launches"], u["layer0"]["launches"], u["layer4"]["launches"], u["head"]["launches"]) == \
        (3, 11, 11, 3), u
    sliding = u["layer0"]["kernels"]
    assert sum(k.startswith("_int4_gemv1") for k in sliding) == 6, sliding
    assert [k.startswith("_int4_gemv1_tma_kernel") for k in sliding].count(True) == 1, sliding  # down's
    assert sum(k.startswith(("_attn_body", "_combine")) for k in sliding) == 2, sliding
    assert not any(k.startswith("triton_poi") for k in sliding), sliding
    assert sum(k.startswith("_quant_x_kernel") for k in sliding) == 1, sliding  # down's
    assert u["step"] == 3 + 5 * 11 + 3
    assert u["head"]["kernels"][0].startswith("_quant_x_kernel"), u  # the final norm in the lm_head's quantize kernel


def test_31b_units_int4_cache(counts):
    """The 31B's sliding layer is 11 launches (decode attention takes the projection's raw rows: its 2 q heads per
    KV head x 256 are within the rows' default), its full layer with the int4 cache 16: the norms' kernel, two
    Hadamard rotations (q, k and v joined in one launch, the output back) and two more of Inductor's kernels (the
    rotated K / V quantized and written into the cache); the rows the joint rotation reads are written in place by
    the norms' kernel (no copy joins them)."""
    u = counts.units("31b")
    assert (u["layer0"]["steps"], u["layer5"]["steps"]) == (5, 1), u
    assert (u["layer0"]["launches"], u["layer5"]["launches"]) == (11, 16), u
    sliding = u["layer0"]["kernels"]
    assert sliding[1].startswith("_int4_gemv1") and sliding[2].startswith("_attn_body"), sliding
    assert sum(k.startswith("_hadamard_kernel") for k in u["layer5"]["kernels"]) == 2, u["layer5"]["kernels"]


def test_attention_rows_switch_takes_the_norms_kernel(counts):
    """With GEMMA4_ATTENTION_ROWS=1 decode attention takes the projection's raw rows (its kernel norms, rotates and
    writes the step's K / V): E2B's sliding and full layers (bf16 cache) are 10 launches, attention right after the
    q / k / v GEMV; the 31B's sliding layer 11 while its full layer with the int4 cache keeps 16 (a quantized cache
    takes the model's ops)."""
    u = counts.units("rows e2b")
    assert (u["layer0"]["launches"], u["layer4"]["launches"]) == (10, 10), u
    for n in ("layer0", "layer4"):
        kernels = u[n]["kernels"]
        assert kernels[0].startswith("_int4_gemv1") and kernels[1].startswith("_attn_body"), kernels
    u = counts.units("rows 31b")
    assert (u["layer0"]["launches"], u["layer5"]["launches"]) == (11, 16), u


def test_26b_dp4a_gate_up_takes_the_norm_kernels_place(counts):
    """The 26B-A4B's (full) layer is 15 launches with the MoE gate / up from x's int8 levels too
    (GEMMA4_MOE_GATE_UP_Q=1): x's quantize kernel computes the experts' input norm, in place of the norm's own
    kernel."""
    words, q = counts.units("26b words")["layer0"]["kernels"], counts.units("26b q")["layer0"]["kernels"]
    assert len(words) == len(q) == 15, (words, q)
    i = next(n for n, k in enumerate(words) if k.startswith("_gemv_words_gate_up_kernel"))
    assert words[i - 1].startswith("triton_per_fused") and q[i - 1].startswith("_quant_x_kernel"), (words, q)
    assert q[i].startswith("_gemv_q_gate_up_kernel"), q


def test_fused_attention_switch_takes_the_o_projections_quantize_kernel(counts):
    """With GEMMA4_FUSED_ATTENTION=1 the attention's combine writes the o projection's x levels: the 31B's sliding
    layer is 11 launches (the GEMV right after the combine), its full layer with the int4 cache 14 (the output's
    rotation back in the combine too), and the 26B-A4B's (full) layer is 14."""
    u = counts.units("attention 31b")
    assert (u["layer0"]["launches"], u["layer5"]["launches"]) == (11, 14), u
    for kernels in (u["layer0"]["kernels"], u["layer5"]["kernels"]):
        assert kernels[next(n for n, k in enumerate(kernels) if k.startswith("_combine")) + 1].startswith("_int4_gemv1")
    assert sum(k.startswith("_hadamard_kernel") for k in u["layer5"]["kernels"]) == 1  # q / k / v's alone
    assert counts.units("attention 26b")["layer0"]["launches"] == 14


def test_fused_mlp_switch_takes_the_activations_quantize_kernel(counts):
    """With GEMMA4_FUSED_MLP=1 the gate / up GEMV writes the down GEMV's x levels where both take levels: E2B's
    layers with the staged MLP tiles off (GEMMA4_GEMV1_STAGED_MLP=0; 12 launches unfused) are 11 launches (the down
    GEMV right after the gate / up's, no quantize kernel between); with them (the default) its gate / up takes bf16
    x, the quantize kernel before down stays and the switch changes nothing (11). The 31B's sliding layer 10 (its
    attention on the raw rows), and 10 with GEMMA4_FUSED_ATTENTION=1 too (the combine writing the o projection's
    levels in place of the rows, which that switch turns off)."""
    u = counts.units("mlp e2b unstaged")
    assert (u["layer0"]["launches"], u["layer4"]["launches"]) == (11, 11), u
    for kernels in (u["layer0"]["kernels"], u["layer4"]["kernels"]):  # qkv, o, gate / up, down, ... GEMVs
        gemvs = [i for i, k in enumerate(kernels) if k.startswith("_int4_gemv1_kernel")]
        assert gemvs[3] == gemvs[2] + 1, kernels
    staged = counts.units("mlp e2b")["layer0"]["kernels"]
    gemvs = [i for i, k in enumerate(staged) if k.startswith("_int4_gemv1_kernel")]
    assert len(staged) == 11 and staged[gemvs[2] + 1].startswith("_quant_x_kernel"), staged
    assert counts.units("mlp 31b")["layer0"]["launches"] == 10  # (a one-layer slice's layer is a full one)
    assert counts.units("mlp attention 31b")["layer0"]["launches"] == 10


def test_fused_close_switch_takes_the_closing_adds_kernel(counts):
    """With GEMMA4_FUSED_CLOSE=1 a layer's last GEMV writes the layer's output (the closing add): E2B's sliding layer
    is 10 launches and its full one too, each ending in the per-layer projection's GEMV; the 31B's sliding layer 9
    (its MLP op is the fused one, no activation quantize either; its attention on the raw rows), 9 with
    GEMMA4_FUSED_ATTENTION=1 too (in place of the rows); the 26B-A4B's (full) layer 14."""
    u = counts.units("close e2b")
    assert (u["layer0"]["launches"], u["layer4"]["launches"]) == (10, 10), u
    assert all(u[n]["kernels"][-1].startswith("_int4_gemv1_kernel") for n in ("layer0", "layer4")), u
    u = counts.units("close 31b")
    assert u["layer0"]["launches"] == 9 and u["layer0"]["kernels"][-1].startswith("_int4_gemv1_kernel"), u
    assert counts.units("close attention 31b")["layer0"]["launches"] == 9
    # the 26B-A4B: the experts' down kernel writes it (14 launches, the last of them that kernel); 13 with the
    # attention's fusion too (its dense MLP's GEMVs take bf16 x: the MLP's fusion has no quantize kernel to take)
    u = counts.units("close 26b")
    assert u["layer0"]["launches"] == 14 and u["layer0"]["kernels"][-1].startswith("_gemv_words_down_kernel"), u
    assert counts.units("close attention mlp 26b")["layer0"]["launches"] == 13


def test_our_kernels_compile_as_the_generated_code_holds_them(counts):
    """Every Triton kernel of our ops, as Inductor splices it into the decode code (with the jit functions it
    calls), compiles for sm_90: the 26B-A4B with the MoE's dp4a gate / up, the 31B with its int4 cache and E2B,
    all with the attention's combine writing the o projection's levels, the gate / up GEMV the down's, the layer's
    last GEMV its closing add and the small weights' GEMVs computing x once a program (the switches an export can
    turn on)."""
    docs = counts.docs("compile every switch")
    assert [doc["preset"] for doc in docs] == ["26b-a4b", "31b", "e2b"]
    for doc in docs:
        assert all(u["compile_failures"] == [] for u in doc["units"]), doc
        assert sum(u["compiled"] for u in doc["units"]) >= 15, doc  # each layer's GEMVs, attention, ...


def test_tma_gemv_goes_through_inductor_and_compiles(counts):
    """On sm_90+ (the count answers as an H200) the 31B's mid-size weights (q / k / v, o, down) launch the TMA-fed
    GEMV, its weight as a tensor descriptor through the trace and Inductor's code (export/host_tma.py; without it
    Inductor failed on the descriptor), gate / up the register kernel; every kernel compiles for sm_90 as the
    generated code holds it. GEMMA4_GEMV1_TMA=0 puts the register kernel back on all four, as many launches."""
    (doc,) = counts.docs("compile 31b")
    units = {u["unit"]: u for u in doc["units"]}
    off = counts.units("tma off 31b")
    for name in ("layer0", "layer1"):
        kernels = units[name]["kernels"]
        assert sum(k.startswith("_int4_gemv1_tma_kernel") for k in kernels) == 3, kernels
        assert sum(k.startswith("_int4_gemv1_kernel") for k in kernels) == 1, kernels
        assert sum(k.startswith("_int4_gemv1_kernel") for k in off[name]["kernels"]) == 4, off[name]["kernels"]
        assert off[name]["launches"] == units[name]["launches"], (off[name], units[name])
    assert all(u["compile_failures"] == [] for u in doc["units"]) and sum(u["compiled"] for u in doc["units"]) >= 10


_GENERATED = """
{var} = async_compile.triton('k', '''
import triton
import triton.language as tl
from torch._inductor.runtime import triton_helpers, triton_heuristics

@triton_heuristics.user_autotune(
    configs=[{{'num_warps': 4, 'num_stages': 1}}],
    triton_meta={{'signature': {{'x': '*fp32', 'B': 'constexpr'}}, 'constants': {{'B': 64}}, 'configs': []}},
    filename=__file__,
    custom_kernel=True,
)
@triton.jit
def k(x, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(x + i, {value})
''', device_str='cuda')
"""


def test_compile_check_reports_a_helper_the_code_lacks():
    """A kernel that reaches a helper Inductor did not copy (a module attribute: `helpers.f`) fails the check
    with the NameError an export on the GPU met; the same kernel without it compiles."""
    from scripts.count_decode_kernels import compile_user_kernels

    code = _GENERATED.format(var="k_0", value="i * 2.0") + _GENERATED.format(var="k_1", value="helpers.f(i)")
    done, failed = compile_user_kernels(code)
    assert done == 1 and len(failed) == 1 and failed[0].startswith("k_1: ") and "helpers" in failed[0], failed


def test_bad_preset():
    r = run_script("scripts.count_decode_kernels", "--preset", "nope", timeout=300)
    assert r.returncode == 2 and "--preset 'nope'" in r.stderr and "Traceback" not in r.stderr, r.stderr
