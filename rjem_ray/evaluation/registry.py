"""The metrics of ``rjem eval``, one object per ``--metrics`` name, in the order they are computed.

:data:`METRICS` fixes the order (it fixes which images and random draws each metric sees: AutoAttack runs
before the masking report, which compares against it; the generation metrics run last), whatever the order of
``--metrics``. To add a metric: a :class:`~rjem_ray.evaluation.metric_base.Metric` subclass (its ``name``,
``protocol_key``, ``config_keys`` and ``run``; its docstring says what it measures, its protocol and units) in
the module of its kind, its instance in :data:`METRICS` where it should run, and its name in
``config.METRIC_NAMES`` (which validates ``eval.metrics`` and ``train.eval_metrics``).
"""

from __future__ import annotations

from ..config import METRIC_NAMES, ConfigError
from .classification_metrics import Accuracy, ExpectedBayesRatio, ExpectedCalibrationError
from .generation_metrics import FrechetInceptionDistance, InceptionScore
from .metric_base import Metric
from .ood import OODDetection
from .robust_metrics import AutoAttackRobustAccuracy, Certified, GradientMasking, MinimumNorm, PGDRobustAccuracy

METRICS: tuple[Metric, ...] = (
    Accuracy(), ExpectedCalibrationError(), ExpectedBayesRatio(),
    PGDRobustAccuracy(), AutoAttackRobustAccuracy(), GradientMasking(), MinimumNorm(), Certified(),
    OODDetection(),
    FrechetInceptionDistance(), InceptionScore(),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def check_metric_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as a list, or a ConfigError naming the first one that is not a metric and the allowed ones."""
    for name in names:
        if name not in BY_NAME:
            raise ConfigError(f"--metrics: {name!r} is not a metric; choose from {', '.join(METRIC_NAMES)}")
    return list(names)


def selected(names: list[str] | tuple[str, ...]) -> list[Metric]:
    """The metrics named in ``names`` (checked), in the order they are computed."""
    wanted = set(check_metric_names(names))
    return [m for m in METRICS if m.name in wanted]
