"""Decode attention over the int4 cache compiled offline for sm_90 (no GPU): the split kernel is bound by
its instructions, so the loop's count per 64-position block is the figure its code changes are made for.
The measured config (D 512, the 31B / E2B / E4B full layers): one lop3 per register of codes for the mask
and the fp16 exponent (as and / or with two immediates ptxas kept two), and NIB16 (the default, nibbles 1 / 3
read in place) taking instructions off without registers or spills."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="offline compiles need Triton's compiler, not its interpreter")

SIG = {"Q": "*bf16", "K": "*u8", "V": "*u8", "KS": "*fp16", "VS": "*fp16", "POS": "*i64", "O": "*bf16",
       "MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "T": "i32", "S": "i32", "H": "i32", "WINDOW": "i32",
       "NUM_SPLITS": "i32", "sqt": "i32", "sqh": "i32", "skh": "i32", "sks": "i32", "svh": "i32", "svs": "i32",
       "ssh": "i32", "sot": "i32", "soh": "i32"}
ALIGNED = ("S", "H", "skh", "sks", "svh", "svs", "ssh", "sqh", "soh")


def split_kernel_sm90(const: dict, sig: dict, cfg) -> bytes:
    """The decode split kernel `_attn_body` with the constexprs `const` and the argument types `sig` (pointers and
    ALIGNED strides taken as multiples of 16) compiled for sm_90 under `cfg`'s warps and stages: its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from export.kernels import attention as A

    names = list(A._attn_body.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*") or a in ALIGNED}
    src = ASTSource(A._attn_body, {**{a: "constexpr" for a in const}, **sig}, const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return k.asm["cubin"]


def loop_of(extra: dict) -> tuple[dict, str]:
    """The int4 split kernel at D 512 (DECODE_KNOBS' knobs, then `extra`) compiled for sm_90: its main
    loop's opcode counts and cuobjdump's resource line."""
    from export.kernels import attention as A
    from scripts.gemv1_tile_variants import _sass_loop

    saved = dict(A.DECODE_KNOBS.get((512, 2), {}))
    A.DECODE_KNOBS[512, 2] = {**saved, **extra}
    try:
        cfg = A.with_knobs(A.decode_config(512, 2), 512, 2)
    finally:
        A.DECODE_KNOBS[512, 2] = saved
    const = dict(cfg.kwargs, G=8, D=512, KV_FMT=2, SPLIT=True, FP32=False, INTERPRET=False,
                 SHARE_UNIT=cfg.kwargs["BLOCK_N"], SHARES_SLOWEST=1, PDL=2)
    return _sass_loop(split_kernel_sm90(const, SIG, cfg))


@pytest.fixture(scope="module")
def loops() -> dict:
    return {name: loop_of(extra) for name, extra in
            {"default": {}, "nonib16": {"NIB16": 0}}.items()}


def test_int4_codes_take_one_lop3_a_register(loops):
    counts, res = loops["nonib16"]
    total = sum(counts.values())
    # 64 x 512 codes of K and of V, two a register over 128 threads: 128 registers each a block and
    # thread, one LOP3 each; the rest (masks, addresses) ~15
    assert counts["LOP3.LUT"] <= 256 + 32, counts
    assert total <= 1300, (total, counts)  # 1511 with the mask and the exponent as two LOP3
    assert "STACK:0" in res, res


def test_nib16_takes_instructions_off(loops):
    total = {name: sum(c.values()) for name, (c, _) in loops.items()}
    assert total["default"] <= total["nonib16"] - 96, total  # one shift for two planes, none for plane 1
    regs = {name: res.split()[0] for name, (_, res) in loops.items()}
    assert len(set(regs.values())) == 1 and all("STACK:0" in res for _, res in loops.values()), regs


ROWS_SIG = {**SIG, "K": "*bf16", "V": "*bf16", "KS": "*bf16", "VS": "*bf16", "AP": "*fp16", "QW": "*bf16",
            "INV": "*fp32", "eps": "fp32", "KR": "*bf16", "VR": "*bf16", "KW": "*bf16"}


def rows_order(D: int, early: int) -> list[str]:
    """The rows' split kernel (bf16 cache, the step's K / V rows, PDL) at head dim D compiled for sm_90: its global
    loads, stores and grid-dependency ops in order (gemv1_pdl_variants.sass_order's tags)."""
    from export.cubins import sass
    from export.kernels import attention as A
    from scripts.gemv1_pdl_variants import sass_order

    cfg = A.with_knobs(A.decode_config(D, 0), D, 0)
    const = dict(cfg.kwargs, G=8, D=D, KV_FMT=0, SPLIT=True, FP32=False, INTERPRET=False, PDL=2, PART16=1,
                 SHARE_UNIT=cfg.kwargs["BLOCK_N"], SHARES_SLOWEST=0, ROWS=1, FRESH=1, KEQV=0, EARLY=early)
    return sass_order(sass(split_kernel_sm90(const, ROWS_SIG, cfg)))


def test_rows_early_tiles_load_before_the_wait():
    """EARLY's point is the first K / V block read while the projection before runs: the compiled sm_90 kernel
    (the sliding layers' D 256) issues both tiles (2 x 32 x 256 bf16 over 128 threads: 16 loads of 16 bytes a
    thread) before griddepcontrol.wait, where without it only pos is read before the wait."""
    from export.kernels import attention as A

    assert A.decode_config(256, 0).kwargs["BLOCK_N"] == 32 and A.decode_config(256, 0).num_warps == 4
    before = {early: (order := rows_order(256, early))[:order.index("wait")] for early in (0, 1)}
    assert before[0] == ["ldg32"], before[0]  # pos
    assert before[1].count("ldg128") == 16 and before[1].count("ldg32") == 1, before[1]
