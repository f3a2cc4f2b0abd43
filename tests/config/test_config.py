import dataclasses
from pathlib import Path

import pytest
import yaml

from rjem_ray.config import Config, ConfigError, apply_overrides, dump_config, load_config, parse_override


def test_defaults_validate_and_round_trip():
    cfg = Config.from_dict({})
    assert Config.from_dict(cfg.to_dict()) == cfg


def _leaves(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


EXPERIMENT_CONFIGS = sorted(p for p in Path("tune_configs").glob("*.yaml") if not p.name.startswith("tune-"))


def test_the_experiment_configs_are_found():
    assert {p.stem for p in EXPERIMENT_CONFIGS} >= {"smoke", "demo", "cifar10"}


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_with_the_values_its_file_spells(path, tmp_path):
    """Every key the YAML file sets reaches the loaded config unchanged (ints may become floats), the file
    differs from the defaults (so this is not a comparison of defaults with defaults), and the loaded
    config survives dump -> load."""
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    loaded, default = cfg.to_dict(), Config.from_dict({}).to_dict()
    spelled = list(_leaves(raw))
    assert spelled and cfg.name == raw["name"]
    for key, value in spelled:
        assert _at(loaded, key) == value, (".".join(key), value, _at(loaded, key))
    assert sum(_at(default, key) != value for key, value in spelled) >= 5
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_cifar10_config_has_the_papers_settings():
    cfg = load_config("tune_configs/cifar10.yaml")
    assert (cfg.model.depth, cfg.model.widen) == (28, 10)
    assert (cfg.attack.eps, cfg.attack.steps) == (0.1, 15)
    assert (cfg.sampler.kind, cfg.sampler.steps, cfg.sampler.inner_steps) == ("pyld", 10, 5)
    assert (cfg.buffer.size, cfg.buffer.reinit_freq) == (10000, 0.05)
    assert cfg.train.mode == "robust-jem"


def test_override_parses_yaml_scalars():
    assert parse_override("attack.eps=0.3") == (["attack", "eps"], 0.3)
    assert parse_override("trainer.use_gpu=true") == (["trainer", "use_gpu"], True)
    assert parse_override("data.data_dir=/x/y") == (["data", "data_dir"], "/x/y")
    cfg = load_config("tune_configs/smoke.yaml", ["attack.eps=0.25", "generate.sampler.steps=7"])
    assert cfg.attack.eps == 0.25 and cfg.generate.sampler.steps == 7


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("attack.epsilon=0.1", "unknown key attack.epsilon"),
        ("nonsense=1", "unknown key nonsense"),
        ("attack.eps=-0.1", "attack.eps: -0.1 is out of range"),
        ("attack.steps=0", "attack.steps: 0 is out of range"),
        ("sampler.steps=0", "sampler.steps: 0 is out of range"),
        ("train.steps=0", "train.steps: 0 is out of range"),
        ("data.name=imagenet", "data.name: 'imagenet' is not allowed; choose one of mnist5k, cifar10"),
        ("train.mode=gan", "train.mode: 'gan' is not allowed"),
        ("model.depth=12", "model.depth: 12 is not allowed; it must be 6n+4"),
        ("attack.steps=1.5", "attack.steps: expected an integer"),
        ("attack.eps=abc", "attack.eps: expected a number"),
        ("buffer.reinit_freq=1.5", "buffer.reinit_freq: 1.5 is out of range; it must be in [0.0, 1.0]"),
        ("eval.metrics=[accuracy,bogus]", "eval.metrics: 'bogus' is not allowed"),
        ("generate.sampler.step_size=.inf", "generate.sampler.step_size: inf is not allowed; it must be a finite"),
        ("attack.eps=.nan", "attack.eps: nan is not allowed"),
        ("sampler.outer_step_size=-0.5", "sampler.outer_step_size: -0.5 is out of range; it must be >= 0"),
        ("generate.sampler.outer_step_size=-1", "generate.sampler.outer_step_size: -1.0 is out of range"),
        ("generate.contrast_center=median", "generate.contrast_center: 'median' is not allowed; choose one of"),
        ("generate.bn_mode=batch", "generate.bn_mode: 'batch' is not allowed; choose one of"),
        ("eval.fid_extractor=clip", "eval.fid_extractor: 'clip' is not allowed"),
        ("eval.fid_second_extractor=clip", "eval.fid_second_extractor: 'clip' is not allowed"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tune_configs/smoke.yaml", [override])
    assert fragment in str(err.value)


def test_new_sampler_generation_and_fidelity_keys_default_and_load():
    cfg = Config.from_dict({})
    assert cfg.sampler.outer_step_size == 0.0 and cfg.generate.sampler.outer_step_size == 0.0  # inner steps only
    assert cfg.eval.fid_second_extractor == "auto"
    cfg = load_config("tune_configs/smoke.yaml", [
        "sampler.outer_step_size=1.0", "generate.sampler.outer_step_size=0.5", "generate.contrast_center=image-mean",
        "eval.fid_extractor=robust-reference-classifier", "eval.fid_second_extractor=none",
    ])
    assert (cfg.sampler.outer_step_size, cfg.generate.sampler.outer_step_size) == (1.0, 0.5)
    assert cfg.generate.contrast_center == "image-mean"
    assert (cfg.eval.fid_extractor, cfg.eval.fid_second_extractor) == ("robust-reference-classifier", "none")


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"attack": {"epz": 1}})
    assert "allowed keys under attack:" in str(err.value) and "eps" in str(err.value)


def test_a_strong_global_batch_must_split_evenly_over_every_worker_count_the_run_may_have():
    with pytest.raises(ConfigError, match=r"train.batch_size: 16 is the global batch under trainer.scaling=strong.*"
                                          r"3 does not divide it"):
        load_config("tune_configs/smoke.yaml", ["trainer.scaling=strong", "trainer.num_workers=3", "train.batch_size=16"])
    # elastic: 4 workers divide 16, but the run may shrink to 3
    with pytest.raises(ConfigError, match="3 does not divide it"):
        load_config("tune_configs/smoke.yaml", ["trainer.scaling=strong", "trainer.num_workers=4",
                                                "trainer.min_workers=3", "train.batch_size=16"])
    # weak scaling: the batch is per worker, any worker count is fine
    assert load_config("tune_configs/smoke.yaml", ["trainer.num_workers=3"]).trainer.scaling == "weak"


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["attack.eps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tune_configs/nope.yaml")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("eval.ebr_pseudo_count=-1", "eval.ebr_pseudo_count: -1.0 is out of range; it must be >= 0"),
        ("eval.min_norm_runs=[logbarrier-l0]", "eval.min_norm_runs: 'logbarrier-l0' is not allowed; choose one of"),
        ("eval.min_norm_runs=[]", "eval.min_norm_runs: empty"),
        ("eval.min_norm_mu=0", "eval.min_norm_mu: 0.0 is out of range; it must be > 0"),
        ("eval.min_norm_mu_decay=1.5", "eval.min_norm_mu_decay: 1.5 is out of range; it must be in (0, 1]"),
        ("eval.min_norm_reference=ddn", "eval.min_norm_reference: 'ddn' is not allowed; choose one of fab, none"),
        ("eval.min_norm_curve_points=1", "eval.min_norm_curve_points: 1 is out of range; it must be >= 2"),
        ("eval.metrics=[min_norm]", "eval.metrics: 'min_norm' is not allowed"),
        ("eval.certify_methods=[smooth]", "eval.certify_methods: 'smooth' is not allowed; choose one of smoothing"),
        ("eval.certify_sigma=0", "eval.certify_sigma: 0.0 is out of range; it must be > 0"),
        ("eval.certify_alpha=1", "eval.certify_alpha: 1.0 is out of range; it must be in (0, 1)"),
        ("eval.certify_n=0", "eval.certify_n: 0 is out of range; it must be >= 1"),
        ("eval.certify_radii=[-0.5]", "eval.certify_radii: -0.5 is out of range; it must be >= 0"),
    ],
)
def test_related_work_keys_name_the_key_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tune_configs/smoke.yaml", [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_config_is_frozen_and_every_change_is_a_new_validated_config():
    cfg = load_config("tune_configs/smoke.yaml")
    steps = cfg.train.steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3
    new = cfg.override(["train.steps=3", "generate.sampler.steps=2"])  # --set syntax
    assert (new.train.steps, new.generate.sampler.steps, cfg.train.steps) == (3, 2, steps)
    same = cfg.replace({"train.steps": 3, "generate.sampler.steps": 2})  # Python values
    assert same == new and cfg.replace(name="best").name == "best"
    assert cfg.replace(generate={"mode": "pgd"}).generate.mode == "pgd"  # a mapping replaces the section
    with pytest.raises(ConfigError, match="attack.eps: -0.1 is out of range; it must be >= 0"):
        cfg.replace({"attack.eps": -0.1})
    with pytest.raises(ConfigError, match="unknown key train.stepz"):
        cfg.override(["train.stepz=1"])
    with pytest.raises(ConfigError, match="train.steps.x: steps is a value, not a section"):
        cfg.replace({"train.steps.x": 1})


def test_switches_take_yaml_booleans_as_their_strings_at_load():
    cfg = load_config(None, ["buffer.shared=true", "train.channels_last=false", "train.compile=auto"])
    assert (cfg.buffer.shared, cfg.train.channels_last, cfg.train.compile) == ("true", "false", "auto")
    assert cfg.buffer.is_shared(1) and not load_config(None, ["buffer.shared=false"]).buffer.is_shared(4)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_cache_and_data_dirs_are_absolute_from_load_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.data_dir=data"])
    assert (cfg.cache_dir, cfg.data.data_dir) == (str(tmp_path / ".rjem_cache"), str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path.parent)  # a worker or a trial elsewhere: the same directories
    assert Config.from_dict(cfg.to_dict()) == cfg and cfg.override(["name=x"]).cache_dir == cfg.cache_dir
    assert load_config(None, ["data.data_dir=/abs/d"]).data.data_dir == "/abs/d"
    assert load_config(None).data.data_dir is None
    assert load_config(None, ["trainer.storage_path=rel/dir"]).trainer.storage_path == "rel/dir"  # may be a URI


def test_load_config_of_a_config_applies_mlflows_variables_then_the_overrides(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    base = Config.from_dict({})
    cfg = load_config(base, ["train.steps=5"])
    assert (cfg.tracking.experiment, cfg.train.steps, base.tracking.experiment) == ("from-env", 5, "rjem")
    assert load_config(base, ["tracking.experiment=from-set"]).tracking.experiment == "from-set"


def test_each_section_is_declared_beside_the_module_it_configures():
    import rjem_ray.config as config

    homes = {"DataConfig": "core.data", "ModelConfig": "method.models", "OptimConfig": "method.learner",
             "AttackConfig": "method.attacks", "SamplerConfig": "method.samplers", "BufferConfig": "method.replay_buffer",
             "TrainConfig": "method.learner", "TrainerConfig": "method.scaling", "GenerateConfig": "evaluation.generate",
             "EvalConfig": "evaluation.registry", "TrackingConfig": "config.root"}
    sections = {f.name: f.type for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(Config(), f.name))}
    assert sorted(sections.values()) == sorted(homes)  # every section of the tree is in the table above
    assert {name: getattr(config, name).__module__ for name in homes} == {n: f"rjem_ray.{m}" for n, m in homes.items()}


def test_each_list_of_allowed_names_has_one_home():
    """The config checks names against the tuples of the modules that use them, not copies."""
    from rjem_ray.config import DataConfig, EvalConfig, GenerateConfig, ModelConfig, TrainConfig
    from rjem_ray.core.data import DATASETS
    from rjem_ray.evaluation import generate, generation_metrics, ood, registry
    from rjem_ray.method import attacks, gradreg, learner, models, speed
    from rjem_ray.robustness import autoattack, minnorm

    def choices(cls, name):
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]

    assert choices(DataConfig, "name") == tuple(DATASETS)
    assert choices(ModelConfig, "norm") is models.NORMS
    assert choices(TrainConfig, "gradreg_norm") is gradreg.NORMS is attacks.NORMS
    assert choices(TrainConfig, "mode") is learner.MODES
    assert choices(TrainConfig, "precision") is speed.PRECISIONS and choices(TrainConfig, "compile") is speed.SWITCHES
    assert attacks.NORMS == tuple(attacks.STEPS)
    assert choices(GenerateConfig, "mode") is generate.GEN_MODES
    assert choices(EvalConfig, "metrics") is registry.METRIC_NAMES
    assert set(registry.METRIC_NAMES) == set(registry.BY_NAME)
    assert choices(EvalConfig, "fid_extractor") is generation_metrics.FID_EXTRACTORS
    assert choices(EvalConfig, "ood_scores") is ood.SCORE_NAMES
    assert choices(EvalConfig, "ood_shifts") == ("auto",) + ood.SHIFT_NAMES
    assert choices(EvalConfig, "min_norm_runs") is minnorm.RUNS
    assert choices(EvalConfig, "autoattack_attacks") is autoattack.ATTACKS
    assert minnorm.RUNS == tuple(f"{a}-{n}" for a, ns in minnorm.ATTACKS.items() for n in ns)


@pytest.mark.parametrize("override, message", [
    ("model.stem_stride=3", "model.stem_stride: 3 is not allowed; choose one of 1, 2"),
    ("optim.momentum=1.5", "optim.momentum: 1.5 is out of range; it must be in [0.0, 1.0]"),
    ("optim.milestones=[0.5, 2]", "optim.milestones: 2.0 is out of range; it must be in [0.0, 1.0]"),
    ("model.dropout=1", "model.dropout: 1.0 is out of range; it must be in [0.0, 0.99]"),
    ("trainer.accelerator_type=' '", "trainer.accelerator_type: empty; name a GPU type"),
    ("eval.autoattack_attacks=[apgd-ce, apgd-ce]", "eval.autoattack_attacks: ['apgd-ce', 'apgd-ce'] repeats an attack"),
    ("eval.masking_eps_factors=[]", "eval.masking_eps_factors: empty; list one or more factors > 0 of eval.robust_eps"),
    ("eval.certify_radii=[]", "eval.certify_radii: empty; list one or more radii >= 0 ([-1, 1] units)"),
    ("eval.ood_shifts=[]", "eval.ood_shifts: empty; list auto or one or more of uniform, gaussian"),
    ("buffer.size=8", "buffer.size: 8 must be at least train.batch_size"),
    ("train.eval_metrics=[fid, bogus]", "train.eval_metrics: 'bogus' is not allowed; choose one of accuracy, robust"),
    ("trainer.max_failures=-2", "trainer.max_failures: -2 is out of range; it must be >= -1"),
])
def test_field_constraints_and_cross_field_rules_keep_their_messages(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size=16", override])
    assert message in str(err.value) and "\n" not in str(err.value)
