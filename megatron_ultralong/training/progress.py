"""What a week-long job prints: the start banner and one line per logged step.

The trainer hands `StepProgress.metrics` its raw step facts (loss, lr, grad norm, seconds); this
module adds the derived ones -- throughput (global and per GPU, named as such), model TFLOP/s and
MFU (training/metrics.py counts the FLOPs), memory (allocated / reserved / peak, % of the device),
ETA -- and formats them. The same dict goes to every metric sink (training/sinks.py), so the step
line, the JSONL file, TensorBoard and W&B always agree.
"""
from __future__ import annotations

import collections
import datetime as _dt
import resource
from typing import Optional

import torch

GIB = 2**30
ETA_WINDOW = 20
"""ETA uses the mean time of the last this-many steps (the first step, with its warm-up, drops out)."""


def device_memory_total(device: torch.device) -> float:
    """Bytes of memory on `device` (host RAM for CPU runs; NaN when unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB allocated / reserved / peak on this rank's device and the peak as % of the device.

    CUDA: the caching allocator's counters (peak = max_memory_allocated since start). CPU: the
    process's resident set (current = reserved = allocated) and its peak RSS."""
    total = device_memory_total(device)
    if device.type == "cuda":
        alloc = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
        try:
            with open("/proc/self/statm", encoding="utf-8") as f:
                alloc = int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            alloc = peak
        reserved = alloc
    return {
        "mem_allocated_gib": alloc / GIB,
        "mem_reserved_gib": reserved / GIB,
        "mem_peak_gib": peak / GIB,
        "mem_device_gib": total / GIB,
        "mem_peak_pct": 100.0 * peak / total if total == total and total > 0 else float("nan"),
    }


class StepProgress:
    """Derived per-step metrics and the ETA of one run."""

    def __init__(self, total_steps: int, tokens_per_step: int, world_size: int, flops_per_token: float,
                 peak_tflops: Optional[float], device: torch.device):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.device = device
        self._recent: collections.deque[float] = collections.deque(maxlen=ETA_WINDOW)
        self._steps_seen = 0

    def eta_seconds(self, step: int) -> float:
        if not self._recent:
            return float("nan")
        times = list(self._recent)
        if len(times) > 1 and self._steps_seen <= ETA_WINDOW:
            times = times[1:]  # drop the first step of this process (compilation, allocator warm-up)
        return sum(times) / len(times) * max(0, self.total_steps - step)

    def metrics(self, step: int, seconds: float, **facts) -> dict:
        """`facts`: the trainer's own (loss, loss_tokens, lr, grad_norm, applied). Returns every
        scalar of the step; throughput keys say their scope (global vs per GPU)."""
        self._recent.append(seconds)
        self._steps_seen += 1
        tok_s = self.tokens_per_step / seconds
        tflops = self.flops_per_token * tok_s / self.world_size / 1e12
        out = {"step": step, "total_steps": self.total_steps,
               "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), **facts,
               "seconds": seconds,
               "tokens_per_s": tok_s,  # global: all GPUs together
               "tokens_per_s_per_gpu": tok_s / self.world_size,
               "tflops_per_device": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        out.update(memory_stats(self.device))
        out["memory_gb"] = out["mem_peak_gib"]  # the older key, kept for readers of earlier logs
        out["eta_s"] = self.eta_seconds(step)
        return out


def format_duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def format_step_line(m: dict) -> str:
    """One line per logged step, fixed order, units spelled out."""
    width = len(str(m["total_steps"]))
    parts = [
        f"step {m['step']:>{width}}/{m['total_steps']}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.3e}",
        f"grad norm {m['grad_norm']:.3f}" + ("" if m.get("applied", True) else " (skipped)"),
        f"{m['seconds']:.2f} s/step",
        f"{m['tokens_per_s']:,.0f} tok/s global, {m['tokens_per_s_per_gpu']:,.0f} tok/s/GPU",
        f"{m['tflops_per_device']:.1f} TFLOP/s/GPU" + (f" MFU {m['mfu']:.1%}" if "mfu" in m else ""),
        f"mem {m['mem_allocated_gib']:.1f}/{m['mem_reserved_gib']:.1f}/{m['mem_peak_gib']:.1f} GiB "
        f"alloc/reserved/peak ({m['mem_peak_pct']:.0f}% of {m['mem_device_gib']:.0f})",
        f"ETA {format_duration(m['eta_s'])}",
    ]
    return "[train] " + " | ".join(parts)


def format_banner(cfg, model_cfg, world_size: int, dp: int, num_micro: int, device: torch.device,
                  init_source: str, resume: str) -> str:
    """The start banner: layout, data, RoPE, starting weights and resume point (multi-line).

    cfg: TrainConfig; model_cfg: the resolved LlamaConfig (YaRN applied)."""
    p, d, t, r = cfg.parallel, cfg.data, cfg.train, model_cfg.rope
    tokens_step = t.global_batch_size * d.seq_length
    rope = f"{r.rope_type}, theta {r.theta:g}"
    if r.factor is not None:
        rope += f", factor {r.factor:g}"
    if r.original_max_position_embeddings is not None:
        rope += f", original context {r.original_max_position_embeddings:,}"
    if r.rope_type == "yarn":
        rope += f", beta_fast {r.beta_fast:g}, beta_slow {r.beta_slow:g}"
    lines = [
        f"[train] layout: world {world_size} = TP{p.tensor_parallel} x PP{p.pipeline_parallel} x "
        f"CP{p.context_parallel} x DP{dp} on {device.type} (SP {'on' if p.sequence_parallel else 'off'}, "
        f"CP comm {p.cp_comm_type})",
        f"[train] batch: {t.global_batch_size} x {d.seq_length:,} tokens = {tokens_step:,} tokens/step "
        f"(micro {t.micro_batch_size}, {num_micro} accumulation step(s)); {t.steps} steps = "
        f"{t.steps * tokens_step / 1e9:.3f}B tokens; {d.seq_length // p.context_parallel:,} tokens/GPU",
        f"[train] data: {d.kind} {', '.join(d.paths)}"
        + (f" (weights {list(d.weights)})" if d.weights else "")
        + f"; document mask {'on' if d.document_mask else 'off'}, position reset "
        f"{'on' if d.reset_position_ids else 'off'}",
        f"[train] model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"{model_cfg.num_attention_heads}/{model_cfg.num_kv_heads} heads, vocab {model_cfg.vocab_size:,}, "
        f"{cfg.model.params_dtype}, recompute {cfg.model.recompute}; weights from {init_source}",
        f"[train] rope: {rope}; max positions {model_cfg.max_position_embeddings:,}",
        f"[train] {resume}",
    ]
    return "\n".join(lines)
