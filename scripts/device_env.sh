# Sourced at the start of every command on the GPU machine (see scripts/device_wheels.sh).
# Installs the carried wheels into /tmp/site once per machine: a second source (a mode started
# beside another) finds the marker and does not reinstall over a tree another process imports.
flock /tmp/site.lock bash -c '[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }' || return 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
chmod +x /tmp/site/executorch/data/bin/flatc
export FLATC_EXECUTABLE=/tmp/site/executorch/data/bin/flatc
export PYTHONUNBUFFERED=1
