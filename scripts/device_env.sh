# Sourced at the start of every command on the GPU machine (see scripts/device_wheels.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
chmod +x /tmp/site/executorch/data/bin/flatc
export FLATC_EXECUTABLE=/tmp/site/executorch/data/bin/flatc
export PYTHONUNBUFFERED=1
