"""The training loop: continued pretraining at 1M-4M tokens and short SFT, on Megatron-Core parts.

megatron-core's wheel for Python 3.11 has no `megatron.training`, and its pipeline schedules
allocate on CUDA, so the loop is the plugin's own, read top to bottom in `Trainer.__init__`
(set-up) and `Trainer.train_step` (one optimizer step). It is the same code on CPU (gloo) and GPU
(NCCL); only the optimizer behind `TrainOptimizer` differs (training/optimizer.py).

Loss: each rank backpropagates the sum of its tokens' cross entropy (its DP samples, its zigzag CP
share) divided by the step's loss-token count N, all-reduced over DP x CP once per step
(training/loss.py derives the formula); gradients are SUMMED over DP x CP (as megatron-core's DDP
does with calculate_per_token_loss). That is the gradient of the global per-token mean over every
micro-batch of the step; a rank or micro-batch with no loss tokens contributes zero, never 0/0.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_ultralong.config_io import to_dict
from megatron_ultralong.parallel.cp_layout import shard_batch
from megatron_ultralong.dtypes import parse_dtype
from megatron_ultralong.model import build_model
from megatron_ultralong.model.activation_offload import ActivationOffload, host_pool_for
from megatron_ultralong.parallel.runtime import init_runtime
from megatron_ultralong.checkpoint.train_state import resume, save_dir_conflict, save_train_checkpoint
from megatron_ultralong.training.config import TrainConfig
from megatron_ultralong.data.samples.pretrain import (
    BatchSchedule,
    build_sample_dataset,
    cu_seqlens_from_document_ids,
    document_boundary,
)
from megatron_ultralong.training import startup_checks
from megatron_ultralong.training.guards import NonFiniteGuard, StopConditions, trim_metrics_log
from megatron_ultralong.training.loss import reduce_loss_over_dp_cp
from megatron_ultralong.training.memory_fit import estimate_memory_per_device, format_estimate
from megatron_ultralong.training.metrics import training_flops_per_token
from megatron_ultralong.training.optimizer import build_data_parallel, build_optimizer, build_scheduler, finalize_grads
from megatron_ultralong.training.model_source import (  # noqa: F401
    initial_megatron_checkpoint,
    recompute_overrides,
    resolve_model_config,
)
from megatron_ultralong.training.resume_checks import apply_optimizer_override, check_same_model, report_schedule
from megatron_ultralong.training.progress import StepProgress, format_banner, format_step_line
from megatron_ultralong.training.sinks import MetricSinks, check_sinks

logger = logging.getLogger(__name__)


class Trainer:
    """Set-up in the order it happens; `train()` runs the steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        problems = check_sinks(cfg.train)  # a missing optional package fails now, not after set-up
        if problems:
            raise ValueError(problems[0])
        # 1. Processes and parallel groups; checks that the layout fits the world.
        self.rt = init_runtime(cfg.parallel, seed=cfg.train.seed, device=cfg.train.device)
        self.dp = cfg.check_world(self.rt.world_size)
        if cfg.parallel.pipeline_parallel > 1:
            raise ValueError(
                "parallel.pipeline_parallel > 1: the training loop runs a single pipeline stage "
                "(the UltraLong plan is TP x CP x DP; conversion and evaluation do support PP)"
            )
        self.num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        pg = self.rt.pg_collection
        self.cp_size, self.cp_rank = pg.cp.size(), pg.cp.rank()
        self.is_logger = self.rt.rank == 0
        t = cfg.train
        startup_checks.on_rank0(lambda: startup_checks.output_problem(t.log_file, t.save, t.tensorboard_dir))
        self.guard = NonFiniteGuard(t.max_bad_steps, self.rt.device)
        self.stops = StopConditions(t.exit_signals, t.exit_duration_minutes, self.rt.device)
        self.stop_reason = None

        # 2. The architecture (context extension included) and its memory estimate.
        self.model_cfg = resolve_model_config(cfg)
        if cfg.data.seq_length > self.model_cfg.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={cfg.data.seq_length} exceeds the model's max_position_embeddings="
                f"{self.model_cfg.max_position_embeddings}; set model.yarn.target to extend it"
            )
        estimate = estimate_memory_per_device(self.model_cfg, cfg, self.dp)
        self._log_text(format_estimate(estimate, self.rt.device))

        # 3. The model stage, its initial weights, gradient reduction over DP x CP.
        dtype = parse_dtype(cfg.model.params_dtype, "model.params_dtype")
        model = build_model(
            self.model_cfg, self.rt, params_dtype=dtype,
            use_transformer_engine=cfg.model.use_transformer_engine,
            loss_chunk_tokens=cfg.train.loss_chunk_tokens,
            micro_batch_size=cfg.train.micro_batch_size,  # 1: TE's fused RoPE where it exists
            mlp_tiles=cfg.model.mlp_tiles,
            calculate_per_token_loss=True,
            **recompute_overrides(cfg),
        )
        # Saved activations of the first layers wait in host memory (model/activation_offload.py).
        self.offload = (ActivationOffload(model.decoder, cfg.model.activation_offload, host_pool_for(self.rt.device))
                        if cfg.model.activation_offload else None)
        self._load_initial_weights(model)
        self.model = model
        self.ddp = build_data_parallel(model, self.rt)

        # 4. Optimizer and LR schedule.
        self.optimizer = build_optimizer(self.ddp, cfg, self.rt)
        self.scheduler = build_scheduler(self.optimizer, cfg)

        # 5. Data: enough samples for every step, in a resumable order.
        num_samples = cfg.train.steps * cfg.train.global_batch_size
        self._check_data()
        self.dataset = build_sample_dataset(cfg.data, num_samples, cfg.train.seed, self.model_cfg.vocab_size)
        if cfg.data.kind == "sft":  # every rank holds the same tokenized rows: same verdict everywhere
            problem = startup_checks.sft_token_id_problem(self.dataset, cfg.data.paths, cfg.data.pad_token_id,
                                                          self.model_cfg.vocab_size)
            if problem:
                raise ValueError(problem)
        if self.is_logger:
            startup_checks.warn_if_schedule_exceeds_data(cfg, num_samples, len(self.dataset))
        self.schedule = BatchSchedule(self.dataset, cfg.train.micro_batch_size, self.dp, pg.dp.rank())

        # 6. Resume (train.load, default train.save): model, optimizer, scheduler, RNG, data position.
        resume = self._resume()
        self.flops_per_token = training_flops_per_token(self.model_cfg, cfg.data.seq_length)
        init = cfg.model.hf_checkpoint or cfg.model.megatron_checkpoint or "random init (seed {})".format(cfg.train.seed)
        self._log_text(format_banner(cfg, self.model_cfg, self.rt.world_size, self.dp, self.num_micro,
                                     self.rt.device, init, resume))
        self.progress = StepProgress(cfg.train.steps, cfg.train.global_batch_size * cfg.data.seq_length,
                                     self.rt.world_size, self.flops_per_token, cfg.train.peak_tflops, self.rt.device)
        self.sinks = MetricSinks(cfg.train, to_dict(cfg), self.is_logger)

    def _load_initial_weights(self, model) -> None:
        """Weights from an HF or Megatron checkpoint; its tokenizer files ride along to our saves."""
        m = self.cfg.model
        self.side_files: list = []
        if m.hf_checkpoint:
            from megatron_ultralong.convert.hf_io import HFCheckpointReader
            from megatron_ultralong.convert.hf_to_mcore import load_hf_into_model

            reader = HFCheckpointReader(m.hf_checkpoint)
            load_hf_into_model(model, reader, self.model_cfg, self.rt, progress=False)
            self.side_files = list(reader.side_files())
        elif m.megatron_checkpoint:
            from megatron_ultralong.checkpoint.torch_dist import SIDE_DIR, load_megatron_checkpoint

            model_dir = initial_megatron_checkpoint(self.cfg)  # save dir, iter_* or model/ (checkpoint/paths.py)
            load_megatron_checkpoint(model, model_dir, allow_unverified=m.allow_unverified)
            side = os.path.join(model_dir, SIDE_DIR)
            if os.path.isdir(side):
                self.side_files = sorted(os.path.join(side, f) for f in os.listdir(side))

    def _check_data(self) -> None:
        """Before megatron builds or reads its sample index: the data's ids fit the vocabulary, and
        the index cache was built from these files (training/startup_checks.py)."""
        data = self.cfg.data
        if data.kind != "pretrain":
            return
        startup_checks.on_rank0(lambda: startup_checks.missing_data_problem(data.paths))
        cache = startup_checks.index_cache_dir(data)
        startup_checks.on_rank0(lambda: startup_checks.stale_cache_problem(data.paths, cache))
        startup_checks.on_rank0(lambda: startup_checks.token_id_problem(data.paths, self.model_cfg.vocab_size, cache))
        # The dataset's own record of its tokenizer (PREFIX.dataset.json) against the run's tokenizers.
        tokenizers = [("data.tokenizer", data.tokenizer)] if data.tokenizer else []
        tokenizers += [("the starting checkpoint's tokenizer", str(f)) for f in self.side_files
                       if os.path.basename(str(f)) == "tokenizer.json"]
        startup_checks.on_rank0(lambda: startup_checks.dataset_tokenizer_problem(
            data.paths, self.model_cfg.vocab_size, tokenizers))
        startup_checks.on_rank0(lambda: document_boundary(data) and None)

    def _resume(self) -> str:
        """Load the newest checkpoint that verifies (checkpoint/train_state.py), or say loudly that
        there is none; then refuse a save directory that holds another run's checkpoints."""
        t = self.cfg.train
        self.step, self.consumed, resumed_from = 0, 0, None
        note = "no train.load or train.save: starting from step 0"
        if t.load_dir:
            fresh = self.scheduler.state_dict()  # this run's schedule, before a load replaces it

            def check(path, state):  # before the candidate is verified or loaded (train_state.resume)
                check_same_model(path, self.model_cfg, self.cfg)
                report_schedule(path, state, fresh, self.cfg)

            found = resume(t.load_dir, self.model, self.optimizer, self.scheduler, to_dict(self.cfg.parallel), check)
            if found is None:
                note = f"no checkpoint found in {t.load_dir}, starting from scratch"
                logger.warning(note)
            else:
                resumed_from, self.step, self.consumed = found
                if t.override_schedule:
                    apply_optimizer_override(self.optimizer, self.cfg)
                note = f"resumed from {resumed_from} at step {self.step} ({self.consumed} samples consumed)"
                logger.info(note)
                if self.is_logger:
                    trim_metrics_log(t.log_file, self.step)
        startup_checks.on_rank0(lambda: save_dir_conflict(t.save, resumed_from, t.overwrite))
        self.resumed_step = self.step
        return note

    def _log_text(self, text: str) -> None:
        if self.is_logger:
            logger.info(text)

    def _micro_batches(self) -> list[dict]:
        """This rank's micro-batches for the next step: CP-sharded, document boundaries attached."""
        out = []
        for batch in self.schedule.micro_batches(self.consumed, self.num_micro):
            cu = cu_seqlens_from_document_ids(batch["document_ids"]) if self.cfg.data.document_mask else None
            local = shard_batch(batch, self.cp_size, self.cp_rank)
            local = {k: v.to(self.rt.device) for k, v in local.items()}
            if cu is not None:
                cu = cu.to(self.rt.device)
                local["packed_seq_params"] = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
            out.append(local)
        return out

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size sequences; returns its metrics."""
        t0 = time.perf_counter()
        pg = self.rt.pg_collection
        batches = self._micro_batches()
        counts = torch.stack([b["loss_mask"].sum() for b in batches]).sum().double().reshape(1)
        dist.all_reduce(counts, group=pg.dp_cp)  # N: loss tokens of the whole step, all ranks
        num_tokens = counts.item()

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        step_loss = 0.0
        for b in batches:
            per_token = self.ddp(
                b["tokens"], b["position_ids"], None, labels=b["labels"],
                packed_seq_params=b.get("packed_seq_params"),
            )  # [mbs, s/cp]
            # This micro-batch's share of the step's global per-token mean (training/loss.py).
            share = reduce_loss_over_dp_cp(per_token, b["loss_mask"], pg.dp_cp, global_num_tokens=counts)
            share.loss.backward()
            step_loss += share.mean_loss.item()
        finalize_grads(self.ddp, self.rt)  # sums grads over DP x CP (+ SP norm grads over TP)
        applied, grad_norm = False, float("nan")
        loss_ok = self.guard.loss_is_finite(self.step + 1, step_loss)  # all ranks agree
        if num_tokens > 0 and loss_ok:  # no loss token anywhere, or a NaN loss: no update
            applied, grad_norm = self.optimizer.step()
        nonfinite = self.guard.record(self.step + 1, step_loss, grad_norm if num_tokens > 0 else 0.0, loss_ok)
        self.scheduler.step(increment=1)
        self.step += 1
        self.consumed += self.cfg.train.global_batch_size
        elapsed = time.perf_counter() - t0
        return self.progress.metrics(
            self.step, elapsed, loss=step_loss, loss_tokens=int(num_tokens),
            lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm, applied=applied, nonfinite=nonfinite,
        )

    def save(self) -> None:
        t = self.cfg.train
        save_train_checkpoint(
            t.save, self.step, self.model, self.optimizer, self.scheduler,
            self.consumed, to_dict(self.cfg), self.rt.is_cuda, self.side_files,
            keep_last=t.keep_last, keep_every=t.keep_every,
        )
        self._log_text(f"[train] saved {self.cfg.train.save}/iter_{self.step:07d}")

    def train(self) -> list[dict]:
        """Run until train.steps, or until a signal / the time limit (then `stop_reason` is set:
        the current step is saved first); returns the metrics of every step run here. Raises
        NonFiniteError after train.max_bad_steps bad steps in a row, without saving them."""
        t = self.cfg.train
        history = []
        self.ddp.train()
        saved_at = None
        pending = False  # a save fell due while the step was non-finite: save at the next good one
        if self.step >= t.steps:
            logger.info("step %d >= train.steps=%d: nothing to train", self.step, t.steps)
        try:
            while self.step < t.steps:
                metrics = self.train_step()
                history.append(metrics)
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self._report(metrics)
                self.stop_reason = self.stops.check()  # collective: every rank stops at the same step
                pending = pending or self.step == t.steps or bool(t.save_interval and self.step % t.save_interval == 0)
                if t.save and (pending or self.stop_reason) and self.guard.consecutive == 0:
                    self.save()
                    saved_at, pending = self.step, False
                if self.stop_reason:
                    logger.warning("%s: stopping after step %d (%s)", self.stop_reason, self.step,
                                   f"saved {t.save}/iter_{self.step:07d}" if saved_at == self.step else "NOT saved")
                    break
        finally:
            self.stops.restore()
            self.sinks.close()
        return history

    def _report(self, metrics: dict) -> None:
        if not self.is_logger:
            return
        logger.info(format_step_line(metrics))
        self.sinks.write(metrics)
