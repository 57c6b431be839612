#!/usr/bin/env bash
# The CPT recipe in miniature on CPU: a synthetic indexed dataset, then 2 gloo processes with CP=2
# (examples/recipes/tiny_cpu.yaml). Re-running resumes from tiny_cpu_out/ckpt; delete it to restart.
#   examples/recipes/run_tiny_cpu.sh [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=tiny_cpu_out
PREFIX=$OUT/data/tiny_text_document

if [ ! -f "$PREFIX.idx" ]; then
  mkdir -p "$OUT/data"
  # 400 documents of Zipf-distributed ids in [2, 1000) ending in eod=1 (tiny vocab 1000): enough
  # structure for the loss to fall, no tokenizer needed.
  "$PY" - "$PREFIX" <<'PYEOF'
import sys
import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

prefix = sys.argv[1]
rng = np.random.default_rng(0)
builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
for _ in range(400):
    n = int(rng.integers(50, 800))
    doc = np.minimum(rng.zipf(1.3, size=n) + 1, 999).astype(np.int64)
    builder.add_document(torch.from_numpy(np.append(doc, 1)), [n + 1])
builder.finalize(prefix + ".idx")
print(f"wrote {prefix}.bin/.idx")
PYEOF
fi

exec "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 tools/train.py \
    --config examples/recipes/tiny_cpu.yaml train.load=$OUT/ckpt "$@"
