"""The process layout as configuration: TP x PP x CP x DP sizes and the CP algorithm.

Kept apart from runtime.py (which imports torch and megatron-core) so that parsing and checking a
training config -- `mu-train --help`, `--print-config`, `--dry-run`, config errors -- needs neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

CpCommType = Literal["p2p", "all_gather", "a2a"]
"""Context-parallel attention algorithms: "p2p" (ring), "all_gather" (all-gather KV) or "a2a"
(Ulysses all-to-all). The one list: the attention table, the eval CLI and the configs derive from it."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is split. World size = TP x PP x CP x DP; DP is what remains."""

    tensor_parallel: int = 1
    """Tensor-parallel size: attention heads and MLP columns split across this many ranks."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size: contiguous layer ranges per stage."""

    context_parallel: int = 1
    """Context-parallel size: each sequence is split into 2*CP zigzag chunks across these ranks."""

    cp_comm_type: CpCommType = "p2p"
    """CP attention algorithm: "p2p" (ring), "all_gather" or "a2a" (Ulysses)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP (norm/dropout activations split by TP)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.cp_comm_type not in get_args(CpCommType):
            raise ValueError(
                f"ParallelConfig.cp_comm_type={self.cp_comm_type!r}: expected one of {get_args(CpCommType)}"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("ParallelConfig.sequence_parallel=True needs tensor_parallel > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {self.tensor_parallel}*"
                f"{self.pipeline_parallel}*{self.context_parallel} = {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size
