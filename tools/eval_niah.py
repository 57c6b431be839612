#!/usr/bin/env python3
"""Long-context evaluation: `niah` (see megatron_ultralong/eval/cli.py and docs/evaluation.md).

    python tools/eval_niah.py --model HF_DIR_OR_MEGATRON_CKPT --tokenizer TOKENIZER --out results/ ...

A Megatron checkpoint runs under torchrun with --tp x --cp processes (the prompt's prefill is split
over the CP ranks).
"""
from megatron_ultralong.eval.cli import niah_main

if __name__ == "__main__":
    niah_main()
