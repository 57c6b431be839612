"""The one inference forward of a model stage: hidden states, and logits of chosen positions.

`GPTModel.forward` on the last stage always applies the output layer to every position, which a
long prompt cannot afford (1M positions x 128K vocabulary in fp32 is 512 GB) and which inference
does not need: evaluation wants the logits of one position, the checkpoint check (convert/verify.py)
wants all of a short prompt's. So the forward is split at the output layer:

    hidden = stage_hidden(model, input_ids, position_ids[, input_tensor])   # [s, b, H]
    logits = stage_logits(model, hidden[i : i + 1])                        # [b, 1, vocab] fp32

Both the converter's `--verify` and the evaluation backend (eval/megatron_backend.py) call these,
so the code they compare against transformers is the code evaluation runs.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.model.gpt import UltraLongGPTModel, gather_tp_logits


def stage_hidden(model: UltraLongGPTModel, input_ids: Tensor, position_ids: Tensor,
                 input_tensor: Optional[Tensor] = None) -> Tensor:
    """This stage's output hidden states [s, b, H] (the final norm applied on the last stage).

    input_ids / position_ids [b, s]: the tokens this rank holds and their *global* positions (a CP
    shard passes its zigzag positions). input_tensor [s, b, H]: the previous pipeline stage's
    output, required on every stage but the first. Mirrors `GPTModel.forward` up to the output
    layer (pinned against transformers' logits by tests/test_eval_megatron.py and
    tests/test_convert_roundtrip.py).
    """
    if input_tensor is not None:
        model.set_input_tensor(input_tensor)
    elif not model.pre_process:
        raise ValueError("stage_hidden: a stage without the embedding needs input_tensor [s, b, H]")
    pre = model._preprocess(input_ids=input_ids, position_ids=position_ids)
    # _preprocess returns (decoder_input, rotary_pos_emb, cos, sin, sequence_len_offset, ...);
    # tests/test_runtime.py pins this layout against the installed megatron-core.
    return model.decoder(hidden_states=pre[0], attention_mask=None, rotary_pos_emb=pre[1],
                         rotary_pos_cos=pre[2], rotary_pos_sin=pre[3], sequence_len_offset=pre[4])


def stage_logits(model: UltraLongGPTModel, hidden: Tensor) -> Tensor:
    """Full-vocabulary fp32 logits [b, s, vocab_size] of last-stage hidden states [s, b, H].

    Pass only the positions you need (a slice of `stage_hidden`'s output). The vocab-parallel
    output is gathered over TP (every TP rank gets the whole row); the padded vocabulary is cut.
    """
    if not model.post_process:
        raise ValueError("stage_logits: only the last pipeline stage has the output layer")
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)  # [s, b, V_pad / TP]
    tp_group: Optional[dist.ProcessGroup] = model.pg_collection.tp
    return gather_tp_logits(logits.transpose(0, 1).float(), tp_group, model.model_config.vocab_size)
