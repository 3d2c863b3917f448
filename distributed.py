"""torchrun helpers: this process's place in a launch, and the few collectives a run needs.

Without torchrun every helper is the identity, so the training code has one path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class _GlobalBatch(torch.autograd.Function):
    """Every rank's B x ... rows, concatenated in rank order (equal B on every rank, as the
    sampler's padded shards give). Backward: this rank's rows get the sum over ranks of their
    gradients, so that after DDP averages the ranks' parameter gradients, a term of the global
    batch has the gradient it has in one process over the whole batch."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.rows = torch.distributed.get_rank(), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank: after training, each rank's
        running statistics saw its own batches last; evaluation and checkpoints use rank 0's."""
        if self.enabled:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def sync_batchnorm(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with every BatchNorm layer computing its training statistics over the
        global batch (torch.nn.SyncBatchNorm, CUDA only), as one process over the whole batch
        does; the same parameters and state_dict keys. Without torchrun, ``module`` itself."""
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module) if self.enabled else module

    def global_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of the whole batch across ranks (``_GlobalBatch``), for a loss term over the
        batch that a mean over ranks does not give (a squared batch mean); ``rows`` in one process."""
        return _GlobalBatch.apply(rows) if self.enabled else rows

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks."""
        if not self.enabled:
            return [float(v) for v in values]
        total = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        parts: list = [None] * self.world_size
        torch.distributed.all_gather_object(parts, obj)
        return parts

    def gather_rows(self, indices: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every rank's (indices, arrays) concatenated, on every rank, with rows repeated by a
        sampler's padding dropped (first occurrence kept) and sorted by index."""
        if self.enabled:
            parts = self.gather_objects((indices, *arrays))
            indices = np.concatenate([part[0] for part in parts])
            arrays = tuple(np.concatenate([part[i + 1] for part in parts]) for i in range(len(arrays)))
        unique, first = np.unique(indices, return_index=True)
        return (unique, *(array[first] for array in arrays))


def init_distributed() -> Distributed:
    """A torchrun launch (WORLD_SIZE > 1): join the process group, nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Distributed(torch.distributed.get_rank(), world_size, local_rank)
