"""`tools/train.py` / `mu-train`: parse --config and overrides, run the Trainer, tear down."""
from __future__ import annotations

import argparse
import sys

from megatron_ultralong.parallel.runtime import shutdown_runtime
from megatron_ultralong.training.config import load_train_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="UltraLong training on Megatron-Core (run under torchrun)")
    parser.add_argument("--config", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, tuple(args.overrides))
    except ValueError as e:
        parser.exit(2, f"train: error: {e}\n")
    from megatron_ultralong.logs import setup_logging
    from megatron_ultralong.training.guards import EXIT_NON_FINITE, EXIT_SAVED_AND_STOPPED, NonFiniteError
    from megatron_ultralong.training.trainer import Trainer  # heavy imports after arg checks

    setup_logging()
    # Exit codes (docs/training.md, "Faults and preemption"): 0 finished; 2 bad config, data or
    # checkpoint; 3 stopped on NaN/Inf; 75 saved and stopped on a signal or the time limit (requeue).
    try:
        trainer = Trainer(cfg)
        trainer.train()
    except ValueError as e:
        print(f"train: error: {e}", file=sys.stderr)
        shutdown_runtime()
        sys.exit(2)
    except NonFiniteError as e:
        print(f"train: error: {e}", file=sys.stderr)
        shutdown_runtime()
        sys.exit(EXIT_NON_FINITE)
    shutdown_runtime()
    if trainer.stop_reason:
        sys.exit(EXIT_SAVED_AND_STOPPED)


if __name__ == "__main__":
    main()
