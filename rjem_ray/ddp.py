"""DistributedDataParallel for the training step's loss module, with optional gradient compression.

``wrap_ddp(module, device, grad_compression)`` is the ``wrap`` a multi-worker :class:`~rjem_ray.training.Learner`
gets (the Ray Train worker, the benchmarks and the gloo tests alike). DDP all-reduces gradients in buckets
(25 MB by default) from autograd hooks, so a bucket is sent as soon as the backward has produced all of its
gradients and the communication overlaps the rest of the backward; only the last bucket waits after it.

``grad_compression``:

* ``none``: buckets all-reduced in fp32 (4 bytes per parameter);
* ``bf16``: torch's ``bf16_compress_hook`` casts each bucket to bfloat16 before the all-reduce, divides by
  the world size and casts back: half the bytes on the wire; each averaged gradient carries bf16's 8-bit
  mantissa (relative error ≤ 2⁻⁸ per element), weights and optimiser state stay fp32.

No Ray here: ``torch.distributed`` must already be initialised (Ray Train's worker group does it, or
``init_process_group`` in a test).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py imports GRAD_COMPRESSIONS: keep the config import free of torch
    import torch
    from torch import nn

GRAD_COMPRESSIONS = ("none", "bf16")


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None, grad_compression: str = "none") -> nn.Module:
    """``module`` inside ``DistributedDataParallel`` (on ``device``'s GPU when it is CUDA), with the
    compression hook of ``grad_compression`` registered."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if grad_compression not in GRAD_COMPRESSIONS:
        raise ValueError(f"grad_compression {grad_compression!r} is not allowed; choose one of "
                         f"{', '.join(GRAD_COMPRESSIONS)}")
    device = torch.device(device) if device is not None else None
    ids = [device] if device is not None and device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=ids)
    if grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


__all__ = ["GRAD_COMPRESSIONS", "wrap_ddp"]
