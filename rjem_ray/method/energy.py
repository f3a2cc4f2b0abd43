"""Energies of a classifier read as an energy-based model (JEM).

For logits ``f(x)`` of shape ``[B, K]``:

* marginal energy  ``E(x)    = -logsumexp_y f(x)[y]``  (``p(x) ∝ exp(-E(x))``)
* joint energy     ``E(x, y) = -f(x)[y]``              (``p(x, y) ∝ exp(-E(x, y))``)

Energies are in nats (unitless log-densities up to the unknown log-partition constant).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """``E(x) = -logsumexp_y f(x)[y]`` per sample, shape ``[B]``."""
    return -torch.logsumexp(logits, dim=1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``E(x, y) = -f(x)[y]`` per sample, shape ``[B]``."""
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


def energy_of(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Joint energy when ``y`` is given, marginal energy otherwise."""
    return marginal_energy(logits) if y is None else joint_energy(logits, y)


def energy_fn(model: nn.Module, y: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> E(x)`` (or ``E(x, y)``) for a model that maps NCHW images in [-1, 1] to logits."""
    return lambda x: energy_of(model(x), y)
