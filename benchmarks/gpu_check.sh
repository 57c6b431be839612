#!/usr/bin/env bash
# The device check (benchmarks/gpu_check.py says what it measures; its sections are in
# benchmarks/gpu_sections/): <= 8 minutes on one H200, no network. Prints one line per figure and
# writes them all as JSON; exit status 1 when a figure misses its threshold or a section fails.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR/gpu_check.json] [--sections env,cp_kernels,...]
#
# --out defaults to $OUT/gpu_check.json, else the temp dir (never the repository).
# --dry-run runs on CPU (what `make test` runs, tests/test_gpu_check.py): toy sizes, GPU-only parts
# skipped with the reason.
#
# Offline installs: the packages in benchmarks/gpu_requirements.txt that do not import are installed
# from wheels carried beside this script, in benchmarks/wheels/ (or WHEELS=dir); that file says how to
# download them. torch (and TE / flash-attn when present) come with the image.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$HERE/wheels}"

if ! "$PY" -c "import megatron.core, numpy, packaging, yaml" 2>/dev/null; then
    if compgen -G "$WHEELS/megatron_core-*.whl" >/dev/null; then
        echo "installing benchmarks/gpu_requirements.txt from $WHEELS"
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$HERE/gpu_requirements.txt"
    else
        echo "gpu_check: megatron-core (or numpy, packaging, PyYAML) is not installed and no" \
             "megatron_core-*.whl is in $WHEELS (see benchmarks/gpu_requirements.txt)" >&2
        exit 2
    fi
fi

# No cd: a relative --out is relative to where the script was called from.
export PYTHONPATH="$ROOT:$ROOT/examples${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The ring allocates blocks of varying sizes; expandable segments keep them from fragmenting.
if [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" ] && [ -z "${PYTORCH_ALLOC_CONF:-}" ]; then
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
exec "$PY" "$HERE/gpu_check.py" "$@"
