"""The device check behind benchmarks/gpu_check.sh: one line per figure, all figures as JSON.

    benchmarks/gpu_check.sh [--dry-run] [--out DIR/gpu_check.json] [--sections env,cp_kernels,...]

The sections live in benchmarks/gpu_sections/ (one module each, registered with `@section`; its
__init__ says how to add one) and run in SECTION_MODULES order, with a cleanup between them:
  env        torch / CUDA / megatron-core versions; TE, flash-attn, FA3, cuDNN availability; the
             attention backends' self-checks (kernels.self_check) and what "auto" picks.
  cp_kernels every ring step of three CP ranks (out, lse, dQ, dK, dV) against a dense fp32
             reference, with pass/fail thresholds; one CP rank of the 1M recipe timed.
  train_step a Llama-3.2-1B-shaped model, one optimizer step per recompute setting, per layer spec
             (local; Transformer Engine's when it imports): time, TFLOP/s, peak vs memory model.
  train_step_plugin  a train step with a document mask, so the plugin's own attention runs: varlen
             (flash-attn/FA3) and the one-rank ring, with what "auto" chose INSIDE training.
  prefill    the evaluation prefill (next-token logits) at 32K tokens, and "auto" under no_grad.
--dry-run (CPU): the same code at toy sizes (errors are real, times are not figures) and every
GPU-only part skipped with its reason. Times here are never quoted as performance: the figures go to
docs/benchmarks.md from a run on the GPU, with the command and machine.
Exit status 1 when a section raised or a figure missed its threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: megatron_ultralong
sys.path.insert(0, HERE)  # gpu_sections

from gpu_sections import Context, load_sections  # noqa: E402


def default_out() -> str:
    """$OUT (the device machine's result folder) when set, else the temp dir: never the repository."""
    return os.path.join(os.environ.get("OUT") or tempfile.gettempdir(), "gpu_check.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: toy sizes, GPU-only parts skipped")
    parser.add_argument("--out", default=None, help="JSON file for all figures (default: $OUT or the temp dir)")
    parser.add_argument("--sections", default=None, help="comma-separated section names to run (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out or default_out())
    sections = load_sections()
    names = [s.name for s in sections]
    wanted = names if args.sections is None else [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"gpu_check: --sections: unknown {unknown}; known: {names}", file=sys.stderr)
        return 2
    dry = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry:
        print("no CUDA device: running the dry run", flush=True)
    from megatron_ultralong.model.layer_spec import transformer_engine_available

    ctx = Context(device=torch.device("cpu") if dry else torch.device("cuda", 0), dry=dry,
                  te_available=transformer_engine_available())
    ctx.results["mode"] = "dry-run" if dry else "gpu"
    for sec in sections:
        if sec.name not in wanted:
            continue
        try:
            sec.fn(ctx)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next section
            ctx.failed.append(sec.name)
            ctx.record(sec.name, "error", f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        ctx.cleanup()
    ctx.results["failed"] = ctx.failed
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ctx.results, f, indent=2, default=str)
    os.replace(tmp, out)
    print(f"wrote {out}", flush=True)
    if ctx.failed:
        print(f"gpu_check: FAILED: {', '.join(ctx.failed)}", flush=True)
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
