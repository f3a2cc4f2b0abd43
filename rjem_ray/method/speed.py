"""The speed settings of the network's passes: autocast precision, memory format and compilation.

Every pass of a training step (PGD, the Langevin sampler, the loss) and of generation and evaluation
calls one module, :class:`FastNet`, around the classifier. What it changes and what it never changes:

* ``precision = bf16``: the forward pass runs under ``torch.autocast(dtype=bfloat16)`` — matrix
  multiplies and convolutions in bf16, reductions and normalisation statistics as autocast decides —
  and the logits come back as **fp32**. Weights, optimiser state, images, PGD iterates and Langevin
  iterates stay fp32: a bf16 pixel has 8 bits of mantissa, so a Langevin move of 0.01 on a pixel near 1
  would round away (the spacing of bf16 numbers in [0.5, 1) is 2⁻⁸ ≈ 0.0039 of the [-1, 1] range).
  Gradients with respect to the input are taken through autocast's casts and arrive in fp32. No loss
  scaling: bf16 has fp32's exponent range (loss scaling is for fp16, which is not offered).
* ``fp32``: the plain module.
* ``channels_last``: weights and inputs in NHWC memory layout (the layout tensor cores' convolution
  kernels read without a transpose); values are unchanged.
* ``compile``: the module's forward through ``torch.compile`` (the backward too, by AOTAutograd). If
  compilation fails (no compiler, an unsupported op), one warning line says so and the eager module runs.

``auto`` means on for CUDA, off for CPU for each of them: bf16 matmuls are emulated on many CPUs, NHWC
convolutions gain nothing there, and compilation costs minutes of a small CPU's time.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..core.errors import first_line

__all__ = ["PRECISIONS", "SWITCHES", "FastNet", "resolve_precision", "resolve_switch", "autocast_context"]

PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("auto", "true", "false")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not allowed; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def resolve_switch(name: str, value: str | bool, device: torch.device | str) -> bool:
    """An ``auto | true | false`` setting (YAML booleans accepted): ``auto`` is true on CUDA only."""
    value = {True: "true", False: "false"}.get(value, value)
    if value not in SWITCHES:
        raise ValueError(f"{name} {value!r} is not allowed; choose one of {', '.join(SWITCHES)}")
    return value == "true" or (value == "auto" and torch.device(device).type == "cuda")


def autocast_context(precision: str, device: torch.device | str):
    """``torch.autocast`` for a resolved ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = _DTYPES[resolve_precision(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class FastNet(nn.Module):
    """``x ↦ f(x)`` (logits ``[B, K]``, always fp32) of ``model`` with the speed settings applied.

    ``stem`` and ``head`` are the wrapped model's own (PYLD checks that the network splits that way);
    ``net`` is the wrapped module, whose ``state_dict`` is the checkpoint's.
    """

    def __init__(self, model: nn.Module, *, precision: str = "fp32", channels_last: str | bool = "false",
                 compile: str | bool = "false", device: torch.device | str | None = None):
        super().__init__()
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.net = model
        self.device_type = torch.device(device).type
        self.precision = resolve_precision(precision, device)
        self.channels_last = resolve_switch("channels_last", channels_last, device)
        self.compiled = resolve_switch("compile", compile, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the optimiser keeps the same parameters
        # Not a registered submodule: the compiled wrapper shares the model's parameters, and modules()
        # (which the BatchNorm views walk) must list each layer once.
        if self.compiled:
            # One model meets several BatchNorm modes, input-gradient and parameter-gradient passes and
            # batch sizes (generation, the fused batch): more graph variants than dynamo's default limit
            # of 8 per code object, beyond which it would silently run eager.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(getattr(dynamo, "recompile_limit", 8), 64)
        object.__setattr__(self, "_fn", torch.compile(model) if self.compiled else model)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is self.net:
            return self.net(x)
        try:
            return self._fn(x)
        except Exception as exc:  # compilation happens at the first call (and at recompiles)
            warnings.warn(f"[rjem] torch.compile failed ({type(exc).__name__}: {first_line(exc)[:200]}); running eager",
                          RuntimeWarning, stacklevel=3)
            object.__setattr__(self, "_fn", self.net)
            self.compiled = False
            return self.net(x)

    @property
    def stem(self):
        return self.net.stem

    @property
    def head(self):
        return self.net.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.precision, self.device_type):
            out = self._call(x)
        return out.float()
