"""The one table of parameter dtype names <-> torch dtypes (configs, checkpoints, CLIs).

Names are torch's own ("bfloat16"), which is also what transformers writes as `torch_dtype` in a
config.json; the short forms ("bf16") are accepted where a person types them (CLI flags).
"""
from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
"""Parameter dtypes the plugin trains, stores and converts."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""DtypeName -> torch dtype."""

SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short spellings accepted by `parse_dtype` (what Megatron-LM's flags use)."""


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """'bfloat16' / 'bf16' / 'fp32' ... -> torch dtype; a bad name raises naming `what` (the flag or field)."""
    key = SHORT_NAMES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in DTYPES:
        raise ValueError(f"{what}={name!r}: expected one of {sorted(DTYPES) + sorted(SHORT_NAMES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the config.json / checkpoint spelling)."""
    return str(dtype).removeprefix("torch.")
