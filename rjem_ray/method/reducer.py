"""Scalar reductions across the training workers' DDP ranks: the metrics' mean and the divergence check's maximum.

Every rank calls each reduction in the same order (they are collectives, ``torch.distributed.all_reduce``);
on one process they are the identity and ``torch.distributed`` is never touched. The values are Python
floats, reduced in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Reducer"]


@dataclass
class Reducer:
    """Scalar reductions across DDP ranks; the identity on one process.

    Under nccl the scalars travel on ``device`` (this rank's GPU; None: the current CUDA device), never
    on whatever ``.cuda()`` would pick.
    """

    world_size: int = 1
    device: torch.device | None = None

    def _on_backend(self, t: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() != "nccl":
            return t
        device = self.device if self.device is not None and self.device.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
        return t.to(device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """``{k: (Σ_ranks values[k]) / world_size}`` (keys in sorted order on the wire: every rank the same)."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = self._on_backend(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.cpu().tolist())}

    def max(self, value: float) -> float:
        """``max_ranks value``."""
        if self.world_size == 1:
            return value
        t = self._on_backend(torch.tensor([value], dtype=torch.float64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
