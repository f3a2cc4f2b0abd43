"""What changes with the optimiser step: the learning-rate factor and the training attack's ε (and step size).

``step`` counts reference steps (``scaling.py``: images seen / ``train.batch_size``), the same count the
checkpoint holds, so a resumed or resized run continues each schedule where it was.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["lr_multiplier", "attack_eps", "attack_step_size"]


def lr_multiplier(step: int, cfg: Config) -> float:
    """Learning-rate factor at optimiser step ``step``: linear warm-up, then the configured schedule."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if o.schedule == "step":
        return o.gamma ** sum(step >= m * total for m in o.milestones)
    return 1.0


def attack_eps(step: int, cfg: Config) -> float:
    """Training ε at ``step``: linear warm-up from 0 over ``attack.eps_warmup_steps``, [-1, 1] units."""
    w = cfg.attack.eps_warmup_steps
    return cfg.attack.eps if not w else cfg.attack.eps * min(1.0, (step + 1) / w)


def attack_step_size(eps: float, cfg: Config) -> float:
    """PGD's step size at the warmed-up ``eps``: ``attack.step_size · eps / attack.eps`` (the configured
    ratio of step to radius kept during the warm-up; 0 when ``attack.eps`` is 0), [-1, 1] units."""
    return cfg.attack.step_size * eps / cfg.attack.eps if cfg.attack.eps else 0.0
