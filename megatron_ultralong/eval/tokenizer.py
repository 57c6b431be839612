"""The tokenizer as evaluation sees it: text <-> token ids with no hidden special tokens.

Evaluation builds prompts in *token* space (haystack, needles and templates are tokenized separately
and concatenated), so that a prompt's length and a needle's position are exact to the token and do
not depend on how a BPE merges across a seam. This wrapper makes the one choice that matters for
that: `encode` never adds BOS/EOS; the prompt builder adds BOS itself, once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class EvalTokenizer:
    """A transformers tokenizer (fast or slow) plus the ids evaluation needs."""

    hf_tokenizer: Any
    """A `transformers.PreTrainedTokenizerBase`."""

    bos_id: Optional[int]
    """Prepended once to every prompt (None: the tokenizer has no BOS, nothing is prepended)."""

    stop_ids: tuple[int, ...]
    """Greedy decoding stops at the first of these (EOS and end-of-turn ids)."""

    @classmethod
    def wrap(cls, hf_tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> "EvalTokenizer":
        """Wrap a loaded transformers tokenizer; stop ids = its eos_token_id + extra_stop_ids."""
        stops = [i for i in (hf_tokenizer.eos_token_id, *extra_stop_ids) if i is not None]
        return cls(hf_tokenizer, hf_tokenizer.bos_token_id, tuple(dict.fromkeys(stops)))

    @classmethod
    def from_path(cls, path: str, flag: str = "--tokenizer") -> "EvalTokenizer":
        """Load from an HF directory (tokenizer.json / tokenizer_config.json) or a tokenizer.json file.

        `flag` names the CLI option in error messages.
        """
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if os.path.isfile(path):
            if not path.endswith(".json"):
                raise ValueError(f"{flag}={path!r}: expected an HF tokenizer directory or a tokenizer.json")
            return cls.wrap(PreTrainedTokenizerFast(tokenizer_file=path))
        if not os.path.isdir(path):
            raise ValueError(f"{flag}={path!r}: no such file or directory")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag}={path!r}: cannot load a tokenizer from it ({e})") from e
        return cls.wrap(tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, never with special tokens added."""
        return list(self.hf_tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """The text of every token on its own (byte-level pieces may be partial characters)."""
        return [self.hf_tokenizer.decode([i]) for i in ids]

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)
