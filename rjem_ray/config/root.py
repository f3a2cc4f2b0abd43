"""The whole configuration, :class:`Config`: one frozen section per key prefix, each declared beside the module
it configures, and the tracking section, declared here.

=========== ============================== =====================================================
section     its dataclass                  lives in
=========== ============================== =====================================================
``data``    :class:`DataConfig`            ``core/data.py`` (the datasets)
``model``   :class:`ModelConfig`           ``method/models.py``
``optim``   :class:`OptimConfig`           ``method/learner.py`` (``build_optimizer``; schedules.py)
``attack``  :class:`AttackConfig`          ``method/attacks.py``
``sampler`` :class:`SamplerConfig`         ``method/samplers.py``
``buffer``  :class:`BufferConfig`          ``method/replay_buffer.py``
``train``   :class:`TrainConfig`           ``method/learner.py`` (the step; ``loop.py`` the cadence)
``trainer`` :class:`TrainerConfig`         ``method/scaling.py`` (worker count and scaling rule; Ray
                                           Train's settings are made from it in distributed/)
``generate`` :class:`GenerateConfig`       ``evaluation/generate.py``
``eval``    :class:`EvalConfig`            ``evaluation/registry.py`` (the metrics it configures)
``tracking`` :class:`TrackingConfig`       here: the tracking modules import MLflow, and the config
                                           loads where MLflow is not installed (the Ray-free layers)
=========== ============================== =====================================================

A field declares its default and constraints (``setting(...)`` of ``core/settings.py``, which builds and
checks the tree once at load); a rule that involves two keys is the section's ``cross_check``. A section's
home imports the config only for type annotations (tests/test_architecture.py checks that no home reaches
``rjem_ray.config`` when it runs), so the config can import every home.

Units: every ε and step size is in the model's input space [-1, 1] (0.1 there is 12.75/255 on the usual
[0, 1] scale). How batch, learning rate, buffer and schedules follow ``trainer.num_workers`` is
``trainer.scaling`` (``rjem_ray/method/scaling.py``): under ``weak`` (the default) ``train.batch_size`` and
``buffer.size`` are per worker and ``optim.lr`` is scaled by ``optim.lr_scaling``; under ``strong`` they are
global and nothing is rescaled. Step-valued keys count reference steps of ``train.batch_size`` images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..core.data import DataConfig
from ..core.settings import build, check, setting
from ..evaluation.generate import GenerateConfig
from ..evaluation.registry import EvalConfig
from ..method.attacks import AttackConfig
from ..method.learner import OptimConfig, TrainConfig
from ..method.models import ModelConfig
from ..method.replay_buffer import BufferConfig
from ..method.samplers import SamplerConfig
from ..method.scaling import TrainerConfig
from .overrides import apply_overrides, apply_values

# keys that were renamed: the unknown-key error names the new one
RENAMED_KEYS = {"eval.ood_dataset": "eval.ood_shifts (a list, e.g. [svhn] or [auto])"}


@dataclass(frozen=True)
class TrackingConfig:
    """The ``tracking.*`` section: MLflow's stores, experiment and run name (``tracking/stores.py`` resolves
    the URIs, ``tracking/tracker.py`` opens the run); MLflow's own environment variables override the file
    (``loading.py``)."""

    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are resolved against the working dir
    registry_uri: str = ""  # the model registry's store; "" = the tracking store
    experiment: str = "rjem"
    artifact_location: str = "mlartifacts"
    run_name: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    # GMM statistics, reference classifiers, FID reference statistics; made absolute at load
    cache_dir: str = setting(".rjem_cache", path=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The validated config of the mapping ``data`` (missing keys: the defaults; paths made absolute)."""
        cfg = build(cls, data, "", RENAMED_KEYS)
        check(cfg)
        return cfg

    def override(self, overrides: Iterable[str] | None) -> Config:
        """A new, validated config with ``--set`` items applied: ``cfg.override(["train.steps=10"])``."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))

    def replace(self, changes: Mapping[str, Any] | None = None, /, **top_level: Any) -> Config:
        """A new, validated config with dotted keys set to Python values: ``cfg.replace({"train.steps": 10})``,
        ``cfg.replace(name="best")``; a mapping value replaces a whole section."""
        return Config.from_dict(apply_values(self.to_dict(), {**(changes or {}), **top_level}))

    @property
    def robust(self) -> bool:
        return self.train.mode in ("robust-classifier", "robust-jem")

    @property
    def uses_energy(self) -> bool:
        return self.train.mode in ("jempp", "robust-jem")
