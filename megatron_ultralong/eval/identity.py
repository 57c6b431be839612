"""What produced an evaluation result: weights, tokenizer and backend, as short fingerprints.

A grid's results file (grid.py) records these in its header; a re-run with other weights, another
tokenizer or another backend refuses the file instead of reusing its cells. The weights
fingerprint hashes the whole model config (RoPE included: a YaRN conversion changes only the
config, and must not inherit the base model's scores) and the bytes of a few tensors: the final
norm in full and the first and last rows of the first and last weight matrices, so that any
training step changes it while reading a few MB, not the whole model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

ROWS = 64
"""Rows hashed from each end of a matrix."""

# Config keys that name where or with what a model was saved, not what it computes.
_VOLATILE = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def config_digest(config: Any) -> str:
    """sha256 (16 hex) of a config: an HF PretrainedConfig, a dataclass or a mapping."""
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    elif dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        d = dict(config)
    else:
        raise TypeError(f"cannot fingerprint a config of type {type(config).__name__}")
    d = {k: v for k, v in d.items() if k not in _VOLATILE}
    return hashlib.sha256(_canonical(d).encode()).hexdigest()[:16]


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of `t` (vectors whole; matrices' first and last ROWS rows), on the CPU."""
    t = t.detach()
    if t.dim() >= 2 and t.shape[0] > 2 * ROWS:
        t = torch.cat([t[:ROWS], t[-ROWS:]])
    return t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def weights_fingerprint(config: Any, named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """"config=<hash>/tensors=<hash>" over `config` and the given (name, tensor) pairs."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(tensor_bytes(t))
    return f"config={config_digest(config)}/tensors={h.hexdigest()[:16]}"


def pick_tensors(named: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """The tensors a fingerprint reads: the last norm vector, the first and last matrices."""
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    norms = [(n, p) for n, p in named if p.dim() == 1 and "norm" in n]
    picked = ([norms[-1]] if norms else []) + ([mats[0], mats[-1]] if mats else [])
    return list(dict(picked).items()) or named[-1:]


def tokenizer_fingerprint(hf_tokenizer: Any, bos_id: Any, stop_ids: Iterable[int]) -> str:
    """sha256 (16 hex) of the tokenizer's full serialization (fast tokenizers: tokenizer.json as
    `tokenizers` writes it; slow ones: the vocabulary), its class, BOS and stop ids."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else _canonical(sorted(hf_tokenizer.get_vocab().items()))
    head = _canonical({"class": type(hf_tokenizer).__name__, "bos": bos_id, "stop": list(stop_ids),
                       "added": sorted(str(t) for t in getattr(hf_tokenizer, "all_special_tokens", []))})
    return hashlib.sha256((head + "\n" + body).encode()).hexdigest()[:16]


def run_identity(backend: Any, tokenizer: Any) -> dict:
    """{"weights", "tokenizer", "backend"} for a grid header (None where a test double has none)."""
    return {"weights": getattr(backend, "fingerprint", None), "backend": getattr(backend, "identity", None),
            "tokenizer": getattr(tokenizer, "fingerprint", None)}
