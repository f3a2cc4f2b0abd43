"""The training loop around :meth:`Learner.step`: reporting, checkpoint hand-off, evaluation and divergence rollback.

``run_loop`` steps a :class:`~rjem_ray.method.learner.Learner` to ``train.steps`` reference steps. Ray
appears nowhere here either: under Ray Train the worker's ``report`` is ``ray.train.report`` (a barrier every
rank reaches on the same schedule), in a test or a study a plain function. What the loop sends:

* every ``train.log_every`` steps the rank-averaged metrics of the steps since the last report
  (``Reducer.mean``), with a progress line and the ETA;
* every ``train.checkpoint_every`` steps and at the end the full state (``Learner.state_dict``) with them;
* every ``train.eval_every`` steps and at the end the figures of ``evaluate`` (e.g. FID) added to them.

A :class:`~rjem_ray.method.learner.DivergenceError` restores the last checkpointed state held in memory and
lowers the learning rate (``Learner.rollback``), at most ``train.max_rollbacks`` times.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .learner import DivergenceError, Learner
from .scaling import crossed

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Report", "format_eta", "is_eval_step", "run_loop"]

Report = Callable[[dict, "dict | None"], None]  # (metrics, state to persist or None)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` of ``seconds`` (whole seconds, truncated; negative counts as 0)."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def is_eval_step(step: int, cfg: Config, increment: int = 1) -> bool:
    """Whether ``run_loop`` evaluates at ``step``, reached by an optimiser step of ``increment`` reference
    steps: when the step crosses a multiple of ``train.eval_every`` (``scaling.crossed``), and at the end.

    Under Ray Train only these steps and checkpoints call ``ray.train.report``: rank 0 logs the other
    metrics to MLflow itself, and every report is a barrier that waits for the controller's next poll.
    """
    every = cfg.train.eval_every
    return bool(every) and (crossed(step - increment, step, every) or step >= cfg.train.steps)


def run_loop(
    learner: Learner,
    report: Report,
    *,
    log: Callable[[str], None] = print,
    log_metrics: Callable[[dict, int], None] | None = None,
    evaluate: Callable[[Learner], dict] | None = None,
) -> None:
    """Step ``learner`` to ``train.steps``, reporting and checkpointing, rolling back divergences.

    Every ``train.log_every`` steps the rank-averaged metrics go to ``report(metrics, None)`` (and to
    ``log_metrics`` and a progress line with the ETA); every ``train.checkpoint_every`` steps and at the
    end ``report(metrics, state)`` receives the full state to persist. Every rank must call this with the
    same schedule: ``report`` is a barrier under Ray Train. Every ``train.eval_every`` steps (and at the
    end) ``evaluate(learner)`` adds its figures (e.g. FID) to the reported metrics. A :class:`DivergenceError` restores the last
    checkpointed state held in memory and multiplies the learning rate by ``train.rollback_lr_factor``,
    at most ``train.max_rollbacks`` times; after that it is raised with the count.
    """
    cfg = learner.cfg
    steps = cfg.train.steps
    good = learner.snapshot() if cfg.train.max_rollbacks > 0 else None
    window: dict[str, float] = {}
    window_n = 0
    t_start, step_start = time.time(), learner.step_count
    p = learner.plan
    line = f"[rjem] training {cfg.train.mode} on {cfg.data.name}: {p.describe()}"
    if learner.buffer is not None:
        line += f", {p.describe_buffer()}" if len(learner.buffer) == p.buffer_per_worker else \
            f", replay buffer {len(learner.buffer)} slots on this worker (kept from the checkpoint)"
    log(f"{line}, steps {learner.step_count}->{steps} (reference steps of {cfg.train.batch_size} images)")
    while learner.step_count < steps:
        try:
            metrics = learner.step()
        except DivergenceError as exc:
            if good is not None and learner.rollbacks < cfg.train.max_rollbacks:
                learner.rollback(good, cfg.train.rollback_lr_factor)
                log(f"[rjem] {exc}; rolled back to step {learner.step_count} with learning-rate scale "
                    f"{learner.lr_scale:g} (rollback {learner.rollbacks}/{cfg.train.max_rollbacks})")
                if log_metrics:
                    log_metrics({"train/rollback": learner.rollbacks, "train/lr_scale": learner.lr_scale},
                                learner.step_count)
                window, window_n = {}, 0
                continue
            raise DivergenceError(
                f"{exc}; stopped after {learner.rollbacks} rollback(s) (train.max_rollbacks = "
                f"{cfg.train.max_rollbacks})"
            ) from None
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + v
        window_n += 1
        s, before = learner.step_count, learner.step_count - p.step_increment
        do_ckpt = crossed(before, s, cfg.train.checkpoint_every) or s >= steps
        do_eval = evaluate is not None and is_eval_step(s, cfg, p.step_increment)
        if not (crossed(before, s, cfg.train.log_every) or do_ckpt or do_eval):
            continue
        avg = learner.reducer.mean({k: v / window_n for k, v in window.items()})
        window, window_n = {}, 0
        rate = (s - step_start) / max(time.time() - t_start, 1e-9)
        avg.update(step=s, steps_per_s=rate, images_seen=learner.images_seen, rollbacks=learner.rollbacks)
        line = (f"[rjem] step {s}/{steps} ({100 * s / steps:.0f}%) loss {avg['loss']:.4f} "
                f"ce {avg['ce']:.4f} acc {avg['acc']:.3f}")
        if "e_pos" in avg:
            line += f" E(x) {avg['e_pos']:.2f} E(x_q) {avg['e_neg']:.2f}"
        log(f"{line} | {rate:.2f} step/s, ETA {format_eta((steps - s) / max(rate, 1e-9))}")
        if do_eval:
            figures = evaluate(learner)
            if figures:
                log("[rjem] eval at step %d: %s" % (s, ", ".join(f"{k} {v:.4g}" for k, v in figures.items())))
            avg.update(figures)
        if log_metrics:
            log_metrics({f"train/{k}": v for k, v in avg.items() if k != "step"}, s)
        if do_ckpt:
            report(avg, learner.state_dict())
            if good is not None:
                good = learner.snapshot()
        else:
            report(avg, None)
