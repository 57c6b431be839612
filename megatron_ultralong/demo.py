"""`make demo`: the UltraLong recipe in miniature, on CPU.

Each stage runs as its own process (distributed stages under torchrun with gloo), exactly as a user
would run them on a cluster, and prints what it measured and where its artifacts are.

Stages so far:
1. tp-step: a tiny Llama built from an HF config with YaRN RoPE (factor from the target context),
   one forward/backward at TP=2 on two CPU processes; prints the loss and the RoPE settings.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

DEMO_TARGET_CONTEXT = 1 << 16  # the miniature's "1M": 8x a tiny original context of 8192


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, module: str, *args: str) -> None:
    """Run `python -m module args` under torchrun with `nproc` CPU processes (gloo)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={_free_port()}", "-m", module, *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env)


def tp_step(out_dir: str) -> None:
    """Stage 1 body (runs on every rank): forward/backward of a tiny YaRN Llama at TP=2."""
    import torch
    import transformers
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_ultralong.model import LlamaConfig, build_model
    from megatron_ultralong.rope import yarn_for_context_length
    from megatron_ultralong.runtime import ParallelConfig, init_runtime, shutdown_runtime

    rope = yarn_for_context_length(DEMO_TARGET_CONTEXT, original_max_position_embeddings=8192, beta_fast=4.0)
    theta, rope_scaling = rope.to_hf()
    hf_config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, rope_theta=theta, rope_scaling=rope_scaling,
        max_position_embeddings=DEMO_TARGET_CONTEXT,
    )
    cfg = LlamaConfig.from_hf(hf_config)
    rt = init_runtime(ParallelConfig(tensor_parallel=2))
    model = build_model(cfg, rt)
    seq = 256
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=g)
    # Positions far beyond the original context: the YaRN-scaled angles are what make them usable.
    positions = torch.arange(DEMO_TARGET_CONTEXT - seq, DEMO_TARGET_CONTEXT)[None]
    t0 = time.perf_counter()
    logits = model(ids[:, :-1], positions, None)  # [b, s, V_pad / TP]
    loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(),
                                        ids[:, 1:].transpose(0, 1).contiguous()).mean()
    loss.backward()
    elapsed = time.perf_counter() - t0
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters())).item()
    if rt.rank == 0:
        report = {
            "stage": "tp-step",
            "tensor_parallel": 2,
            "loss": loss.item(),
            "local_grad_norm_rank0": grad_norm,
            "seconds": round(elapsed, 3),
            "rope": {"rope_theta": theta, "rope_scaling": rope_scaling},
            "attention_factor": model.rotary_angles.attention_factor,
            "softmax_scale": model.config.softmax_scale,
        }
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "tp_step.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2))
    shutdown_runtime()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for every artifact")
    parser.add_argument("--stage", default="all", choices=["all", "tp-step"],
                        help="run one stage in this process (used by torchrun) or all of them")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.stage == "tp-step":
        tp_step(out)
        return
    print(f"[demo] artifacts under {out}")
    t0 = time.perf_counter()
    print("[demo] stage 1/1: tiny YaRN Llama, forward/backward at TP=2 on 2 CPU processes")
    torchrun(2, "megatron_ultralong.demo", "--stage", "tp-step", "--out", out)
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s; report: {os.path.join(out, 'tp_step.json')}")


if __name__ == "__main__":
    main()
