#!/usr/bin/env bash
# The device check (benchmarks/gpu_check.py says what it measures): <= 8 minutes on one
# H200, no network. Prints one line per figure and writes them all as JSON.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out gpu_check.json]
#
# --dry-run runs on CPU (what `make test` runs, tests/test_gpu_check.py): toy sizes, GPU-only parts
# skipped with the reason.
#
# Offline installs: megatron-core (and anything else missing) comes from wheels carried beside this
# script, in benchmarks/wheels/ (or WHEELS=dir). Prepare them on a machine with network, for the
# target's Python (3.12 on the device machine):
#   pip download megatron-core==0.16.1 --no-deps --python-version 3.12 --only-binary=:all: -d benchmarks/wheels
#   pip download <other missing packages> --no-deps --python-version 3.12 --only-binary=:all: -d benchmarks/wheels
# (megatron-core's pure-python dependencies that the image lacks go in the same folder; torch and
# transformers come with the image.)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$HERE/wheels}"

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if compgen -G "$WHEELS/megatron_core-*.whl" >/dev/null; then
        echo "installing megatron-core from $WHEELS"
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" megatron-core
    else
        echo "gpu_check: megatron-core is not installed and no megatron_core-*.whl is in $WHEELS (see the header)" >&2
        exit 2
    fi
fi

cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/examples${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "$PY" benchmarks/gpu_check.py "$@"
