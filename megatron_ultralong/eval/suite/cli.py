"""`mu-eval-suite`: the paper's long-context evaluation of one model in one resumable command.

    mu-eval-suite --model hf_export/ --suite-config suite.yaml --out results/suite
    torchrun --nproc-per-node 8 -m megatron_ultralong.eval.suite.cli --model hf_export/ \
        --megatron-model ckpt/1m --cp 8 --suite-config suite.yaml --out results/suite

Cells up to the config's hf_max_tokens run on the HF model (--model), longer ones on the Megatron
checkpoint (--megatron-model) with its prefill split over --cp ranks. Under torchrun the Megatron
cells run on every rank first, then the HF cells on rank 0. Re-running with the same --out
resumes (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, get_args

from megatron_ultralong.dtypes import DtypeName
from megatron_ultralong.parallel.config import CpCommType


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mu-eval-suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory (config.json + weights)")
    p.add_argument("--megatron-model", help="Megatron checkpoint of the same model, for prompts longer than "
                                            "the config's hf_max_tokens")
    p.add_argument("--tokenizer", help="HF tokenizer directory or tokenizer.json (default: --model)")
    p.add_argument("--suite-config", required=True, help="YAML: benchmarks and their options, hf_max_tokens")
    p.add_argument("--out", required=True, help="output directory; a re-run with the same --out resumes")
    p.add_argument("--model-name", help="the table row's name (default: the config's model_name)")
    p.add_argument("--tp", type=int, default=1, help="Megatron: tensor-parallel size")
    p.add_argument("--cp", type=int, default=1, help="Megatron: context-parallel size")
    p.add_argument("--cp-comm-type", default="p2p", choices=get_args(CpCommType))
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", choices=get_args(DtypeName), help="default: the checkpoint's dtype")
    return p


class CliPool:
    """Backends from the command line, loaded on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.is_writer = int(os.environ.get("RANK", "0")) == 0
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self.runtime = None

    def available(self, kind: str) -> bool:
        if kind == "megatron":
            return self.args.megatron_model is not None
        return self.is_writer

    def get(self, kind: str) -> tuple[Any, Any]:
        if kind not in self._loaded:
            from megatron_ultralong.eval.cli import _backend

            a = self.args
            ns = argparse.Namespace(
                model=a.megatron_model if kind == "megatron" else a.model, tokenizer=a.tokenizer or a.model,
                tp=a.tp if kind == "megatron" else 1, cp=a.cp if kind == "megatron" else 1,
                cp_comm_type=a.cp_comm_type, device=a.device, dtype=a.dtype)
            if kind == "hf" and a.device is None and self.world > 1:
                ns.device = "cuda"
            backend, tokenizer, runtime = _backend(ns)
            if kind == "megatron" and backend.__class__.__name__ != "MegatronBackend":
                raise ValueError(f"--megatron-model={a.megatron_model!r}: not a Megatron checkpoint")
            if kind == "hf" and backend.__class__.__name__ == "MegatronBackend":
                raise ValueError(f"--model={a.model!r}: the HF model directory (a Megatron checkpoint goes to "
                                 "--megatron-model)")
            self.runtime = runtime or self.runtime
            self._loaded[kind] = (backend, tokenizer)
        return self._loaded[kind]


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    from megatron_ultralong.eval.cli import check_out_dir
    from megatron_ultralong.eval.suite.registry import make
    from megatron_ultralong.eval.suite.runner import load_suite_config, route, run_suite
    from megatron_ultralong.logs import setup_logging

    setup_logging()
    pool = CliPool(args)
    try:
        config = load_suite_config(args.suite_config)
        if args.model_name:
            config = type(config)(config.benchmarks, config.hf_max_tokens, args.model_name)
        check_out_dir(args.out)
        benches = {n: make(n, o) for n, o in config.benchmarks.items()}
        for b in benches.values():  # data files read now: a missing one fails before any model loads
            getattr(b, "check_inputs", lambda: None)()
        long = [c.key for b in benches.values() for c in b.cells() if route(c, config.hf_max_tokens) == "megatron"]
        if long and args.megatron_model is None:
            raise ValueError(f"{len(long)} cells (e.g. {long[0]}) exceed hf_max_tokens={config.hf_max_tokens}: give "
                             "--megatron-model (run under torchrun with --cp) or raise hf_max_tokens")
        report = run_suite(config, args.out, pool, benches)
    except ValueError as e:
        print(f"mu-eval-suite: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if pool.runtime is not None:
            from megatron_ultralong.parallel.runtime import shutdown_runtime

            shutdown_runtime()
    if pool.is_writer and report:
        print(open(report["table_path"], encoding="utf-8").read())
        print(f"results: {report['json_path']}; table: {report['table_path']}")


if __name__ == "__main__":
    main()
