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
from typing import TYPE_CHECKING

from ..core.settings import ConfigError, setting
from ..core.storage import check_storage_path
from .ddp import GRAD_COMPRESSIONS

if TYPE_CHECKING:
    from ..config import Config

SCALINGS = ("weak", "strong")
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
LR_RULE_FOR_OPTIMIZER = {"sgd": "linear", "adam": "sqrt"}  # what ``optim.lr_scaling: auto`` means


def _named_gpu_type(key: str, value: str | None) -> str | None:
    if value is not None and not value.strip():
        return f"{key}: empty; name a GPU type (A100, H100, A10G, ...) or leave it null"
    return None


@dataclass(frozen=True)
class TrainerConfig:
    """The ``trainer.*`` section: how many workers and how the run scales with them (:func:`plan`), and the
    Ray Train settings ``distributed/train_driver.py`` makes from it (declared here, in a Ray-free module, so
    the config loads where Ray is not installed)."""

    num_workers: int = setting(1, ge=1)
    # weak (batch_size and buffer.size per worker, lr scaled by optim.lr_scaling) | strong (global batch)
    scaling: str = setting("weak", choices=SCALINGS)
    # elastic training (Ray Train's num_workers=(min, max)): > 0 lets a run continue on as few as this many
    # workers when nodes are lost, and grow back up to num_workers; 0 = a fixed worker group
    min_workers: int = setting(0, ge=0)
    # one GPU type per DDP job: Ray's accelerator type (A100, H100, A10G, ...) every worker must run on; None: any
    accelerator_type: str | None = setting(None, check=_named_gpu_type)
    # DDP gradient all-reduce: none (fp32) | bf16 (compressed to bfloat16, half the bytes; torch's bf16 hook)
    grad_compression: str = setting("none", choices=GRAD_COMPRESSIONS)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = setting(1.0, gt=0)
    sync_batchnorm: bool = False
    max_failures: int = setting(0, ge=-1)
    # Where Ray keeps the run's checkpoints (and a sweep's Tune state): None = OUT/ray; a directory, or a URI
    # such as s3://bucket/prefix (rjem_ray/core/storage.py). One run per storage path: rerunning continues it.
    storage_path: str | None = setting(None, check=check_storage_path)

    def cross_check(self, cfg: Config) -> None:
        if self.min_workers > self.num_workers:
            raise ConfigError(f"trainer.min_workers: {self.min_workers} is out of range; it must be at most "
                              f"trainer.num_workers ({self.num_workers}), or 0 for a fixed worker group")
        if self.scaling == "strong":
            batch = cfg.train.batch_size
            bad = [n for n in range(self.min_workers or self.num_workers, self.num_workers + 1) if batch % n]
            if bad:
                raise ConfigError(
                    f"train.batch_size: {batch} is the global batch under trainer.scaling=strong and must be "
                    f"divisible by every worker count the run may have ({bad[0]} does not divide it; "
                    f"trainer.num_workers {self.num_workers}, trainer.min_workers {self.min_workers}); "
                    "use trainer.scaling=weak, or a batch divisible by each"
                )


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


__all__ = ["LR_RULE_FOR_OPTIMIZER", "LR_SCALINGS", "SCALINGS", "ScalePlan", "TrainerConfig", "crossed", "lr_factor", "lr_rule",
           "plan"]
