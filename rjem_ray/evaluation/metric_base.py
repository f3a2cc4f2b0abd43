"""What a metric of ``rjem eval`` is (:class:`Metric`) and what it runs on (:class:`EvalContext`).

A metric is a small stateless object: its ``--metrics`` name, the config keys its figures depend on, and
``run(ctx)``, which returns its figures (the top-level keys of ``rjem eval``'s JSON) and its protocol block
(stored under ``protocol.<protocol_key>``). ``rjem_ray/evaluation/registry.py`` lists them in the order they are
computed; ``evaluate.evaluate_model`` builds one context and runs the requested ones in that order.

The context holds what metrics share: the model (under ``train.precision``'s autocast), the test split on
its device, the seed, the threat model (``threat.py``), the seeded test subsets, the one logits pass of the
classification metrics, and results one metric leaves for a later one (AutoAttack's, for the masking report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import torch

from .metrics import predict_logits

if TYPE_CHECKING:
    from ..config import Config
    from .threat import ThreatModel

Progress = Callable[[str], None]


class MetricResult(NamedTuple):
    """``figures``: top-level keys of the evaluation's result; ``protocol``: the metric's protocol block, or None."""

    figures: dict
    protocol: dict | None = None


class Metric:
    """One ``--metrics`` name. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]  # as in registry.METRIC_NAMES and ``rjem eval --metrics``
    protocol_key: ClassVar[str | None] = None  # where run's protocol goes under ``protocol``
    config_keys: ClassVar[tuple[str, ...]] = ()  # the config keys its figures depend on (beyond eval.batch_size)
    needs_prior: ClassVar[bool] = False  # draws from the checkpoint's Gaussian-mixture prior (generation)

    def run(self, ctx: EvalContext) -> MetricResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


@dataclass
class EvalContext:
    """One evaluation: the model, the test split ``x`` ([-1, 1]) and ``y`` on the model's device, and what
    the metrics share. ``requested`` is the set of metric names asked for (metrics computed together, FID
    and IS, read it)."""

    model: Any  # speed.FastNet around the evaluated network
    cfg: Config
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    requested: frozenset[str]
    seed: int = 0
    progress: Progress = lambda s: None
    gmm: Any = None
    artifact_dir: str | Path | None = None
    shared: dict = field(default_factory=dict)  # results one metric leaves for a later one

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def batch_size(self) -> int:
        return self.cfg.eval.batch_size

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, its stored value afterwards."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    def subset(self, max_samples: int) -> tuple[torch.Tensor, str]:
        """``(indices, how)``: a seeded random subset of at most ``max_samples`` test images, and its description.

        Test files are often sorted by class, so the first n would not be representative (the first 200
        mnist5k test digits are classes 0-3 only). One permutation per seed, so PGD, AutoAttack, the masking
        report, min-norm and the certificates share their images when their sizes agree."""
        n = min(max_samples, len(self.y))
        sub = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed))[:n].to(self.device)
        return sub, "all test images" if n == len(self.y) else f"{n} drawn at random (seed {self.seed})"

    def test_logits(self) -> torch.Tensor:
        """The logits of the whole test split, computed once for accuracy, ECE and E[BR]."""
        def compute():
            self.progress("accuracy / calibration")
            return predict_logits(self.model, self.x, self.batch_size)

        return self.once("test_logits", compute)
