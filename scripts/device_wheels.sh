#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it has torch/transformers but no executorch,
# torchao, and no network) into .whl/, for the device tool's `carry`.
# On the device, start each command with:  source scripts/device_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info; grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl executorch==1.2.0 torchao==0.17.0 flatbuffers ruamel.yaml ruamel.yaml.clib
ls -la .whl
