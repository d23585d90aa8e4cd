#!/usr/bin/env bash
# The GPU-machine measurements quoted in the issue notes, in the order they were run.
#   device run: bash scripts/measure_gpu.sh runtime|host_memory   (carry .whl)
# Logs and JSON go to $OUT (or ./out/gpu when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
runtime)  # issue 5: runner decode tok/s vs eager vs bandwidth floor; issue 3: CUDA exports
  timeout 300 python -m scripts.bench_runtime --preset 31b --layers 2 --ctx 8192 --quant int4 \
      --workdir /tmp/bench --json "$OUT/runtime_31b_2l.json" 2>&1 | tail -25
  timeout 200 python -m scripts.bench_runtime --preset tiny --ctx 2048 --quant none --dtype float32 \
      --workdir /tmp/bench --json "$OUT/runtime_tiny.json" 2>&1 | tail -15
  ;;
host_memory)  # issue 7: naive vs streaming load+quantize (CUDA int4) from bf16 31B slices
  python -m scripts.make_checkpoint --preset 31b --layers 2 --out /tmp/c2 &
  python -m scripts.make_checkpoint --preset 31b --layers 6 --out /tmp/c6 --seed 1 &
  wait
  timeout 420 python -m scripts.bench_host_memory --checkpoint /tmp/c2 --checkpoint /tmp/c6 \
      --device cuda --json "$OUT/host_memory.json" 2>&1 | tail -12
  ;;
*) echo "usage: $0 runtime|host_memory" >&2; exit 2 ;;
esac
