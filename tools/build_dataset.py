"""Build a long-context Megatron indexed dataset from a YAML recipe (see docs/data.md).

    python tools/build_dataset.py --config examples/data/tiny_recipe.yaml --workers 2
"""
import sys

from megatron_ultralong.data.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
