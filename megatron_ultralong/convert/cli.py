"""`mu-convert` / tools/convert_checkpoint.py: HF Llama <-> Megatron-Core checkpoints.

    mu-convert hf-to-mcore HF_DIR MCORE_DIR [--tp 2 --pp 2] [--dtype bf16]
               [--rope-yarn-target 1048576 --yarn-beta-fast 4] [--verify]
    mu-convert mcore-to-hf MCORE_DIR HF_DIR [--tp 1] [--dtype bf16] [--max-shard-size 2GB] [--verify]

Processes: under torchrun (WORLD_SIZE set) every rank runs the conversion itself; otherwise the tool
runs `--nproc` (default TP x PP = 1) local gloo processes. The Megatron checkpoint is TP/PP-agnostic,
so --tp/--pp only split the work across processes; memory is bounded by the largest tensor either
way (both directions stream). Inputs are checked in the parent (config, tensor names and shapes,
TP/PP divisibility) before any process starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch
import torch.multiprocessing as mp

from megatron_ultralong.checkpoint.torch_dist import read_checkpoint_info
from megatron_ultralong.convert.hf_io import HFCheckpointReader, parse_size
from megatron_ultralong.convert.hf_to_mcore import check_hf_weights, model_config_from_hf
from megatron_ultralong.dtypes import parse_dtype
from megatron_ultralong.logs import setup_logging
from megatron_ultralong.model.config import ContextExtension, LlamaConfig, check_parallel_fits
from megatron_ultralong.parallel.runtime import free_port

log = logging.getLogger(__name__)


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
        s.add_argument("--rope-yarn-target", type=int, default=None,
                       help="replace the RoPE with YaRN for this context length (e.g. 1048576)")
        s.add_argument("--yarn-original-max-position", type=int, default=8192,
                       help="YaRN original length; factor = target / this (UltraLong: 8192)")
        s.add_argument("--yarn-beta-fast", type=float, default=32.0, help="YaRN beta_fast (paper: 4)")
        s.add_argument("--yarn-beta-slow", type=float, default=1.0, help="YaRN beta_slow (paper: 1)")
        s.add_argument("--verify", action="store_true",
                       help="compare logits with transformers on a short prompt")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "mcore-to-hf":
            s.add_argument("--max-shard-size", default="1GB", help="safetensors shard size (e.g. 2GB)")
    return p


def _dtype_flag(args: argparse.Namespace) -> Optional[torch.dtype]:
    """--dtype as a torch dtype; None keeps the input's."""
    return None if args.dtype is None else parse_dtype(args.dtype, "--dtype")


def source_config(args: argparse.Namespace) -> LlamaConfig:
    """The input's model config, validated (HF: also every tensor's name and shape)."""
    if args.direction == "hf-to-mcore":
        reader = HFCheckpointReader(args.src)
        cfg = model_config_from_hf(reader.config, str(reader.path / "config.json"))
        check_hf_weights(reader, cfg)
        return cfg
    return read_checkpoint_info(args.src).model_config


def context_extension(args: argparse.Namespace, cfg: LlamaConfig) -> Optional[ContextExtension]:
    """The YaRN extension the flags ask for (None: keep the RoPE), checked against `cfg` now."""
    if args.rope_yarn_target is None:
        return None
    context = ContextExtension(args.rope_yarn_target, args.yarn_original_max_position, args.yarn_beta_fast,
                               args.yarn_beta_slow)
    context.apply(cfg)  # bad flags fail here, before any process starts
    return context


def run_conversion(args: argparse.Namespace, context: Optional[ContextExtension]) -> None:
    """Body run by every rank (torch.distributed env already set)."""
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
                                               **common)
        if runtime.rank == 0:
            print(f"wrote {path}", flush=True)
            if report is not None:
                print(report, flush=True)
    finally:
        shutdown_runtime()


def _spawned(rank: int, world_size: int, port: int, args: argparse.Namespace, context: Optional[ContextExtension]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    run_conversion(args, context)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(stream=sys.stderr)  # progress on stderr; results on stdout
    try:
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
        run_conversion(args, context)
        return 0
    nproc = args.nproc or args.tp * args.pp
    if nproc % (args.tp * args.pp):
        print(f"mu-convert: error: --nproc {nproc} is not a multiple of --tp * --pp = {args.tp * args.pp}",
              file=sys.stderr)
        return 2
    port = free_port()
    if nproc == 1:
        _spawned(0, 1, port, args, context)
    else:
        mp.spawn(_spawned, args=(nproc, port, args, context), nprocs=nproc, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
