#!/usr/bin/env bash
# The GPU-machine measurements quoted in the issue notes, in the order they were run.
#   device run: bash scripts/measure_gpu.sh MODE   (carry .whl; one mode per device command,
#   each fits the 10-minute command limit)
# Logs and JSON go to $OUT (or ./out/gpu when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
host_memory_runs() {  # naive / streaming / parked load+quantize and the whole low-memory export
  # (CUDA int4) from bf16 31B slices of 2 and 6 layers, all at once
  python -m scripts.make_checkpoint --preset 31b --layers 2 --out /tmp/c2 > "$OUT/mk.log" 2>&1 &
  local m2=$!
  python -m scripts.make_checkpoint --preset 31b --layers 6 --out /tmp/c6 --seed 1 >> "$OUT/mk.log" 2>&1 &
  local m6=$!
  wait $m2 $m6
  timeout 480 python -m scripts.bench_host_memory --checkpoint /tmp/c2 --checkpoint /tmp/c6 \
      --device cuda --export --parallel 8 --json "$OUT/host_memory.json" 2>&1 | tail -16
}
small_slices() {  # the named variants' 2-layer slices (ctx 8192, 24 GB recipe, no autotune) side by side, to /tmp/p_V
  for v in "$@"; do
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$v TRITON_CACHE_DIR=/tmp/tri_$v TORCHINDUCTOR_COMPILE_THREADS=7 \
    timeout 300 python -m export.gemma4 --preset $v --layers 2 --ctx 8192 --kv-dtype int4 --embedding-quant int8 \
        --low-memory --device cuda --no-autotune --prefill-chunk 512 --out /tmp/p_$v > "$OUT/export_$v.log" 2>&1 &
    sleep 1
  done
  wait
}
case "${1:-}" in
runtime)  # runner decode tok/s vs eager vs bandwidth floor (tiny); CUDA export
  timeout 240 python -m scripts.bench_runtime --preset tiny --ctx 2048 --quant none --dtype float32 \
      --workdir /tmp/bench --json "$OUT/runtime_tiny.json" 2>&1 | tail -15
  ;;
slice_8k_cli)  # issues 3, 5 (as measured 2026-11-22): CLI export of the 2-layer slice, then the runner
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/nvml.csv" &
  timeout 430 python -m scripts.stack_sample "$OUT/stacks.txt" 5 -m export.gemma4 --preset 31b --layers 2 \
      --ctx 8192 --device cuda --no-autotune --low-memory --out /tmp/a31 > "$OUT/export.log" 2>&1
  tail -20 "$OUT/export.log"; sort -n "$OUT/nvml.csv" | tail -1
  timeout 130 python -m scripts.bench_runtime --preset 31b --layers 2 --ctx 8192 --quant int4 --model /tmp/a31 \
      --json "$OUT/rt.json" 2>&1 | tail -5
  ;;
tiny_diag)  # tiny CUDA export with stack samples (2 s)
  TORCHINDUCTOR_COMPILE_THREADS=8 timeout 560 python -m scripts.stack_sample "$OUT/stacks.txt" 2 \
      -m tests.test_export_cuda tiny "$OUT/tiny.json" > "$OUT/tiny.log" 2>&1
  tail -3 "$OUT/tiny.log"
  ;;
tiny_cuda)  # tiny CUDA export figures (allocator, NVML, RSS, sizes) and parity vs eager
  timeout 300 python -m tests.test_export_cuda tiny "$OUT/tiny.json" 2>&1 | tail -2
  ;;
export_128k)  # low-memory 2/4/6 layers and stock 6 layers at 131072, four exports at once
  BENCH_STACKS=20 timeout 590 python -m scripts.bench_export_memory \
      --runs stock:6:131072,low:6:131072,low:2:131072,low:4:131072 --parallel 4 --no-autotune \
      --time-budget 570 --out "$OUT/bem" --artifacts /tmp/bem --json "$OUT/export_memory_128k.json" 2>&1 | tail -16
  ;;
pair_128k)  # stock and low-memory 6 layers at 131072 side by side + logits, then low 2 and 4
  # layers as time allows; the tiny CUDA test beside
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_tiny TRITON_CACHE_DIR=/tmp/tri_tiny TORCHINDUCTOR_COMPILE_THREADS=4 \
    timeout 560 python -m tests.test_export_cuda tiny "$OUT/tiny.json" > "$OUT/tiny.log" 2>&1 &
  BENCH_STACKS=10 timeout 590 python -m scripts.bench_export_memory --runs stock:6:131072,low:6:131072,low:2:131072,low:4:131072 \
      --parallel 2 --no-autotune --time-budget 575 --out "$OUT/bem" --artifacts /tmp/bem \
      --json "$OUT/pair_128k.json" 2>&1 | tail -16
  wait; tail -c 1500 "$OUT/tiny.log"
  ;;
ctx_sweep)  # issues 4, 6: stock + low-memory 6-layer exports at 8k/32k/128k at once (logits compared
  # per ctx), then the runner alone on each low-memory artifact (the planner's runtime peak)
  BENCH_STACKS=20 timeout 430 python -m scripts.bench_export_memory --parallel 6 --no-autotune \
      --runs stock:6:131072,low:6:131072,stock:6:32768,low:6:32768,stock:6:8192,low:6:8192 \
      --time-budget 410 --out /tmp/bemout --artifacts /tmp/bem --json "$OUT/export_ctx.json" 2>&1 | tail -24
  for c in 8192 32768 131072; do
    timeout 50 python -m scripts.bench_runtime --preset 31b --layers 6 --ctx $c --quant int4 --no-eager \
        --model /tmp/bem/low_6l_$c --new-tokens 16 --json "$OUT/rt_$c.json" 2>&1 | tail -1
  done
  tar -czf "$OUT/logs.tgz" --exclude='*.stacks' -C /tmp bemout; tar -czf "$OUT/stacks.tgz" -C /tmp bemout
  ;;
host_plan)  # issues 7 and 6 at once: host_memory_runs, and beside it the planner's cuda test
  # (6-layer slice at 32k under an 8 GiB cap) with the export's allocator history for the PNG
  PLANNER_SNAPSHOT="$OUT/export_6l_32k.pickle.gz" timeout 560 python -m pytest -q -s -m cuda \
      tests/test_planner_cuda.py > "$OUT/planner_cuda.log" 2>&1 &
  p=$!
  host_memory_runs
  wait $p; tail -4 "$OUT/planner_cuda.log"
  ;;
cuda_tests)  # every `cuda`-marked test, one process per file at once (the CPU suite runs in CI)
  for f in $(grep -l "pytest.mark.cuda" tests/test_*.py); do
    n=$(basename "$f" .py)
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$n TRITON_CACHE_DIR=/tmp/tri_$n TORCHINDUCTOR_COMPILE_THREADS=5 \
      timeout 560 python -m pytest -q -s -m cuda "$f" > "$OUT/$n.log" 2>&1 &
  done
  wait; for f in "$OUT"/*.log; do echo "== $f"; grep -E "passed|failed|skipped|error" "$f" | tail -2; done
  ;;
defaults)  # the CLI's default path on CUDA (max_autotune): the tiny preset exported and run, and
  # beside it the 31B 2-layer slice at 8k with --low-memory (time-limited: how long autotune takes)
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_t TRITON_CACHE_DIR=/tmp/tri_t TORCHINDUCTOR_COMPILE_THREADS=8 \
    timeout 400 python -m export.gemma4 --device cuda --out /tmp/tiny_default > "$OUT/tiny_default.log" 2>&1 &
  t=$!
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_s TRITON_CACHE_DIR=/tmp/tri_s TORCHINDUCTOR_COMPILE_THREADS=8 \
    timeout 540 python -m export.gemma4 --preset 31b --layers 2 --ctx 8192 --device cuda --low-memory \
    --out /tmp/s2_default > "$OUT/slice_default.log" 2>&1 &
  s=$!
  wait $t; tail -c 600 "$OUT/tiny_default.log"
  timeout 60 python -m runtime --model /tmp/tiny_default --prompt "Hello" --max-new-tokens 8 2>&1 | tail -4
  wait $s; echo "slice rc=$?"; tail -c 800 "$OUT/slice_default.log"
  ;;
int4)  # int4 linears: the kernels' cuda tests (consumer configs forced), then bench_int4 (its JSON)
  timeout 150 python -m pytest -v -m cuda tests/test_int4_matmul.py 2>&1 | tail -30
  timeout 300 python -m scripts.bench_int4 --out "$OUT/int4_kernels.json" > "$OUT/bench_int4.txt" 2>&1
  echo "bench rc=$?"; grep -E "copy|GiB|^31b|FAIL|compiled" "$OUT/bench_int4.txt"
  ;;
int4_m1)  # the M == 1 rows of every model re-measured into a copy of the committed int4_kernels.json (the other
  # rows kept: --merge); on an H200 that copy replaces the record, elsewhere keep its rows apart (~1 min)
  cp scripts/measurements/int4_kernels.json "$OUT/int4_kernels.json"
  timeout 200 python -m scripts.bench_int4 --ms 1 --merge --out "$OUT/int4_kernels.json" > "$OUT/bench_int4_m1.txt" 2>&1
  echo "bench rc=$?"; grep -E "copy|^31b|^26b|^e4b|FAIL" "$OUT/bench_int4_m1.txt"
  ;;
int4_slice)  # int4 g128 31B 2-layer slice, low-memory export: allocator/NVML peaks, .so logits vs eager
  timeout 560 python -m tests.test_export_cuda 31b-2l-int4 "$OUT/int4_slice.json" 2>&1 | tail -3
  ;;
slice_kernels)  # the 31B 2-layer int4 g128 low-memory slice with the project's kernels, bf16 and int8 KV
  # side by side (allocator / NVML / RSS peaks, runner logits vs eager), then the attention bench
  for c in 31b-2l-int4-noat 31b-2l-int4-kv8; do
    TORCHINDUCTOR_CACHE_DIR=/tmp/i_$c TRITON_CACHE_DIR=/tmp/t_$c TORCHINDUCTOR_COMPILE_THREADS=7 \
      timeout 400 python -m tests.test_export_cuda $c "$OUT/$c.json" > "$OUT/$c.log" 2>&1 &
  done
  wait; for c in 31b-2l-int4-noat 31b-2l-int4-kv8; do echo "== $c"; tail -c 1200 "$OUT/$c.log"; done
  timeout 120 python -m scripts.kv_logits_error --preset 31b --layers 6 --fill 2048 --device cuda \
      --out "$OUT/kv_logits.json" 2>&1 | tail -6
  ;;
runtime_31b)  # the 31B 12-layer slice (10 sliding + 2 full) at 131072, KV int4 / bf16 / int8: three
  # low-memory exports side by side (--no-autotune), then decode per fill, prefill per prompt, memory vs plan,
  # transformers' eager bf16 beside; --time-budget skips (and lists) what would not fit the command
  timeout 555 python -m scripts.bench_runtime --preset 31b --layers 12 --ctx 131072 --kv-dtypes int4,bf16,int8 \
      --time-budget 530 --workdir /tmp/rt31 --json "$OUT/runtime_31b.json" > "$OUT/runtime_31b.txt" 2> "$OUT/runtime_31b.log"
  echo "bench rc=$?"; cat "$OUT/runtime_31b.txt"; tail -c 1500 "$OUT/runtime_31b.log"
  tar -czf "$OUT/runtime_31b_exports.tgz" -C /tmp/rt31 $(cd /tmp/rt31 && ls export_*.log export_*.json 2>/dev/null)
  ;;
variant_slices)  # every variant's 2-layer slice (E2B, E4B, 26B-A4B, 31B), side by side: the runner's logits
  # against the eager model with the same quantized weights and the fp32 model (variants.json `slice_*`; ~4 min)
  for v in e2b e4b 26b-a4b 31b; do
    timeout 500 python -m scripts.bench_variants --variant $v --stages slice --workdir /tmp/var \
        --json "$OUT/variants_slice.json" > "$OUT/slice_$v.log" 2>&1 &
    sleep 2
  done
  timeout 500 python -m scripts.kv_logits_error --preset 31b --layers 6 --fill 2048 --device cuda \
      --out "$OUT/kv_logits_31b_6l.json" > "$OUT/kv_logits.log" 2>&1 &
  wait
  for v in e2b e4b 26b-a4b 31b; do tail -1 "$OUT/slice_$v.log"; done; tail -2 "$OUT/kv_logits.log"
  ;;
variant_e2b)  # E2B whole model with the 24 GB recipe: export, then the runtime alone (variants.json; ~7 min)
  timeout 420 python -m scripts.bench_variants --variant e2b --stages export --workdir /tmp/var \
      --json "$OUT/variants_e2b.json" > "$OUT/e2b_export.log" 2>&1
  timeout 150 python -m scripts.bench_variants --variant e2b --stages runtime --workdir /tmp/var \
      --json "$OUT/variants_e2b.json" 2>&1 | tail -3
  ;;
moe)  # int4 experts: the MoE kernels' cuda tests (AOTI compile included), then bench_moe (its JSON)
  timeout 240 python -m pytest -v -m cuda tests/test_moe_int4.py 2>&1 | tail -20
  timeout 300 python -m scripts.bench_moe --out "$OUT/moe_kernels.json" > "$OUT/bench_moe.txt" 2>&1
  echo "bench rc=$?"; cat "$OUT/bench_moe.txt" | tail -25
  ;;
moe_slice)  # the 26B-A4B 2-layer int4 g128 low-memory slice (int4 experts): peaks, runner logits vs eager
  timeout 560 python -m tests.test_export_cuda 26b-2l-int4-noat "$OUT/moe_slice.json" 2>&1 | tail -3
  ;;
fused_norms)  # the norms in the int4 op's kernels against aten norms: the ops' cuda tests, then the 31B 12-layer
  # slice exported both ways side by side (scripts/export_ab.py; ~8 min)
  timeout 150 python -m pytest -q -m cuda tests/test_int4_matmul.py -k norm 2>&1 | tail -2
  timeout 420 python -m scripts.export_ab --switch GEMMA4_FUSED_NORMS --a 0 --b 1 --workdir /tmp/ab \
      --json "$OUT/fused_norms_31b.json" 2>&1 | tail -8
  ;;
slice_profiles)  # where a small variant's decode step goes: the 26B-A4B and E2B 2-layer slices exported side by side,
  # each kernel's own time (PDL off), then the 26B-A4B slice with PDL on, off and on all but the MoE kernels (~6 min)
  small_slices 26b-a4b e2b
  for v in 26b-a4b e2b; do
    echo "== $v"; tail -2 "$OUT/export_$v.log"
    GEMMA4_PDL_OFF=1 timeout 60 python -m scripts.profile_decode --model /tmp/p_$v --fill 1024 --steps 24 \
        --json "$OUT/profile_${v}_2l.json" 2>&1 | tail -24
  done
  timeout 120 python -m scripts.pdl_ab --model /tmp/p_26b-a4b --fills 1024 --steps 48 \
      --only _quant_x,_int4_gemv1,_attn_body,_combine,_hadamard,triton_ --json "$OUT/pdl_ab_26b_2l.json" 2>&1 | tail -10
  ;;
pdl_sets)  # which kernel families gain or lose from programmatic dependent launch on a small variant ($2: e2b or
  # e4b, one a call): its 2-layer slice (~200 s), then pdl_ab with each family left out in turn (~5 min; two variants
  # and their exports do not fit one 10-minute command)
  v=${2:-e4b}
  small_slices $v
  G=_quant_x,_int4_gemv1; A=_attn_body,_combine; H=_hadamard; I=triton_
  grep -A8 '"seconds"' "$OUT/export_$v.log" | grep total
  timeout 360 python -m scripts.pdl_ab --model /tmp/p_$v --fills 1024 --steps 48 --only $A,$H,$I --only $G,$H,$I \
      --only $G,$A,$I --only $G,$A,$H --json "$OUT/pdl_sets_${v}_2l.json" 2>&1 | tail -8
  ;;
prefetch_overlap)  # the o projection's weight asked into the L2 beside decode attention (second stream), against
  # attention then the GEMV (~2 min)
  timeout 300 python -m scripts.prefetch_overlap --ctas 8,32,132 --out "$OUT/prefetch_overlap.json" 2>&1 | tail -12
  ;;
selfq)  # the one-slice M == 1 GEMV quantizing its own x in its prologue against the op's two launches (~1 min)
  timeout 200 python -m scripts.gemv1_selfq_variants --out "$OUT/gemv1_selfq_variants.json" 2>&1 | tail -8
  ;;
ncu_gemv1)  # Nsight Compute's counters of the M == 1 int4 op's kernels on the 31B's mid shapes (~2 min)
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu_bin" ] || { echo "no ncu on this machine" >&2; exit 1; }
  timeout 300 "$ncu_bin" --profile-from-start off --set full --clock-control none --import-source no \
      -o "$OUT/gemv1" -f python -m scripts.ncu_gemv1 --shapes "${NCU_SHAPES:-o,qkv,down,gate_up}" 2>&1 | tail -12
  "$ncu_bin" -i "$OUT/gemv1.ncu-rep" --page details --csv > "$OUT/gemv1_details.csv"
  "$ncu_bin" -i "$OUT/gemv1.ncu-rep" --page source --csv --print-source sass > "$OUT/gemv1_sass.csv" 2>&1
  "$ncu_bin" -i "$OUT/gemv1.ncu-rep" --page details --print-details all > "$OUT/gemv1_details.txt" 2>&1
  python -m scripts.ncu_gemv1 --shapes "${NCU_SHAPES:-o,qkv,down,gate_up}" --summarize "$OUT/gemv1_details.csv" \
      "$OUT/gemv1_details.txt" "$OUT/gemv1_sass.csv" --out "$OUT/gemv1_ncu_31b.json"
  ;;
shares_active)  # decode attention's combine over the used shares only (all / act) and the split kernel's grid
  # order (hfast: KV heads slowest, sslow: shares slowest), the 31B's, E2B's and E4B's full and sliding layers
  # (~3 min); then the attention cuda tests (~1.5 min). The tiny artifact's logits against the eager model took a
  # call of their own (`tiny_parity`: its export ~3.5 min)
  timeout 270 python -m scripts.decode_combine_variants --models 31b,e2b,e4b \
      --variants all+pdl,act+pdl,hfast+pdl,sslow+pdl --fills 1024,8192,32768,131072 --rounds 3 \
      --out "$OUT/decode_share_order.json" > "$OUT/decode_share_order.log" 2>&1
  tail -43 "$OUT/decode_share_order.log"
  timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_attention.py > "$OUT/attention_cuda.log" 2>&1
  tail -2 "$OUT/attention_cuda.log"
  ;;
tiny_parity)  # the tiny preset's CUDA artifact (fp32) through the runner: against the eager model, graph against
  # container decode, no kernel over the context's default stack (~4.5 min: the export is most of it)
  timeout 300 python -m pytest -q -p no:cacheprovider -m cuda tests/test_runtime_cuda.py 2>&1 | tail -3
  ;;
e2b_memory)  # E2B's whole model (24 GB recipe): where its runtime process's device memory outside the caching
  # allocator goes, stage by stage and within the first prefill program by program (scripts/memory_outside.py),
  # with the context's stack limit and every compiled kernel's stack; then the runtime stage of variants.json
  # (its NVML peak against the plan; ~9 min: the export took 252-323 s)
  cp scripts/measurements/variants.json "$OUT/variants.json"
  timeout 400 python -m scripts.bench_variants --variant e2b --stages export --workdir /tmp/var \
      --json "$OUT/variants.json" > "$OUT/e2b_export.log" 2>&1
  echo "export rc=$?"
  timeout 80 python -m scripts.memory_outside --model /tmp/var/e2b --kernels \
      --json "$OUT/memory_outside_e2b.json" 2>&1 | grep -v "^open "
  timeout 90 python -m scripts.bench_variants --variant e2b --stages runtime --workdir /tmp/var \
      --json "$OUT/variants.json" 2>&1 | tail -3
  ;;
ple_fold)  # E2B / E4B's per-layer projection reading its row of the per-layer inputs in place (int4_glu_linear's
  # up_index) against a gather first: the GLU op's cuda tests, then scripts.ple_variants alone (~2 min)
  timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests/test_int4_matmul.py -k glu 2>&1 | tail -3
  timeout 150 python -m scripts.ple_variants --json "$OUT/ple_fold_variants.json" 2>&1 | grep -v -i warn | tail -8
  ;;
e2b_slice)  # E2B's 2-layer slice exported in-process and run through the runner against the eager model (the
  # slice stage of variants.json: slice_rel_err; ~4 min, the export ~160-215 s)
  cp scripts/measurements/variants.json "$OUT/variants.json"
  timeout 280 python -m scripts.bench_variants --variant e2b --stages slice --workdir /tmp/var \
      --json "$OUT/variants.json" 2>&1 | tail -4
  ;;
route_ab)  # the 26B-A4B's decode routing logits through `_route_gemv1_kernel` (GEMMA4_ROUTE_GEMV1=1) or the slices
  # kernel: bench_moe's `route` / `route_gemv1` rows at M = 1, then its 2-layer slice exported both ways side by side,
  # decode timed alternately (scripts/export_ab.py; ~7 min)
  timeout 150 python -m scripts.bench_moe --ms 1 --out "$OUT/moe_route_gemv1.json" 2>&1 | grep -E "route|FAIL" | tail -6
  timeout 400 python -m scripts.export_ab --switch GEMMA4_ROUTE_GEMV1 --a 0 --b 1 --preset 26b-a4b --layers 2 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab --json "$OUT/route_ab_26b_2l.json" 2>&1 | tail -12
  ;;
gemv_early)  # the small weights' GEMV loading its first tiles before its PDL wait (EARLY) or after it, E2B / E4B's
  # small projections chained in CUDA graphs (scripts/gemv1_early_variants.py, < 1 min), then the kernel tests
  timeout 150 python -m scripts.gemv1_early_variants --out "$OUT/gemv1_early_variants.json" 2>&1 | tail -4
  timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests/test_int4_matmul.py -k "small or residual" 2>&1 | tail -2
  ;;
gemv_stage)  # the small weights' GEMV with each step's x computed once a program (STAGE) or once a row of threads, E2B /
  # E4B's small projections chained in CUDA graphs (scripts/gemv1_early_variants.py --switch stage, < 1 min), then the
  # kernel tests with the switch on (GEMMA4_GEMV1_STAGE=1, as it ran before the switch became the default)
  timeout 150 python -m scripts.gemv1_early_variants --switch stage --out "$OUT/gemv1_stage_variants.json" 2>&1 | tail -4
  GEMMA4_GEMV1_STAGE=1 timeout 300 python -m pytest -q -p no:cacheprovider -m cuda tests/test_int4_matmul.py \
      tests/test_int4_ple.py -k "small or residual or norm or glu or ple" 2>&1 | tail -2
  # the small weights' tiles with it (4-32 rows a program) against the plan, each shape and a layer's (~3 min)
  timeout 240 python -m scripts.gemv1_small_variants --budget 150 --prewarm 14 \
      --out "$OUT/gemv1_small_stage.json" 2>&1 | tail -30
  ;;
small_stage)  # the small weights' tiles with x once a program (STAGE, now the default): 4-32 rows, K in 1, 2 or 4 steps
  # (E2B's 12 groups in 3 steps of 4, none masked) against the plan, each shape and a layer's as one graph (~4-5 min)
  timeout 360 python -m scripts.gemv1_small_variants --budget 170 --prewarm 14 \
      --out "$OUT/gemv1_small_stage.json" 2>&1 | tail -30
  ;;
small_mlp)  # the small models' MLP as the op runs it (quantize kernels + dp4a) against one bf16-x launch a projection
  # with x once a program, the fitted staged tiles each alone and both, the down projection on the TMA GEMV in K
  # slices (scripts/small_mlp_variants.py, E2B (both widths) / E4B / 26B-A4B, 16 layers a graph; ~30 s warm)
  timeout 400 python -m scripts.small_mlp_variants --layers 16 --out "$OUT/small_mlp_variants.json" 2>&1 | tail -32
  ;;
fusions_ab_e2b)  # the three launch fusions in a small model, where launches weigh most (E2B's step 433 -> 356 launches,
  # decode_kernel_counts_fused.json; on the 31B they lost: fusions_ab_31b_6l.json): the E2B 6-layer slice (ctx 8192)
  # exported both ways side by side, decode timed alternately, logits compared (~6 min)
  timeout 500 python -m scripts.export_ab --switch GEMMA4_FUSED_ATTENTION,GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE --a 0 \
      --b 1 --preset e2b --layers 6 --ctx 8192 --fills 1024 --rounds 3 --workdir /tmp/ab_fe2b \
      --json "$OUT/fusions_ab_e2b_6l.json" 2>&1 | tail -25
  ;;
stage_ab)  # the same switch in the artifact (GEMMA4_GEMV1_STAGE): the E2B 6-layer slice (ctx 8192) exported both ways side
  # by side, decode timed alternately (scripts/export_ab.py; ~6 min)
  timeout 500 python -m scripts.export_ab --switch GEMMA4_GEMV1_STAGE --a 0 --b 1 --preset e2b --layers 6 --ctx 8192 \
      --fills 1024 --rounds 3 --workdir /tmp/ab --json "$OUT/stage_ab_e2b.json" 2>&1 | tail -25
  ;;
step_fit_ab)  # the small weights' fitted staged tiles (GEMMA4_GEMV1_STEP_FIT: steps that leave no group masked, 4-16
  # rows, and one bf16-x launch up to K 6144 for the o and q / k / v projections) in the artifact: a 6-layer slice
  # (ctx 8192; $2: e2b (default), e4b or 26b-a4b) exported both ways side by side, decode timed alternately
  # (scripts/export_ab.py; ~6 min)
  v=${2:-e2b}
  timeout 500 python -m scripts.export_ab --switch GEMMA4_GEMV1_STEP_FIT --a 0 --b 1 --preset "$v" --layers 6 \
      --ctx 8192 --fills 1024 --rounds 3 --workdir /tmp/ab_fit --json "$OUT/step_fit_ab_$v.json" 2>&1 | tail -25
  ;;
ab_small)  # an export switch ($2, default GEMMA4_GEMV1_STEP_FIT) at 0 / 1 in small variants' slices ($3, default
  # "e4b 26b-a4b"; E2B / E4B at 6 layers, the 26B-A4B at 4, or $4 layers each; ctx 8192, export_ab.py's recipe;
  # E2B's double-wide MLP is in its KV-shared layers, from layer 15 of 35): every slice exported
  # at once, then each pair's decode timed alternately (scripts/export_ab.py --model-a / --model-b). Two presets
  # take ~9 min: ~5.5 for the exports, ~1.5 for each pair. GEMMA4_GEMV1_STEP_FIT (the fitted staged tiles, the o
  # and q / k / v projections up to K 6144): step_fit_ab_e4b_6l_h100.json, step_fit_ab_26b_4l_h100.json.
  # GEMMA4_GEMV1_STAGED_MLP "e2b 26b-a4b" (the dense MLP's gate / up and down staged with their prologues):
  # ab_staged_mlp_*_h100.json. GEMMA4_GEMV1_TMA_SMALL "e4b 26b-a4b" (the TMA GEMV on E4B's gate / up and the
  # 26B-A4B's full q / k): ab_tma_small_*_h100.json (the JSON this writes is ab_<switch>_<preset>.json).
  # GEMMA4_GEMV1_TMA_DEEP e2b 35 (the TMA GEMV in slices on E2B's down projections, the whole model; ~7 min):
  # ab_GEMV1_TMA_DEEP_e2b_h100.json. GEMMA4_ATTENTION_ROWS "e2b 31b" (decode attention from the raw q / k / v
  # rows, 0: in no layer, 1: in every float-cache layer; unset, the default picks layers by their q prologue):
  # ab_attention_rows_*_6l_h100.json, ab_attention_rows_kvfirst_*_6l_h100.json; "26b-a4b":
  # ab_attention_rows_26b_4l_h100.json.
  # The exports inherit the caller's environment: `GEMMA4_ATTENTION_ROWS=1 bash scripts/measure_gpu.sh ab_small
  # GEMMA4_ATTENTION_EARLY "e2b 31b"` times the rows' first K / V block loaded before the wait, the rows on both sides
  # (ab_attention_early_*_6l_h100.json)
  sw=${2:-GEMMA4_GEMV1_STEP_FIT}; presets=${3:-e4b 26b-a4b}
  threads=$((16 / (2 * $(echo $presets | wc -w))))  # the 16 cores shared by the exports running at once
  for v in $presets; do
    layers=${4:-$([ $v = 26b-a4b ] && echo 4 || echo 6)}
    for s in 0 1; do
      env "$sw=$s" TORCHINDUCTOR_CACHE_DIR=/tmp/ind_ab_${v}_$s TRITON_CACHE_DIR=/tmp/tri_ab_${v}_$s \
      TORCHINDUCTOR_COMPILE_THREADS=$threads timeout 400 python -m export.gemma4 --preset $v --layers $layers --ctx 8192 \
          --kv-dtype int4 --embedding-quant int8 --low-memory --device cuda --seed 0 --no-autotune \
          --prefill-chunk 2048 --out /tmp/ab_${v}_$s > "$OUT/export_ab_${v}_$s.log" 2>&1 &
      sleep 1
    done
  done
  wait
  for v in $presets; do
    timeout 240 python -m scripts.export_ab --model-a /tmp/ab_${v}_0 --model-b /tmp/ab_${v}_1 \
        --switch "$sw" --a 0 --b 1 --fills 1024 --rounds 3 --workdir /tmp/ab_run_$v \
        --json "$OUT/ab_${sw#GEMMA4_}_$v.json" 2>&1 | tail -6
  done
  ;;
early_ab)  # the small weights' GEMV loading its first tiles before its PDL wait or after it (GEMMA4_GEMV1_EARLY), the E4B
  # 6-layer slice (ctx 8192) exported both ways side by side, decode timed alternately (scripts/export_ab.py; ~6 min)
  timeout 500 python -m scripts.export_ab --switch GEMMA4_GEMV1_EARLY --a 0 --b 1 --preset e4b --layers 6 --ctx 8192 \
      --fills 1024 --rounds 3 --workdir /tmp/ab --json "$OUT/early_ab_e4b.json" 2>&1 | tail -25
  ;;
moe_prefill)  # the 26B-A4B's MoE prefill kernels (routing logits, counting sort, grouped int4 GEMMs) with fixed configs
  # at M = 2048 / 512 (scripts/moe_prefill_variants.py, ~1 min), then the counting sort's BLOCK / warps alone
  timeout 400 python -m scripts.moe_prefill_variants --ms 2048,512 --out "$OUT/moe_prefill_variants.json" 2>&1 | tail -60
  timeout 120 python -m scripts.moe_prefill_variants --ms 2048,512 --align-only --out "$OUT/moe_align_variants.json" 2>&1 | tail -20
  ;;
moe_26b)  # the 26B-A4B whole model (24 GB recipe): export, then its runtime stage alone, into variants_26b.json (~5 min)
  cp scripts/measurements/variants.json "$OUT/variants_26b.json"
  TORCHINDUCTOR_COMPILE_THREADS=16 timeout 320 python -m scripts.bench_variants \
      --variant 26b-a4b --stages export --workdir /tmp/var_26b --json "$OUT/variants_26b.json" > "$OUT/26b_export.log" 2>&1
  echo "export rc=$?"; tail -3 "$OUT/26b_export.log"
  timeout 90 python -m scripts.bench_variants --variant 26b-a4b --stages runtime --workdir /tmp/var_26b \
      --json "$OUT/variants_26b.json" > "$OUT/26b_runtime.log" 2>&1
  echo "runtime rc=$?"; tail -3 "$OUT/26b_runtime.log"
  ;;
selfq_small)  # E2B's small projections: the op's bf16-x GEMV against the dp4a GEMV at small tiles, with x quantized by
  # its own prologue (one launch) or the quantize kernel (two) (scripts/gemv1_selfq_variants.py --tiles, ~1.5 min)
  timeout 200 python -m scripts.gemv1_selfq_variants \
      --shapes e2b.qkv:2560:1536,e2b.o:1536:2048,e2b.ple_gate:256:1536,e2b.ple_proj:1536:256,e4b.qkv:3072:2560,e4b.o:2560:2048 \
      --tiles 8:2:2,16:2:4,8:4:4,32:2:8,16:4:8 --qb 4,16 --rounds 2 --out "$OUT/gemv1_selfq_small.json" 2>&1 | tail -12
  ;;
moe_decode)  # the 26B-A4B's MoE decode word GEMVs: every config, gate / up from x's int8 levels too (moe_int4.GATE_UP_Q),
  # the down kernel with act loaded as one row or as the weight tile's rows (moe_int4.DOWN_XTILE), checked vs fp32
  # and timed in CUDA graphs (~1 min); then the MoE cuda tests (both gate / up paths)
  timeout 200 python -m scripts.sweep_moe_decode --out "$OUT/moe_decode_sweep.json" --budget-s 90 2>&1 | tail -60
  timeout 240 python -m pytest -q -m cuda tests/test_moe_int4.py 2>&1 | tail -3
  ;;
gate_up_q_ab)  # the 26B-A4B's MoE decode gate / up from x's int8 levels (GEMMA4_MOE_GATE_UP_Q=1: its quantize kernel in
  # the experts' input norm's place) or from bf16 x: its 2-layer slice exported both ways side by side, decode timed
  # alternately (scripts/export_ab.py, ~7 min)
  timeout 500 python -m scripts.export_ab --switch GEMMA4_MOE_GATE_UP_Q --a 0 --b 1 --preset 26b-a4b --layers 2 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab --json "$OUT/gate_up_q_ab_26b_2l.json" 2>&1 | tail -12
  ;;
fused_attention_ab)  # the 31B's attention combine writing its o_proj's x levels (GEMMA4_FUSED_ATTENTION=1: no
  # quantize kernel between them) or attention then o_proj: the op's CUDA test (bit for bit against the two ops),
  # then a 6-layer slice (5 sliding + 1 full) at 131072 exported both ways side by side, decode at fill 1k and
  # 128k timed alternately (the full layer's combine holds a whole head when it rotates: few programs at a long
  # fill), logits compared (scripts/export_ab.py, ~8 min)
  timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_attention_linear.py 2>&1 | tail -2
  timeout 470 python -m scripts.export_ab --switch GEMMA4_FUSED_ATTENTION --a 0 --b 1 --preset 31b --layers 6 \
      --ctx 131072 --fills 1024,131000 --workdir /tmp/ab --json "$OUT/fused_attention_ab_31b_6l.json" 2>&1 | tail -14
  ;;
fused_mlp_ab)  # the gate / up GEMV writing the down GEMV's x levels (GEMMA4_FUSED_MLP=1: no activation quantize
  # kernel) or the two ops: the op's CUDA test (bit for bit), then the 31B's 6-layer slice and E2B's 2-layer slice
  # exported both ways, decode timed alternately, logits compared (scripts/export_ab.py, ~8 min)
  timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_int4_mlp.py 2>&1 | tail -2
  timeout 300 python -m scripts.export_ab --switch GEMMA4_FUSED_MLP --a 0 --b 1 --preset 31b --layers 6 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab_mlp31 --json "$OUT/fused_mlp_ab_31b_6l.json" 2>&1 | tail -8
  timeout 160 python -m scripts.export_ab --switch GEMMA4_FUSED_MLP --a 0 --b 1 --preset e2b --layers 2 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab_mlpe2b --json "$OUT/fused_mlp_ab_e2b_2l.json" 2>&1 | tail -8
  ;;
fused_close_ab)  # a layer's last GEMV writing its closing add (GEMMA4_FUSED_CLOSE=1: the 31B's down GEMV with the MLP
  # as one op, E2B / E4B's per-layer projection) or the add's own kernel: the ops' CUDA tests (against the unfused ops
  # and the add, within an ulp of the norm's factor), then the 31B's 6-layer slice and E2B's 2-layer slice exported
  # both ways, decode timed alternately, logits compared (not bitwise: the closing norm sums in another order; ~8 min)
  timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_int4_mlp.py tests/test_int4_ple.py \
      tests/test_moe_int4.py -k "close or matches_the_two" 2>&1 | tail -2
  timeout 300 python -m scripts.export_ab --switch GEMMA4_FUSED_CLOSE --a 0 --b 1 --preset 31b --layers 6 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab_close31 --json "$OUT/fused_close_ab_31b_6l.json" 2>&1 | tail -8
  timeout 160 python -m scripts.export_ab --switch GEMMA4_FUSED_CLOSE --a 0 --b 1 --preset e2b --layers 2 \
      --ctx 8192 --fills 1024 --workdir /tmp/ab_closee2b --json "$OUT/fused_close_ab_e2b_2l.json" 2>&1 | tail -8
  ;;
fusions_ab_26b)  # the 26B-A4B's 2-layer slice with the three launch fusions (its dense MLP's, the attention's, the
  # experts' down kernel writing the closing add) 0 / 1, decode timed alternately, logits compared (~6 min)
  timeout 500 python -m scripts.export_ab --switch GEMMA4_FUSED_ATTENTION,GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE --a 0 \
      --b 1 --preset 26b-a4b --layers 2 --ctx 8192 --fills 1024 --workdir /tmp/ab_f26 \
      --json "$OUT/fusions_ab_26b_2l.json" 2>&1 | tail -8
  ;;
tma_ab)  # the TMA-fed M == 1 GEMV (GEMMA4_GEMV1_TMA 0 / 1): its CUDA tests (eager, CUDA graph, AOTInductor .so)
  # beside the 31B's 6-layer slice exported both ways side by side, then decode timed alternately at fill 1k,
  # logits compared (scripts/export_ab.py; ~7 min)
  timeout 300 python -m pytest -q -p no:cacheprovider -m cuda \
      tests/test_int4_matmul.py::test_cuda_mid_size_weights_take_the_tma_gemv \
      tests/test_int4_matmul.py::test_cuda_aoti_builds_the_tma_gemv_into_the_so > "$OUT/tma_tests.log" 2>&1 &
  timeout 420 python -m scripts.export_ab --switch GEMMA4_GEMV1_TMA --a 0 --b 1 --preset 31b --layers 6 \
      --ctx 131072 --fills 1024 --profile-fill 0 --workdir /tmp/ab_tma --json "$OUT/tma_ab_31b_6l.json" 2>&1 | tail -10
  wait; grep -E "^E |passed|failed" "$OUT/tma_tests.log" | tail -8
  ;;
fusions_ab)  # the three launch fusions at once (GEMMA4_FUSED_ATTENTION, GEMMA4_FUSED_MLP and GEMMA4_FUSED_CLOSE 0 / 1):
  # the three ops' CUDA tests, then the 31B's 6-layer slice and E2B's 2-layer slice exported both ways, decode timed
  # alternately, logits compared (within the closing norm's rounding; scripts/export_ab.py, ~9 min); a win here is
  # then split by the modes above
  timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_attention_linear.py tests/test_int4_mlp.py \
      tests/test_int4_ple.py 2>&1 | tail -2
  timeout 330 python -m scripts.export_ab --switch GEMMA4_FUSED_ATTENTION,GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE --a 0 \
      --b 1 --preset 31b --layers 6 --ctx 131072 --fills 1024,131000 --workdir /tmp/ab_f31 \
      --json "$OUT/fusions_ab_31b_6l.json" 2>&1 | tail -8
  timeout 150 python -m scripts.export_ab --switch GEMMA4_FUSED_ATTENTION,GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE --a 0 \
      --b 1 --preset e2b --layers 2 --ctx 8192 --fills 1024 --workdir /tmp/ab_fe2b \
      --json "$OUT/fusions_ab_e2b_2l.json" 2>&1 | tail -8
  ;;
fusions_split)  # the three launch fusions one at a time on a 6-layer slice ($2: 31b (default, ctx 131072) or a small
  # model at ctx 8192, where launches weigh most; all three at once lost on E2B, fusions_ab_e2b_6l_h100.json): four
  # exports at once (none; GEMMA4_FUSED_ATTENTION; GEMMA4_FUSED_MLP; GEMMA4_FUSED_MLP + GEMMA4_FUSED_CLOSE: the close
  # op holds the MLP's fusion), then each fused artifact against the plain one (scripts/export_ab.py --model-a /
  # --model-b: decode at fill 1k timed alternately, the fusions' cost being per layer; attention's and the MLP's
  # logits bitwise the plain ones; ~8 min). JSON: fusions_split_<name>.json (31b), fusions_split_<preset>_<name>.json
  preset=${2:-31b}
  ctx=$([ "$preset" = 31b ] && echo 131072 || echo 8192)
  tag=$([ "$preset" = 31b ] && echo "" || echo "${preset}_")
  mkdir -p /tmp/fs
  for v in none:x attn:GEMMA4_FUSED_ATTENTION mlp:GEMMA4_FUSED_MLP close:GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE; do
    name=${v%%:*}; vars=${v#*:}
    env_set=""; for var in ${vars//,/ }; do [ "$var" != x ] && env_set="$env_set $var=1"; done
    env $env_set TORCHINDUCTOR_CACHE_DIR=/tmp/fs/ind_$name TRITON_CACHE_DIR=/tmp/fs/tri_$name \
        TORCHINDUCTOR_COMPILE_THREADS=4 timeout 330 python -m export.gemma4 --preset "$preset" --layers 6 --ctx $ctx \
        --kv-dtype int4 --embedding-quant int8 --low-memory --device cuda --seed 0 --no-autotune --prefill-chunk 2048 \
        --out /tmp/fs/$name > /tmp/fs/export_$name.log 2>&1 &
    sleep 1
  done
  wait
  for v in attn:GEMMA4_FUSED_ATTENTION mlp:GEMMA4_FUSED_MLP close:GEMMA4_FUSED_MLP,GEMMA4_FUSED_CLOSE; do
    name=${v%%:*}
    echo "== $name"
    timeout 80 python -m scripts.export_ab --model-a /tmp/fs/none --model-b /tmp/fs/$name --switch ${v#*:} --fills 1024 \
        --profile-fill 0 --rounds 2 --workdir /tmp/fs/ab_$name --json "$OUT/fusions_split_$tag$name.json" 2>&1 | tail -3
  done
  ;;
fused_whole)  # E2B and E4B whole models (e_models' stages) with the three launch fusions switched on
  # (GEMMA4_FUSED_ATTENTION / _MLP / _CLOSE=1; each record's `switches` says so), into variants_e2b.json /
  # variants_e4b.json as e_models does (~8 min); the 31B slice with them: GEMMA4_FUSED_ATTENTION=1 GEMMA4_FUSED_MLP=1
  # GEMMA4_FUSED_CLOSE=1 bash scripts/measure_gpu.sh runtime_31b
  GEMMA4_FUSED_ATTENTION=1 GEMMA4_FUSED_MLP=1 GEMMA4_FUSED_CLOSE=1 bash scripts/measure_gpu.sh e_models
  ;;
gemv1_tma)  # the op's TMA-fed M == 1 GEMV in its tiles against the plan (the register kernel) on the 31B sliding
  # layer's four projections, then the layer as one graph (plan, best, the op's choice) without PDL and with it
  # (scripts/gemv1_tma_variants.py, ~4 min)
  timeout 290 python -m scripts.gemv1_tma_variants --budget 170 --prewarm 14 --out "$OUT/gemv1_tma_variants.json" \
      2>&1 | tail -12
  ;;
tma_small)  # the TMA-fed GEMV's tiles on the small models' weights that keep the pool's plan (E4B's down 2560 x 10240 at
  # 38% of copy, gate / up, E2B's downs, the 26B-A4B's o / q / k full and gate / up) against that plan, each checked
  # against fp32 (scripts/gemv1_tma_variants.py --small; ~4 min)
  timeout 330 python -m scripts.gemv1_tma_variants --small --budget 220 --prewarm 14 \
      --out "$OUT/gemv1_tma_small.json" 2>&1 | tail -14
  ;;
tma_stages)  # the TMA GEMV's tile in the 31B sliding layer's four as one graph with PDL (the sweep timed tiles without
  # it): the op's (32 rows x 4 groups, 3 stages) against more stages (copies in flight in the loop) and 8-group steps
  # (16 KB of a program before the wait, not 8) (`gemv1_tma_variants --layer-only`; no prewarm: the few kernels
  # compile inline; ~1-2 min)
  timeout 280 python -m scripts.gemv1_tma_variants --layer-only --layer-tiles 32x4x4,32x4x6,32x8x3,32x8x4 \
      --budget 150 --prewarm 0 --out "$OUT/gemv1_tma_stages.json" 2>&1 | tail -16
  ;;
chain)  # a sliding layer's o -> norm -> gate / up -> GLU -> down as one persistent kernel against one launch a phase
  # and the op's launches, with the product and load-only (scripts/chain_variants.py, < 1 min)
  timeout 500 python -m scripts.chain_variants --budget 330 --prewarm 14 --out "$OUT/chain_variants.json" 2>&1 | tail -70
  ;;
argmax)  # greedy decoding's last kernel: torch's argmax against the two-reduction rows variant
  # (scripts/argmax_variants.py, seconds)
  timeout 120 python -m scripts.argmax_variants --out "$OUT/argmax_variants.json" 2>&1 | tail -12
  ;;
launch_floor)  # what one dependent kernel costs in a replayed CUDA graph, PDL off / on, with a small GEMV's
  # share of weights or none (scripts/launch_floor.py, < 1 min)
  timeout 200 python -m scripts.launch_floor --out "$OUT/launch_floor.json" 2>&1 | tail -40
  ;;
e_models)  # E2B and E4B whole models (24 GB recipe): both exports at once (their own caches), then each runtime
  # stage alone; each into its own copy of variants.json (variants_e2b.json, variants_e4b.json; ~8 min)
  for v in e2b e4b; do
    cp scripts/measurements/variants.json "$OUT/variants_$v.json"
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$v TRITON_CACHE_DIR=/tmp/tri_$v TORCHINDUCTOR_COMPILE_THREADS=8 \
    timeout 420 python -m scripts.bench_variants \
        --variant $v --stages export --workdir /tmp/var_$v --json "$OUT/variants_$v.json" > "$OUT/${v}_export.log" 2>&1 &
    sleep 1
  done
  wait
  for v in e2b e4b; do
    timeout 100 python -m scripts.bench_variants --variant $v --stages runtime --workdir /tmp/var_$v \
        --json "$OUT/variants_$v.json" > "$OUT/${v}_runtime.log" 2>&1
    echo "$v runtime rc=$?"; tail -3 "$OUT/${v}_runtime.log"
  done
  ;;
moe_whole)  # the 26B-A4B whole model (24 GB recipe): export, then its runtime alone; beside them its 2-layer slice's
  # parity (own caches; ~7 min). Into variants_26b.json and variants_26b_slice.json: merge the records by hand
  cp scripts/measurements/variants.json "$OUT/variants_26b.json"
  cp scripts/measurements/variants.json "$OUT/variants_26b_slice.json"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_slice TRITON_CACHE_DIR=/tmp/tri_slice TORCHINDUCTOR_COMPILE_THREADS=4 \
  timeout 420 python -m scripts.bench_variants --variant 26b-a4b --stages slice --workdir /tmp/var_slice \
      --json "$OUT/variants_26b_slice.json" > "$OUT/26b_slice.log" 2>&1 &
  TORCHINDUCTOR_COMPILE_THREADS=12 timeout 380 python -m scripts.bench_variants --variant 26b-a4b --stages export \
      --workdir /tmp/var_26b --json "$OUT/variants_26b.json" > "$OUT/26b_export.log" 2>&1
  echo "export rc=$?"; tail -2 "$OUT/26b_export.log"
  timeout 100 python -m scripts.bench_variants --variant 26b-a4b --stages runtime --workdir /tmp/var_26b \
      --json "$OUT/variants_26b.json" > "$OUT/26b_runtime.log" 2>&1
  echo "runtime rc=$?"; tail -3 "$OUT/26b_runtime.log"
  wait
  tail -3 "$OUT/26b_slice.log"
  ;;
attn_skip)  # decode attention: the combine reading only its first chunk where the used shares fit it (today's
  # default, `pdl`) against reading every chunk (`noskip`) and 16 shares a KV head, the 31B's, E2B's and E4B's
  # layers (~3 min); then the attention and tiny-artifact cuda tests
  timeout 240 python -m scripts.decode_combine_variants --models 31b,e2b,e4b --variants pdl,noskip+pdl,s16+pdl \
      --fills 1024,8192,32768,131072 --kv-dtypes int4,int8,bf16 --rounds 3 --out "$OUT/decode_combine_skip.json" \
      > "$OUT/decode_combine_skip.log" 2>&1
  echo "variants rc=$?"; tail -40 "$OUT/decode_combine_skip.log"
  timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_attention.py 2>&1 | tail -2
  timeout 230 python -m pytest -q -p no:cacheprovider -m cuda tests/test_runtime_cuda.py -k logits_match_eager 2>&1 | tail -2
  ;;
small_shares)  # the small variants' decode attention with forced share counts (one share: no combine launch)
  # against the default, every variant's full and sliding layer (~3 min); then the tiny preset's cuda tests, whose
  # sliding rings take the one-share path
  timeout 330 python -m scripts.decode_combine_variants --models e2b,e4b,26b-a4b,31b --variants pdl,s1+pdl,s4+pdl,s16+pdl \
      --fills 1024,32768 --rounds 3 --out "$OUT/decode_small_shares.json" > "$OUT/decode_small_shares.log" 2>&1
  tail -22 "$OUT/decode_small_shares.log"
  timeout 240 python -m pytest -q -m cuda tests/test_runtime_cuda.py 2>&1 | tail -2
  ;;
host_memory)  # host memory of loads and whole exports (run last as `host_reads`, after the loader stopped memory-mapping shards)
  host_memory_runs
  ;;
*) echo "usage: $0 runtime|slice_8k_cli|tiny_diag|pair_128k|ctx_sweep|host_plan|cuda_tests|defaults|tiny_cuda|export_128k|host_memory|int4|int4_slice|slice_kernels|runtime_31b|variant_slices|variant_e2b|moe|moe_slice|fused_norms|slice_profiles|pdl_sets|prefetch_overlap|selfq|small_shares|ncu_gemv1|shares_active|tiny_parity|attn_skip|e2b_memory|ple_fold|e2b_slice|route_ab|e_models|moe_whole|gemv_early|gemv_stage|small_mlp|stage_ab|early_ab|moe_prefill|moe_26b|launch_floor|selfq_small|moe_decode|gate_up_q_ab" >&2; exit 2 ;;
esac
