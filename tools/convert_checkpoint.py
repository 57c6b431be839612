#!/usr/bin/env python
"""HF Llama <-> Megatron-Core checkpoint conversion; see `megatron_ultralong/convert/cli.py` and
docs/conversion.md. Same as the `mu-convert` console script.

    python tools/convert_checkpoint.py hf-to-mcore HF_DIR MCORE_DIR --tp 2 --pp 2 --verify
    python tools/convert_checkpoint.py mcore-to-hf MCORE_DIR HF_DIR --dtype bf16
"""
import sys

from megatron_ultralong.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
