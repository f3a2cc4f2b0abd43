"""One typed, frozen configuration for every command, loaded from YAML with dotted ``--set`` overrides.

``load_config(path, overrides)`` is the edge (``loading.py``): it reads YAML, applies MLflow's environment
variables and ``key.sub=value`` overrides (values parsed as YAML scalars), rejects unknown keys and
out-of-range values with a :class:`ConfigError` that names the key and what is allowed, makes ``cache_dir``
and ``data.data_dir`` absolute, and returns a frozen :class:`Config`. A config is never changed in place:
``cfg.override(["train.steps=10"])`` (``--set`` syntax) and ``cfg.replace({"train.steps": 10})`` (Python
values) return a new, validated one.

The keys, their defaults and their constraints are declared by section, each beside the module it configures
(``root.py`` lists where; :class:`Config` assembles them); ``core/settings.py`` builds and checks them;
``overrides.py`` handles dotted keys on plain mappings. The names below are re-exported from their homes.
"""

from ..core.data import DataConfig
from ..core.settings import ConfigError, build, check, setting
from ..evaluation.generate import GEN_MODES, GenerateConfig
from ..evaluation.generation_metrics import FID_EXTRACTORS
from ..evaluation.ood import SCORE_NAMES as OOD_SCORES
from ..evaluation.ood import SHIFT_NAMES as OOD_SHIFTS
from ..evaluation.registry import METRIC_NAMES, EvalConfig
from ..method.attacks import AttackConfig
from ..method.learner import MODES, OptimConfig, TrainConfig
from ..method.models import ModelConfig
from ..method.replay_buffer import BufferConfig
from ..method.samplers import SamplerConfig
from ..method.scaling import TrainerConfig
from .loading import TRACKING_ENV, dump_config, load_config, read_yaml, with_tracking_env
from .overrides import apply_overrides, apply_values, get_dotted, parse_override
from .root import RENAMED_KEYS, Config, TrackingConfig

__all__ = [
    "AttackConfig", "BufferConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "FID_EXTRACTORS", "GEN_MODES", "GenerateConfig", "METRIC_NAMES", "MODES", "ModelConfig", "OOD_SCORES",
    "OOD_SHIFTS", "OptimConfig", "RENAMED_KEYS", "SamplerConfig", "TRACKING_ENV", "TrackingConfig", "TrainConfig",
    "TrainerConfig", "apply_overrides", "apply_values", "build", "check", "dump_config", "get_dotted",
    "load_config", "parse_override", "read_yaml", "setting", "with_tracking_env",
]
