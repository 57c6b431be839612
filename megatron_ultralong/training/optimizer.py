"""Gradient sync and optimizer behind one small interface: the decision of how a CPU run steps.

megatron-core's DDP allocates its gradient buffers on `torch.cuda.current_device()`
(param_and_grad_buffer.py) and its optimizers create tensors with device='cuda' (about 25 places
under megatron/core/optimizer and megatron/core/distributed) and assert CUDA gradient types, so
neither runs on a CPU. The training loop talks to `build_data_parallel` / `finalize_grads` /
`TrainOptimizer` only (runtime.py, accommodation 7):

- GPU: megatron-core's `DistributedDataParallel` (fp32 grad buffers, bucketed reduce over DP x CP)
  and `get_megatron_optimizer` (distributed optimizer: fp32 main weights and Adam states sharded
  over DP x CP; clipping inside), state saved through `dist_checkpointing`, resharded on load.
- CPU: `TorchDataParallel` (one flat all-reduce of the gradients over DP x CP) and torch AdamW;
  the global grad norm is TP-aware (replicated parameters counted once) and clipping follows
  megatron's rule. State is saved per rank (resume at the same parallel layout).

Both: decoupled weight decay, none on norms and biases (1-D parameters), megatron-core's
`OptimizerParamScheduler` for warmup and decay. docs/training.md records this choice.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import nn

from megatron_ultralong.training.config import OptimSection, TrainConfig


class TrainOptimizer(Protocol):
    """What the training loop calls."""

    param_groups: list

    def zero_grad(self) -> None: ...

    def step(self) -> tuple[bool, float]:
        """Clip and apply the gradients; returns (applied, global grad norm before clipping)."""

    def save(self, directory: str, model_sharded_state_dict: dict) -> None: ...

    def load(self, directory: str, model_sharded_state_dict: dict) -> None: ...


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() == 1 else decay).append(p)
    # wd_mult: megatron's scheduler rewrites every group's weight_decay each step as its current
    # value x the group's `wd_mult` (default 1), as megatron's own param groups expect; without 0
    # here the norms would decay from the first step on.
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class TorchDataParallel(nn.Module):
    """The CPU stand-in for megatron-core's DDP: same calls, gradients SUMMED over DP x CP.

    Summing (not averaging) matches megatron's DDP with calculate_per_token_loss=True: each rank's
    loss is already divided by the step's global loss-token count (training/loss.py).
    """

    def __init__(self, module: nn.Module, dp_cp_group: Optional[dist.ProcessGroup]):
        super().__init__()
        self.module = module
        self.group = dp_cp_group

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def finish_grad_sync(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this stage did not use still takes part in the sum
                p.grad = torch.zeros_like(p)
        if self.group is None or dist.get_world_size(self.group) == 1:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def build_data_parallel(model: nn.Module, runtime) -> nn.Module:
    """megatron-core DDP on GPU, `TorchDataParallel` on CPU; both reduce over DP x CP."""
    if not runtime.is_cuda:
        return TorchDataParallel(model, runtime.pg_collection.dp_cp)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
        ),
        module=model,
        pg_collection=runtime.pg_collection,
    )


def finalize_grads(ddp: nn.Module, runtime) -> None:
    """Sum gradients over DP x CP (and, on GPU, the sequence-parallel norm grads over TP)."""
    if isinstance(ddp, TorchDataParallel):
        ddp.finish_grad_sync()
        return
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    finalize_model_grads([ddp], pg_collection=runtime.pg_collection)


class CPUAdamW:
    """torch AdamW stepping from the gradients `TorchDataParallel` summed (CPU runs)."""

    def __init__(self, model: nn.Module, cfg: OptimSection, model_parallel_group: Optional[dist.ProcessGroup]):
        self.model = model
        self.clip_grad = cfg.clip_grad
        self.model_parallel_group = model_parallel_group
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.torch_optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )

    @property
    def param_groups(self) -> list:
        # A property, not an attribute: torch's load_state_dict replaces the list, and the LR
        # scheduler must write into the one the optimizer reads.
        return self.torch_optimizer.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def grad_norm(self) -> float:
        """L2 norm of the full model's gradient: TP-sharded parameters summed over TP, parameters
        replicated over TP counted on TP rank 0 only, summed over PP stages."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if param_is_not_tensor_parallel_duplicate(p):
                total += p.grad.double().pow(2).sum()
        if self.model_parallel_group is not None:
            dist.all_reduce(total, group=self.model_parallel_group)
        return math.sqrt(total.item())

    def step(self) -> tuple[bool, float]:
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm
        scale = 1.0
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)  # megatron's clip_grad_by_total_norm_fp32 rule
        if scale != 1.0:
            for p in self.params:
                p.grad.mul_(scale)
        self.torch_optimizer.step()
        return True, norm

    def save(self, directory: str, model_sharded_state_dict: dict) -> None:
        torch.save(self.torch_optimizer.state_dict(), os.path.join(directory, f"optim_rank{dist.get_rank():05d}.pt"))

    def load(self, directory: str, model_sharded_state_dict: dict) -> None:
        path = os.path.join(directory, f"optim_rank{dist.get_rank():05d}.pt")
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} missing: CPU optimizer state resumes only at the parallel layout that saved it"
            )
        self.torch_optimizer.load_state_dict(torch.load(path, weights_only=True))


def optimizer_offload_fields(cfg: OptimSection) -> dict:
    """megatron-core `OptimizerConfig` fields for `optim.cpu_offload_fraction` (empty when 0).

    megatron-core builds a `HybridDeviceOptimizer` (optimizer/cpu_offloading/hybrid_optimizer.py)
    that keeps `optimizer_offload_fraction` of the distributed optimizer's shard on the host and
    steps it there; Megatron-LM requires its precision-aware optimizer path with it (the hybrid
    optimizer keeps the fp32 master copies itself, `param_update_in_fp32`)."""
    if not cfg.cpu_offload_fraction:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=cfg.cpu_offload_fraction,
                use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True)


class MegatronOptimizer:
    """megatron-core's (distributed) optimizer behind the same interface (GPU runs)."""

    def __init__(self, ddp_model: nn.Module, cfg: OptimSection, bf16: bool, pg_collection):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=True,
            **optimizer_offload_fields(cfg),
        )
        # With explicit process groups megatron-core 0.16.1 refuses its default gloo groups
        # ("Gloo process groups are not supported when pg_collection is provided",
        # ProcessGroupCollection.setup_process_groups_for_optimizer); they only serve CPU-side
        # optimizer-state checkpoint gathers, which torch_dist checkpoints do not use.
        self.inner = get_megatron_optimizer(
            config, [ddp_model], use_gloo_process_groups=False, pg_collection=pg_collection
        )

    @property
    def param_groups(self) -> list:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def step(self) -> tuple[bool, float]:
        ok, norm, _ = self.inner.step()
        return bool(ok), float(norm if norm is not None else float("nan"))

    def save(self, directory: str, model_sharded_state_dict: dict) -> None:
        from megatron.core import dist_checkpointing

        state = self.inner.sharded_state_dict(model_sharded_state_dict)
        dist_checkpointing.save({"optimizer": state}, directory)

    def load(self, directory: str, model_sharded_state_dict: dict) -> None:
        from megatron_ultralong.checkpoint.vetted_load import vetted_load

        template = {"optimizer": self.inner.sharded_state_dict(model_sharded_state_dict, is_loading=True)}
        state = vetted_load(template, directory)  # the vetted read path (no pickle beyond weights)
        self.inner.load_state_dict(state["optimizer"])


def build_optimizer(ddp_model: nn.Module, cfg: TrainConfig, runtime) -> TrainOptimizer:
    """megatron-core's distributed optimizer on GPU (it steps from DDP's fp32 main_grad buffers); on CPU,
    torch AdamW stepping from each parameter's `.grad`, which `TorchDataParallel` summed over DP x CP."""
    if runtime.is_cuda:
        return MegatronOptimizer(ddp_model, cfg.optim, cfg.model.params_dtype == "bfloat16", runtime.pg_collection)
    mp_group = runtime.pg_collection.mp if hasattr(runtime.pg_collection, "mp") else None
    return CPUAdamW(ddp_model, cfg.optim, mp_group)


def build_scheduler(optimizer: TrainOptimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """megatron-core's scheduler: linear warmup to lr, then `decay_style` to min_lr at train.steps.
    On resume its `load_state_dict` keeps the checkpoint's values, or with train.override_schedule
    these (megatron's override_opt_param_scheduler; training/resume_checks.py reports either way)."""
    o = cfg.optim
    override = cfg.train.override_schedule
    decay_steps = max(1, cfg.train.steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override,
        override_opt_param_scheduler=override,
    )
