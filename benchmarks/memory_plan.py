"""Per-GPU memory and time arithmetic behind docs/parallelism_plan.md (UltraLong on 80 GB H100s).

    python benchmarks/memory_plan.py      # every table quoted in the doc

Every formula is written out here; anchors come from ../shared/reference/PERFORMANCE.md:
  §8  N_matmul 7.505e9, N_total 8.030e9, causal training FLOPs/token 4.503e10 + 786,432*s,
      tok/s/GPU bounds (FA3 full recompute 454/231/117; measured-class 317/160/80 at 1M/2M/4M)
  §9  139,392 B saved per token per layer (bf16, flash attention, no recompute); full recompute
      keeps 2h B per layer; transient = one layer's saved set + 4h*4 B fp32 grad buffers;
      +5 GB framework buffers; a layout fits if the total is <= 74 GB of 80.
  §11 the same, as formulas.
What this script adds (marked [derived] in the doc): TP/SP division, the distributed optimizer's
DP x CP sharding, CP communication buffers and chunked logits.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9  # decimal GB, as PERFORMANCE.md §9 uses
USABLE_GB = 74.0  # of 80 GB: PERFORMANCE.md §9's fit criterion (allocator slack, NCCL, context)
BUFFERS_GB = 5.0  # PERFORMANCE.md §11: framework/NCCL buffers


@dataclass(frozen=True)
class Model:
    """Llama-3.1-8B (RECIPE.md §1.2)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.ffn

    @property
    def total_params(self) -> int:
        """Embedding + untied head + layers (matmuls + 2 norms) + final norm: 8,030,261,248."""
        return 2 * self.vocab * self.hidden + self.layers * (self.layer_matmul_params + 2 * self.hidden) + self.hidden


@dataclass(frozen=True)
class Layout:
    """One training layout; micro batch 1 sequence per DP rank."""

    name: str
    seq: int
    tp: int
    cp: int
    dp: int
    recompute: str  # "none" | "selective" | "full"
    sequence_parallel: bool = True
    cp_comm: str = "p2p"
    pp: int = 1
    loss_chunk_tokens: int = 16384
    global_batch: int = 1
    steps: int = 1

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.cp * self.pp

    @property
    def gpus(self) -> int:
        return self.gpus_per_replica * self.dp


def saved_bytes_per_token_layer(m: Model, recompute: str, tp: int, sp: bool) -> float:
    """Activations one layer keeps for backward, per token, on one TP rank (bf16, flash attention).

    PERFORMANCE.md §9's table (TP=1): residual + norm-out twice (4h*2 B), q/k/v after RoPE,
    attention output, LSE (fp32 per head), gate+up and SiLU*up = 139,392 B. Under TP the head- and
    FFN-split tensors divide by TP; the residual/norm tensors divide only with sequence parallelism.
    """
    h, f = m.hidden, m.ffn
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    replicated = 4 * h * 2  # two residuals + two norm outputs
    split = (q + 2 * kv) * 2 + q * 2 + m.heads * 4 + 2 * f * 2 + f * 2
    if recompute == "full":  # the layer input only
        return h * 2 / (tp if sp else 1)
    if recompute == "selective":  # layer input + attention output + LSE (§9 "long-context style")
        return h * 2 / (tp if sp else 1) + (q * 2 + m.heads * 4) / tp
    return (replicated / (tp if sp else 1)) + split / tp


def breakdown(m: Model, lay: Layout) -> dict[str, float]:
    """Bytes per GPU by component (the most loaded pipeline stage, PP=1 in every recipe)."""
    params = m.total_params / (lay.tp * lay.pp)  # norms are replicated, but 0.0004% of the total
    tokens = lay.seq // lay.cp  # local tokens per CP rank (zigzag: 2 chunks of seq/(2*cp))
    layers = m.layers // lay.pp
    out = {
        # Megatron DDP keeps bf16 weights and fp32 main grads on every rank; the distributed
        # optimizer shards fp32 master weights + Adam m, v (12 B/param) over the DP x CP group.
        "weights bf16": params * 2,
        "grads fp32": params * 4,
        "optimizer (12 B / DPxCP)": params * 12 / (lay.dp * lay.cp),
        "saved activations": tokens * layers * saved_bytes_per_token_layer(m, lay.recompute, lay.tp, lay.sequence_parallel),
    }
    if lay.recompute != "none":
        # One layer is re-run at a time in backward: its full saved set plus fp32 grad buffers (§9).
        per_tok = saved_bytes_per_token_layer(m, "none", lay.tp, lay.sequence_parallel) + 4 * m.hidden * 4 / lay.tp
        out["recompute working set"] = tokens * per_tok
    # Chunked cross entropy: fp32 logits, softmax and their grad for loss_chunk_tokens tokens,
    # vocab split over TP (vocab-parallel CE).
    chunk = min(lay.loss_chunk_tokens, tokens)
    out["logits chunk"] = chunk * m.vocab / lay.tp * 4 * 3
    kv_local = tokens * 2 * m.kv_heads * m.head_dim * 2 / lay.tp  # this rank's K and V, bf16
    if lay.cp > 1 and lay.cp_comm == "p2p":
        # Ring: a K/V block in flight forward; backward also sends dK/dV in fp32 around the ring.
        out["CP ring buffers"] = 2 * kv_local + 2 * kv_local * 2
    elif lay.cp > 1:
        # All-gather: the whole sequence's K/V for one layer, and fp32 dK/dV before reduce-scatter.
        out["CP all-gather K/V"] = lay.cp * kv_local * (1 + 2)
    out["framework buffers"] = BUFFERS_GB * GB
    return out


def flops_per_token(m: Model, seq: int) -> float:
    """PERFORMANCE.md §8/§11: 6 N_matmul + causal attention 6 L d s (model FLOPs, no recompute)."""
    n_matmul = m.layers * m.layer_matmul_params + m.vocab * m.hidden
    return 6 * n_matmul + 6 * m.layers * m.hidden * seq


# PERFORMANCE.md §8 / §11 "Budget": tok/s/GPU, FA3 full-recompute bound and measured class.
TOKS_PER_GPU = {1 << 20: (454, 317), 1 << 21: (231, 160), 1 << 22: (117, 80)}

RECIPES = (
    Layout("cpt-1m", 1 << 20, tp=8, cp=16, dp=2, recompute="full", global_batch=2, steps=480),
    Layout("cpt-2m", 1 << 21, tp=8, cp=8, dp=4, recompute="full", global_batch=4, steps=140),
    Layout("cpt-4m", 1 << 22, tp=8, cp=16, dp=2, recompute="full", global_batch=2, steps=150),
    Layout("sft-8k", 8192, tp=2, cp=1, dp=128, recompute="none", global_batch=128, steps=100, loss_chunk_tokens=8192),
)
def print_breakdown(m: Model, layouts) -> None:
    print(f"Llama-3.1-8B: total params {m.total_params:,}; per-token-per-layer saved bytes (TP=1): "
          f"none {saved_bytes_per_token_layer(m, 'none', 1, False):,.0f}, "
          f"selective {saved_bytes_per_token_layer(m, 'selective', 1, False):,.0f}, "
          f"full {saved_bytes_per_token_layer(m, 'full', 1, False):,.0f}")
    for lay in layouts:
        parts = breakdown(m, lay)
        total = sum(parts.values()) / GB
        print(f"\n{lay.name}: seq {lay.seq:,}  TP{lay.tp} x CP{lay.cp} x PP{lay.pp} x DP{lay.dp} = {lay.gpus} GPUs "
              f"({lay.gpus_per_replica}/replica), SP={lay.sequence_parallel}, recompute={lay.recompute}, "
              f"cp_comm={lay.cp_comm}, {lay.seq // lay.cp:,} tokens/GPU")
        for k, v in parts.items():
            print(f"  {k:<28} {v / GB:8.2f} GB")
        print(f"  {'total':<28} {total:8.2f} GB  ({'fits' if total <= USABLE_GB else 'DOES NOT FIT'} in {USABLE_GB:.0f} of 80)")


def print_time(m: Model) -> None:
    print("\nTime per recipe [derived: tokens / (tok/s/GPU x GPUs)]; FA3 full-recompute bound .. measured class")
    for lay in RECIPES:
        if lay.seq not in TOKS_PER_GPU:
            continue
        tokens = lay.steps * lay.global_batch * lay.seq
        fast, slow = TOKS_PER_GPU[lay.seq]
        h = [tokens / (r * lay.gpus) / 3600 for r in (fast, slow)]
        print(f"  {lay.name}: {lay.steps} steps x GBS {lay.global_batch} x {lay.seq:,} = {tokens / 1e9:.3f}B tokens, "
              f"{tokens * flops_per_token(m, lay.seq):.2e} FLOPs; on {lay.gpus} GPUs {h[0]:.1f} .. {h[1]:.1f} h "
              f"({h[0] * 3600 / lay.steps:.0f} .. {h[1] * 3600 / lay.steps:.0f} s/step)")


def print_logits(m: Model) -> None:
    print("\nLogits without chunking [derived]: bf16 logits of the whole sequence = 2 x V B/token "
          f"= {2 * m.vocab:,} B/token")
    for seq, cp, tp in ((1 << 20, 16, 8), (1 << 22, 16, 8)):
        local = seq // cp
        print(f"  seq {seq:,}: whole sequence {seq * 2 * m.vocab / GB:,.0f} GB; per GPU (CP{cp}, TP{tp}) fp32 "
              f"logits+softmax+grad {local * m.vocab / tp * 12 / GB:.1f} GB vs a 16,384-token chunk "
              f"{16384 * m.vocab / tp * 12 / GB:.2f} GB")


def print_anchor(m: Model) -> None:
    """PERFORMANCE.md §11's own per-GPU formula (TP=1, all 18 B/param sharded over CP, no logits or
    CP buffers), to show the per-token numbers here reproduce its §9 table."""
    saved, transient = 8192 * m.layers, saved_bytes_per_token_layer(m, "none", 1, False) + 4 * m.hidden * 4
    print("\nAnchor, PERFORMANCE.md §9 formula (N_total x 18 B / CP + 5 GB + s/CP x (saved + transient)), full recompute:")
    for seq, cp, quoted in ((1 << 20, 16, 45), (1 << 20, 8, 84), (1 << 22, 64, 38)):
        need = m.total_params * 18 / cp + BUFFERS_GB * GB + seq / cp * (saved + transient)
        print(f"  seq {seq:,} CP{cp}: {need / GB:.1f} GB (PERFORMANCE.md §9 quotes {quoted} GB)")


def scan(m: Model) -> None:
    print("\nSmallest fitting replica per sequence length and recompute mode (SP on when TP>1, p2p ring, DP=1):")
    for seq in (1 << 17, 1 << 20, 1 << 21, 1 << 22):
        for rc in ("none", "selective", "full"):
            best = None
            for tp in (1, 2, 4, 8):
                for cp in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
                    lay = Layout("scan", seq, tp=tp, cp=cp, dp=1, recompute=rc, sequence_parallel=tp > 1)
                    total = sum(breakdown(m, lay).values()) / GB
                    if total <= USABLE_GB and (best is None or lay.gpus_per_replica < best[0].gpus_per_replica):
                        best = (lay, total)
                    if total <= USABLE_GB:
                        break
            if best:
                lay, total = best
                print(f"  seq {seq:>9,} {rc:<9}: TP{lay.tp} x CP{lay.cp} = {lay.gpus_per_replica:>3} GPUs, {total:5.1f} GB")
            else:
                print(f"  seq {seq:>9,} {rc:<9}: no layout up to TP8 x CP512 fits")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    m = Model()
    print_anchor(m)
    print_breakdown(m, RECIPES)
    print_logits(m)
    print_time(m)
    scan(m)


if __name__ == "__main__":
    main()
