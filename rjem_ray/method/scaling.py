"""How a run's batch, learning rate, replay buffer and schedule follow the number of workers.

Two rules (``trainer.scaling``):

* ``weak`` (default): ``train.batch_size`` is the batch of **one worker**; ``N`` workers step on a global
  batch of ``N · batch_size``. The learning rate is ``optim.lr`` (the rate for one worker's batch) times
  ``k(N)`` (``optim.lr_scaling``): ``linear`` ``k = N`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD":
  multiply SGD's rate by the batch factor, with a gradual warm-up), ``sqrt`` ``k = √N`` (the square-root rule
  that keeps the gradient noise scale of Adam-type updates, Hoffer et al. 2017; Malladi et al. 2022),
  ``none`` ``k = 1``; ``auto`` picks ``linear`` for SGD and ``sqrt`` for Adam. The replay buffer holds
  ``buffer.size`` slots **per worker** (``N · size`` in all), so every slot is leased as often per step as on
  one worker.
* ``strong``: ``train.batch_size`` is the global batch, split over the workers; learning rate and buffer
  are as configured (the buffer's ``size`` slots in all).

**Schedules count images.** Every step-valued key (``train.steps``, ``optim.warmup_steps``,
``optim.milestones`` as fractions of ``train.steps``, ``attack.eps_warmup_steps``, ``train.log_every``,
``train.checkpoint_every``, ``train.eval_every``) is in **reference steps** of ``train.batch_size`` images:
reference step ``s`` means ``s · batch_size`` training images seen. Under ``weak`` one optimiser step on
``N`` workers advances ``N`` reference steps, so a run sees the same number of images — and warms up,
decays, checkpoints and evaluates at the same image counts — whatever ``N`` is. Under ``strong`` an
optimiser step is one reference step. A cadence fires when the step counter crosses a multiple of it
(:func:`crossed`); the last optimiser step may overshoot ``train.steps`` by less than one global batch.

Pure: no Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALINGS = ("weak", "strong")
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
LR_RULE_FOR_OPTIMIZER = {"sgd": "linear", "adam": "sqrt"}  # what ``optim.lr_scaling: auto`` means


def lr_rule(lr_scaling: str, optimizer: str) -> str:
    """The rule ``optim.lr_scaling`` names for ``optimizer`` (``auto`` resolved)."""
    return LR_RULE_FOR_OPTIMIZER.get(optimizer, "linear") if lr_scaling == "auto" else lr_scaling


def lr_factor(rule: str, k: float) -> float:
    """``k(N)``: the learning-rate multiplier of ``rule`` for a batch ``k`` times the reference batch."""
    if rule == "linear":
        return float(k)
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "none":
        return 1.0
    raise ValueError(f"lr rule {rule!r} is not allowed; choose one of {', '.join(LR_SCALINGS)}")


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a counter moving from ``before`` to ``after`` passed (or reached) a multiple of ``every``."""
    return bool(every) and after // every > before // every


@dataclass(frozen=True)
class ScalePlan:
    """What ``N`` workers run under a config: batch, learning rate, buffer, step increment."""

    num_workers: int
    scaling: str
    batch_per_worker: int  # images per worker and optimiser step
    global_batch: int  # images per optimiser step, all workers
    lr_rule: str  # linear | sqrt | none (strong: none)
    lr: float  # the optimiser's peak learning rate: optim.lr × lr_factor
    lr_factor: float
    buffer_per_worker: int  # replay-buffer slots each worker leases from
    buffer_total: int
    step_increment: int  # reference steps per optimiser step (global_batch / train.batch_size)

    def describe(self) -> str:
        """The run's first line after "[rjem] training MODE on DATA: " (keep ``N worker(s), global batch B``)."""
        rule = "" if self.lr_factor == 1.0 else f" = optim.lr × {self.lr_factor:.4g} ({self.lr_rule} rule)"
        return (f"{self.num_workers} worker(s), global batch {self.global_batch} ({self.scaling} scaling: "
                f"{self.batch_per_worker} per worker), lr {self.lr:.4g}{rule}")

    def describe_buffer(self) -> str:
        return f"replay buffer {self.buffer_total} slots ({self.buffer_per_worker} per worker)"


def plan(cfg, num_workers: int | None = None) -> ScalePlan:
    """The :class:`ScalePlan` of ``cfg`` (a :class:`~rjem_ray.config.Config`) on ``num_workers`` workers
    (default ``trainer.num_workers``; an elastic run passes the size its worker group actually has)."""
    n = int(num_workers or cfg.trainer.num_workers)
    b = int(cfg.train.batch_size)
    if cfg.trainer.scaling == "weak":
        rule = lr_rule(cfg.optim.lr_scaling, cfg.optim.name)
        factor = lr_factor(rule, n)
        per_buffer = int(cfg.buffer.size)
        return ScalePlan(n, "weak", b, b * n, rule, cfg.optim.lr * factor, factor, per_buffer, per_buffer * n, n)
    if b % n:
        raise ValueError(f"train.batch_size: {b} is the global batch under strong scaling and must be divisible by "
                         f"the number of workers ({n})")
    per = b // n
    per_buffer = max(per, int(cfg.buffer.size) // n)
    return ScalePlan(n, "strong", per, b, "none", cfg.optim.lr, 1.0, per_buffer, per_buffer * n, 1)


__all__ = ["LR_RULE_FOR_OPTIMIZER", "LR_SCALINGS", "SCALINGS", "ScalePlan", "crossed", "lr_factor", "lr_rule", "plan"]
