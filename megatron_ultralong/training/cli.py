"""`mu-train` / tools/train.py: parse --config and overrides, then run, print or dry-run.

    mu-train --config R.yaml [section.field=value ...]                  train (under torchrun)
    mu-train --config R.yaml --print-config [overrides]                 the resolved YAML
    mu-train --config R.yaml --dry-run --world-size 256 [overrides]     checks, memory, step time

Only the config modules (dataclasses + YAML) are imported before the arguments are checked:
torch and megatron-core load after, so `--help` and config errors come back at once.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing

from megatron_ultralong.training.config import TrainConfig, load_train_config


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field docstrings (the string literal under each field), read from its source:
    Python keeps no runtime trace of them."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_reference() -> str:
    """Every config section and field with its type, default and doc (the --help epilog)."""
    out = ["config sections and fields (YAML `section: {field: value}` or override `section.field=value`):"]
    hints = typing.get_type_hints(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        cls = hints[section.name]
        out.append(f"\n{section.name}: {' '.join((cls.__doc__ or '').split())}")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            tp = typing.get_type_hints(cls)[f.name]
            type_name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            out.append(f"  {section.name}.{f.name} = {default!r}  [{type_name}]")
            if f.name in docs:
                out.append(textwrap.fill(docs[f.name], width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mu-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="UltraLong training on Megatron-Core. Train under torchrun; --print-config and "
                    "--dry-run run anywhere, without GPUs, in seconds.",
        epilog=config_reference())
    parser.add_argument("--config", help="YAML training config (examples/recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.steps=100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, defaults and overrides applied) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the layout, divisibility and paths, print the per-GPU memory estimate "
                             "and the predicted step time for --world-size GPUs, and exit: 0 ready to launch, "
                             "1 errors, 4 the plan fits but inputs are missing (each listed with the step "
                             "that writes it)")
    parser.add_argument("--world-size", type=int, help="--dry-run: GPUs of the launch (nodes x GPUs per node)")
    parser.add_argument("--device-memory-gib", type=float, default=80.0,
                        help="--dry-run: memory per GPU in GiB (default 80: H100/A100 80GB)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="--dry-run: GPUs per node, for the host memory per node (default 8)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="--dry-run: host memory per node available to offloaded activations and "
                             "optimizer state; an error when the plan needs more (default: not checked)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and not args.world_size:
        parser.error("--dry-run needs --world-size N")
    try:
        cfg = load_train_config(args.config, tuple(args.overrides))
    except ValueError as e:
        parser.exit(2, f"mu-train: error: {e}\n")
    if args.print_config:
        import yaml

        from megatron_ultralong.config_io import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    if args.dry_run:
        from megatron_ultralong.training.dry_run import dry_run

        report = dry_run(cfg, args.world_size, args.device_memory_gib, args.gpus_per_node, args.host_memory_gib)
        print(report.text())
        sys.exit(report.exit_code)
    from megatron_ultralong.training.sinks import check_sinks

    problems = check_sinks(cfg.train)  # before torch, megatron-core and the model
    if problems:
        parser.exit(2, f"mu-train: error: {problems[0]}\n")
    from megatron_ultralong.logs import setup_logging
    from megatron_ultralong.parallel.runtime import shutdown_runtime
    from megatron_ultralong.training.guards import EXIT_NON_FINITE, EXIT_SAVED_AND_STOPPED, NonFiniteError
    from megatron_ultralong.training.trainer import Trainer  # heavy imports after arg checks

    setup_logging()
    # Exit codes (docs/training.md, "Faults and preemption"): 0 finished; 2 bad config, data or
    # checkpoint; 3 stopped on NaN/Inf; 75 saved and stopped on a signal or the time limit (requeue).
    try:
        trainer = Trainer(cfg)
        trainer.train()
    except ValueError as e:
        print(f"mu-train: error: {e}", file=sys.stderr)
        shutdown_runtime()
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mu-train: error: {e}", file=sys.stderr)
        shutdown_runtime()
        sys.exit(EXIT_NON_FINITE)
    shutdown_runtime()
    if trainer.stop_reason:
        sys.exit(EXIT_SAVED_AND_STOPPED)


if __name__ == "__main__":
    main()
