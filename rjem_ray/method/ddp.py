"""DistributedDataParallel for the training step's loss module, with optional gradient compression.

``wrap_ddp(module, device, grad_compression)`` is the ``wrap`` a multi-worker :class:`~rjem_ray.method.learner.Learner`
gets (the Ray Train worker, the benchmarks and the gloo tests alike). DDP all-reduces gradients in buckets
(25 MB by default) from autograd hooks, so a bucket is sent as soon as the backward has produced all of its
gradients and the communication overlaps the rest of the backward; only the last bucket waits after it.

``grad_compression``:

* ``none``: buckets all-reduced in fp32 (4 bytes per parameter);
* ``bf16``: :func:`bf16_allreduce_hook` casts each bucket to bfloat16, divides by the world size, all-reduces
  and casts the sum back into the fp32 bucket: half the bytes on the wire; each averaged gradient carries
  bf16's 8-bit mantissa (relative error about 2⁻⁸ per element); weights and optimiser state stay fp32.
  (torch's own ``default_hooks.bf16_compress_hook`` does the same but refuses anything but NCCL/XCCL, so
  the hook here serves gloo too: one code path on CPU and GPU; DDP checks hooks by that name, hence ours differs.)

No Ray here: ``torch.distributed`` must already be initialised (Ray Train's worker group does it, or
``init_process_group`` in a test).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

GRAD_COMPRESSIONS = ("none", "bf16")


def bf16_allreduce_hook(process_group, bucket):
    """DDP communication hook: the mean of the ranks' gradient bucket, all-reduced in bfloat16.

    ``g ← (Σ_r bf16(g_r / W))`` in fp32 storage, ``W`` the world size; returns a future of the bucket.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None, grad_compression: str = "none") -> nn.Module:
    """``module`` inside ``DistributedDataParallel`` (on ``device``'s GPU when it is CUDA), with the
    compression hook of ``grad_compression`` registered."""
    if grad_compression not in GRAD_COMPRESSIONS:
        raise ValueError(f"grad_compression {grad_compression!r} is not allowed; choose one of "
                         f"{', '.join(GRAD_COMPRESSIONS)}")
    device = torch.device(device) if device is not None else None
    ids = [device] if device is not None and device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=ids)
    if grad_compression == "bf16":
        ddp.register_comm_hook(None, bf16_allreduce_hook)
    return ddp


class _CompiledOrEager:
    """``torch.compile(module)``, falling back to ``module`` (one warning) if compilation fails at a call."""

    def __init__(self, module):
        self.module = module
        self._fn = torch.compile(module)

    def __call__(self, *args, **kwargs):
        if self._fn is self.module:
            return self.module(*args, **kwargs)
        try:
            return self._fn(*args, **kwargs)
        except Exception as exc:  # compilation happens at the first call (and at recompiles)
            warnings.warn(f"[rjem] torch.compile of the DDP loss module failed ({type(exc).__name__}); running eager",
                          RuntimeWarning, stacklevel=2)
            self._fn = self.module
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def compiled_or_eager(module):
    """The DDP module compiled as a whole (its graph split at bucket boundaries by dynamo's DDPOptimizer,
    so all-reduce overlaps the backward), or eager where compilation fails."""
    return _CompiledOrEager(module)


__all__ = ["GRAD_COMPRESSIONS", "bf16_allreduce_hook", "compiled_or_eager", "wrap_ddp"]
