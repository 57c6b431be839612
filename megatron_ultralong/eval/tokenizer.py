"""The tokenizer as evaluation sees it: text <-> token ids with no hidden special tokens.

Evaluation builds prompts in *token* space (haystack, needles and templates are tokenized separately
and concatenated), so that a prompt's length and a needle's position are exact to the token and do
not depend on how a BPE merges across a seam. This wrapper makes the one choice that matters for
that: `encode` never adds BOS/EOS; the prompt builder adds BOS itself, once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_ultralong.eval.identity import tokenizer_fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTokenizer:
    """A transformers tokenizer (fast or slow) plus the ids evaluation needs."""

    hf_tokenizer: Any
    """A `transformers.PreTrainedTokenizerBase`."""

    bos_id: Optional[int]
    """Prepended once to every prompt (None: the tokenizer has no BOS, nothing is prepended)."""

    stop_ids: tuple[int, ...]
    """Greedy decoding stops at the first of these (EOS and end-of-turn ids)."""

    fingerprint: str = ""
    """Identifies the tokenizer for resume (identity.tokenizer_fingerprint)."""

    @classmethod
    def wrap(cls, hf_tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> "EvalTokenizer":
        """Wrap a loaded transformers tokenizer; stop ids = its eos_token_id + extra_stop_ids."""
        stops = [i for i in (hf_tokenizer.eos_token_id, *extra_stop_ids) if i is not None]
        stop_ids = tuple(dict.fromkeys(stops))
        return cls(hf_tokenizer, hf_tokenizer.bos_token_id, stop_ids,
                   tokenizer_fingerprint(hf_tokenizer, hf_tokenizer.bos_token_id, stop_ids))

    @classmethod
    def from_path(cls, path: str, flag: str = "--tokenizer") -> "EvalTokenizer":
        """Load from an HF directory (tokenizer.json / tokenizer_config.json) or a tokenizer.json file.

        A `tokenizer.json` with a `tokenizer_config.json` beside it is loaded from its directory, so
        both spellings give the same BOS, stop ids and prompts. A bare tokenizer.json knows no BOS or
        EOS (those live in tokenizer_config.json): that is loaded as it is, with a warning naming
        what is missing. `flag` names the CLI option in error messages.
        """
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if os.path.isfile(path):
            if not path.endswith(".json"):
                raise ValueError(f"{flag}={path!r}: expected an HF tokenizer directory or a tokenizer.json")
            parent = os.path.dirname(os.path.abspath(path))
            beside = os.path.join(parent, "tokenizer_config.json")
            if os.path.basename(path) == "tokenizer.json" and os.path.isfile(beside):
                logger.info("%s=%s: loading its directory (tokenizer_config.json holds BOS/EOS)", flag, path)
                return cls.from_path(parent, flag)
            tok = cls.wrap(PreTrainedTokenizerFast(tokenizer_file=path))
            missing = [what for what, v in (("no BOS is prepended", tok.bos_id), ("no EOS stops decoding",
                                                                                  tok.stop_ids or None)) if v is None]
            if missing:
                logger.warning("%s=%s: a bare tokenizer.json without tokenizer_config.json beside it: %s "
                               "(pass the tokenizer's directory to use its special tokens)", flag, path,
                               " and ".join(missing))
            return tok
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
