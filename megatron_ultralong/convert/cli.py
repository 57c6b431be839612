"""`mu-convert` / tools/convert_checkpoint.py: HF Llama <-> Megatron-Core checkpoints.

    mu-convert hf-to-mcore HF_DIR MCORE_DIR [--tp 2 --pp 2] [--dtype bf16]
               [--yarn-target 1048576 --yarn-beta-fast 4] [--verify]
    mu-convert mcore-to-hf MCORE_DIR HF_DIR [--tp 1] [--dtype bf16] [--max-shard-size 2GB] [--verify]
               [--no-verify-manifest]

MCORE_DIR may be a converted model directory, a training checkpoint `iter_XXXXXXX/` (its model/)
or a training save directory (the checkpoint `latest` names): checkpoint/paths.py resolves it, and
its manifest (CRC-32 per file) is checked before anything is written (--no-verify-manifest waives it).
--verify compares logits with transformers and exits 1 when max |logit diff| exceeds --verify-tol.

Processes: under torchrun (WORLD_SIZE set) every rank runs the conversion itself; otherwise the tool
runs `--nproc` (default TP x PP = 1) local gloo processes. The Megatron checkpoint is TP/PP-agnostic,
so --tp/--pp only split the work across processes; memory is bounded by the largest tensor either
way (both directions stream). Inputs are checked in the parent (config, tensor names and shapes,
TP/PP divisibility) before any process starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_ultralong.checkpoint.paths import require_megatron_checkpoint
from megatron_ultralong.logs import setup_logging

if TYPE_CHECKING:  # the heavy modules load after the arguments are parsed (fast --help and errors)
    from megatron_ultralong.model.config import ContextExtension, LlamaConfig

log = logging.getLogger(__name__)

VERIFY_FAILED = 1
"""Exit status when --verify finds the logits further apart than --verify-tol (usage errors: 2)."""
RENAMED_FLAGS = {"--rope-yarn-target": "--yarn-target", "--yarn-original-max-position": "--yarn-original"}
"""Flags of earlier releases -> their names now (model/config.py ContextExtension's fields)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mu-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    for name, src, dst in (("hf-to-mcore", "hf_dir", "mcore_dir"), ("mcore-to-hf", "mcore_dir", "hf_dir")):
        s = sub.add_parser(name)
        s.add_argument("src", metavar=src.upper(), help="input directory")
        s.add_argument("dst", metavar=dst.upper(), help="output directory (written atomically)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the conversion")
        s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the conversion")
        s.add_argument("--nproc", type=int, default=None, help="local processes to run (default TP*PP)")
        s.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default: keep the input's)")
        s.add_argument("--yarn-target", type=int, default=None,
                       help="replace the RoPE with YaRN for this context length (e.g. 1048576)")
        s.add_argument("--yarn-original", type=int, default=8192,
                       help="YaRN original length; factor = target / this (UltraLong: 8192)")
        for old in RENAMED_FLAGS:  # refused below, naming the new flag
            s.add_argument(old, default=None, help=argparse.SUPPRESS)
        s.add_argument("--yarn-beta-fast", type=float, default=32.0, help="YaRN beta_fast (paper: 4)")
        s.add_argument("--yarn-beta-slow", type=float, default=1.0, help="YaRN beta_slow (paper: 1)")
        s.add_argument("--verify", action="store_true",
                       help="compare logits with transformers on a short prompt; exit 1 beyond --verify-tol")
        s.add_argument("--verify-tol", type=float, default=None,
                       help="largest acceptable max |logit diff| (default by dtype: fp32 1e-3, fp16 5e-2, bf16 0.5)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "mcore-to-hf":
            s.add_argument("--max-shard-size", default="1GB", help="safetensors shard size (e.g. 2GB)")
            s.add_argument("--no-verify-manifest", action="store_true",
                           help="export even if the checkpoint's files differ from its manifest.json "
                                "(CRC-32 per file, checked by default before anything is written)")
    return p


def source_config(args: argparse.Namespace) -> "LlamaConfig":
    """The input's model config, validated (HF: also every tensor's name and shape)."""
    from megatron_ultralong.checkpoint.info import read_checkpoint_info
    from megatron_ultralong.convert.hf_io import HFCheckpointReader
    from megatron_ultralong.convert.hf_to_mcore import check_hf_weights, model_config_from_hf

    if args.direction == "hf-to-mcore":
        reader = HFCheckpointReader(args.src)
        cfg = model_config_from_hf(reader.config, str(reader.path / "config.json"))
        check_hf_weights(reader, cfg)
        return cfg
    return read_checkpoint_info(args.src).model_config


def _dtype_flag(args: argparse.Namespace):
    """--dtype as a torch dtype; None keeps the input's."""
    from megatron_ultralong.dtypes import parse_dtype

    return None if args.dtype is None else parse_dtype(args.dtype, "--dtype")


def context_extension(args: argparse.Namespace, cfg: "LlamaConfig") -> Optional["ContextExtension"]:
    """The YaRN extension the flags ask for (None: keep the RoPE), checked against `cfg` now."""
    from megatron_ultralong.model.config import ContextExtension

    if args.yarn_target is None:
        return None
    context = ContextExtension(args.yarn_target, args.yarn_original, args.yarn_beta_fast, args.yarn_beta_slow)
    context.apply(cfg)  # bad flags fail here, before any process starts
    return context


def run_conversion(args: argparse.Namespace, context: Optional["ContextExtension"]) -> int:
    """Body run by every rank (torch.distributed env already set). Returns this rank's exit status:
    VERIFY_FAILED on rank 0 when the verification exceeds the tolerance, else 0."""
    from megatron_ultralong.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_ultralong.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    setup_logging(stream=sys.stderr)  # again in spawned processes: rank 0's progress only, on stderr
    runtime = init_runtime(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp), device="cpu")
    log.info("%s: %s -> %s on %d process(es), TP=%d PP=%d%s", args.direction, args.src, args.dst,
             runtime.world_size, args.tp, args.pp, f", context extended to {context.target}" if context else "")
    try:
        common = dict(dtype=_dtype_flag(args), context=context, overwrite=args.overwrite,
                      progress=not args.no_progress, verify=args.verify)
        if args.direction == "hf-to-mcore":
            path, report = convert_hf_to_mcore(args.src, args.dst, runtime, **common)
        else:
            path, report = convert_mcore_to_hf(args.src, args.dst, runtime, max_shard_size=args.max_shard_size,
                                               manifest_checked=True, **common)  # checked in main()
        status = 0
        if runtime.rank == 0:
            print(f"wrote {path}", flush=True)
            if report is not None:
                report = dataclasses.replace(report, tolerance=args.verify_tol)
                print(report, flush=True)
                if not report.passed:
                    print(f"mu-convert: error: verification failed: max |logit diff| {report.max_abs_logit_diff:.3e} "
                          f"exceeds --verify-tol {report.tol:.1e} ({path} was written; inspect it before use)",
                          file=sys.stderr, flush=True)
                    status = VERIFY_FAILED
        return status
    finally:
        shutdown_runtime()


def _spawned(rank: int, world_size: int, port: int, args: argparse.Namespace,
             context: Optional["ContextExtension"]) -> int:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return run_conversion(args, context)


def _spawned_exit(rank: int, world_size: int, port: int, args: argparse.Namespace,
                  context: Optional["ContextExtension"]) -> None:
    """mp.spawn target: a failed verification becomes the child's exit status."""
    status = _spawned(rank, world_size, port, args, context)
    if status:
        sys.exit(status)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for old, new in RENAMED_FLAGS.items():
        if getattr(args, old.lstrip("-").replace("-", "_"), None) is not None:
            parser.error(f"{old} was renamed {new}")
    setup_logging(stream=sys.stderr)  # progress on stderr; results on stdout
    try:
        from megatron_ultralong.convert.hf_io import parse_size
        from megatron_ultralong.model.config import check_parallel_fits

        if args.direction == "mcore-to-hf":  # a save dir, an iter_* dir or a model dir
            from megatron_ultralong.checkpoint.safe_metadata import check_dcp_metadata
            from megatron_ultralong.checkpoint.vetted_load import verify_model_manifest

            args.src = str(require_megatron_checkpoint(args.src, "MCORE_DIR"))
            # Before any process starts and anything is written: a refused export leaves no output.
            verify_model_manifest(args.src, allow_unverified=args.no_verify_manifest)
            check_dcp_metadata(args.src)
        _dtype_flag(args)
        if args.direction == "mcore-to-hf":
            parse_size(args.max_shard_size)
        if os.path.exists(args.dst) and not args.overwrite:
            raise FileExistsError(f"{args.dst} already exists (pass --overwrite to replace it)")
        cfg = source_config(args)
        check_parallel_fits(cfg, args.tp, args.pp, "--tp ", "--pp ")
        context = context_extension(args, cfg)
    except (ValueError, OSError) as e:
        print(f"mu-convert: error: {e}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ:  # torchrun
        return run_conversion(args, context)
    nproc = args.nproc or args.tp * args.pp
    if nproc % (args.tp * args.pp):
        print(f"mu-convert: error: --nproc {nproc} is not a multiple of --tp * --pp = {args.tp * args.pp}",
              file=sys.stderr)
        return 2
    from megatron_ultralong.parallel.runtime import free_port

    port = free_port()
    if nproc == 1:
        # In this process: the rank variables it sets must not outlive the call (a caller that later
        # starts a subprocess would hand it a MASTER_PORT whose store may still be listening here).
        saved = dict(os.environ)
        try:
            return _spawned(0, 1, port, args, context)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawned_exit, args=(nproc, port, args, context), nprocs=nproc, join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code == VERIFY_FAILED:
            return VERIFY_FAILED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
