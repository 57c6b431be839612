#!/usr/bin/env python3
"""Train (continued pretraining or SFT) on Megatron-Core. Launch with torchrun:

    torchrun --nproc-per-node 8 tools/train.py --config examples/recipes/llama31_8b_1m.yaml \
        train.save=/ckpt/1m train.load=/ckpt/1m

Config: one YAML file (see megatron_ultralong/training/config.py for every field) plus
`section.field=value` overrides.
"""
from megatron_ultralong.training.cli import main

if __name__ == "__main__":
    main()
