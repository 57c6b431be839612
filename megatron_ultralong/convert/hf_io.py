"""Reading Hugging Face checkpoints tensor by tensor (safetensors shards through memory maps, with or
without `model.safetensors.index.json`), plus the config, dtype and size helpers both directions use.
Writing shards is `hf_shards.py`.

Memory: safetensors maps a whole file per `safe_open` handle and keeps touched pages resident until
the handle closes (measured: a 512 MiB tensor stays in RSS after `del tensor` while the handle
lives). `HFCheckpointReader.get` therefore opens the shard per call and drops the handle, so only the
tensors the caller still holds are resident.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files an HF model directory carries besides weights; copied verbatim (config.json is rewritten).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt",
)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: Union[int, str]) -> int:
    """'2GB' / '500MiB' / 12345 -> bytes (HF's max_shard_size spelling)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '2GB', '500MiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])


class HFCheckpointReader:
    """Lazy access to an HF safetensors checkpoint (single file or sharded with an index).

    Only the index / headers are read up front; `get(name)` maps one tensor.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing")
        with open(config_path, encoding="utf-8") as f:
            try:
                self.config: dict = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        self.weight_map = self._read_weight_map()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.path / file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._shapes[name] = tuple(sl.get_shape())
                    self._dtypes[name] = ST_DTYPES[sl.get_dtype()]
        missing = sorted(n for n, file in self.weight_map.items() if n not in self._shapes)
        if missing:
            raise ValueError(
                f"{self.path / INDEX_FILE}: {len(missing)} tensor(s) listed but not in their shard, "
                f"e.g. {missing[0]!r} in {self.weight_map[missing[0]]}"
            )

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            for name, file in weight_map.items():
                _check_shard_name(index, name, file)
            absent = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if absent:
                raise FileNotFoundError(
                    f"{index} lists shard(s) that do not exist in {self.path}: {', '.join(absent)}"
                )
            return weight_map
        single = self.path / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        others = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = f" (found {', '.join(others)}: only safetensors checkpoints are supported)" if others else ""
        raise FileNotFoundError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE}{hint}")

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> Tensor:
        """The tensor `name` (KeyError if absent). Backed by a private map of just this tensor, so it
        is resident only while the caller holds it."""
        file = self.weight_map[name]
        with safe_open(self.path / file, framework="pt") as f:
            return f.get_tensor(name)

    def side_files(self) -> list[Path]:
        """Tokenizer / generation files present next to the weights (copied through)."""
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def _check_shard_name(index: Path, tensor: str, file: object) -> None:
    """A shard named by the index must be a file of the checkpoint directory: a relative path with
    no `..` (an index naming `../x` or `/abs` would make the converter read any file the user can).
    The shard itself may be a symbolic link: the Hugging Face hub cache stores every file of a
    snapshot as a link into its blob store."""
    p = PurePosixPath(file) if isinstance(file, str) else None
    if p is None or not file or p.is_absolute() or ".." in p.parts or "\\" in file:
        raise ValueError(f"{index}: weight_map[{tensor!r}] = {file!r} is not a file of {index.parent} "
                         "(absolute paths and '..' are refused)")


ST_DTYPES = {  # safetensors header dtype names -> torch dtypes
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def dual_format_hf_config(config: dict) -> dict:
    """A config.json dict that transformers 4.x and 5.x read the same way.

    4.x reads `rope_theta` + `rope_scaling` and `torch_dtype`; 5.x keeps the RoPE in
    `rope_parameters` (theta inside) and the dtype in `dtype`, and still accepts the 4.x keys
    (`rope_scaling` wins when both are present). A 5.x-only file (`rope_parameters` alone) is read by
    4.x with its default RoPE, silently: so both spellings are written, with the same values."""
    out = dict(config)
    theta, scaling = out.get("rope_theta"), out.get("rope_scaling")
    params = out.get("rope_parameters")
    if isinstance(params, dict) and scaling is None and theta is None:  # 5.x-only input: add the 4.x keys
        params = dict(params)
        theta = params.pop("rope_theta", None)
        scaling = params if params.get("rope_type", "default") != "default" else None
        out["rope_theta"], out["rope_scaling"] = theta, scaling
    if theta is not None:
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        out["rope_parameters"].pop("type", None)
    dtype = out.get("torch_dtype") or out.get("dtype")
    if dtype is not None:
        out["torch_dtype"] = out["dtype"] = dtype
    return out


def write_hf_config(out_dir: Union[str, os.PathLike], config: dict) -> None:
    """Write config.json in the format both transformers 4.x and 5.x read (`dual_format_hf_config`)."""
    with open(Path(out_dir) / "config.json", "w", encoding="utf-8") as f:
        json.dump(dual_format_hf_config(config), f, indent=2, sort_keys=True)
        f.write("\n")
