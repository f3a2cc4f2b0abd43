"""YAML search spaces: each kind becomes the right Tune domain, and bad keys or values fail at the edge."""

from __future__ import annotations

import numpy as np
import pytest

from rjem_ray.config import Config, ConfigError, apply_values
from rjem_ray.tune.search_space import Param, base_point, leaf_type, num_trials, param_space, parse_search

BASE = Config().to_dict()


def _draws(param: Param, n: int = 400) -> list:
    return list(param.domain().sample(size=n, random_state=np.random.default_rng(0)))


def test_each_kind_draws_inside_its_bounds():
    params = parse_search({
        "generate.contrast": {"uniform": [0.5, 0.9]},
        "generate.sampler.step_size": {"loguniform": [0.01, 1.0]},
        "generate.sampler.steps": {"randint": [2, 4]},
        "generate.pgd_eps": {"choice": [0.3, 0.5]},
    }, BASE)
    by_key = {p.key: p for p in params}
    u = _draws(by_key["generate.contrast"])
    assert 0.5 <= min(u) and max(u) <= 0.9 and max(u) - min(u) > 0.3
    lg = np.log10(_draws(by_key["generate.sampler.step_size"]))
    assert -2 <= lg.min() and lg.max() <= 0
    assert abs(np.median(lg) + 1) < 0.2  # log-uniform: the median sits at the geometric middle, 0.1
    ints = _draws(by_key["generate.sampler.steps"])
    assert set(ints) == {2, 3, 4}  # both ends included (Ray's own randint excludes the upper one)
    assert set(_draws(by_key["generate.pgd_eps"])) == {0.3, 0.5}


def test_grid_becomes_grid_search_and_counts_trials():
    params = parse_search({
        "generate.mode": {"grid": ["energy", "combined", "pgd"]},
        "generate.contrast": {"grid": [0.5, 0.7]},
        "generate.pgd_eps": {"uniform": [0.1, 0.5]},
    }, BASE)
    space = param_space(params)
    assert space["generate.mode"] == {"grid_search": ["energy", "combined", "pgd"]}
    assert num_trials(params, num_samples=2) == 2 * 3 * 2


def test_apply_values_sets_nested_keys_and_leaves_the_base_alone():
    out = apply_values(BASE, {"generate.sampler.steps": 7, "optim.lr": 0.5})
    assert out["generate"]["sampler"]["steps"] == 7 and out["optim"]["lr"] == 0.5
    assert BASE["generate"]["sampler"]["steps"] != 7 and BASE["optim"]["lr"] != 0.5
    assert Config.from_dict(out).generate.sampler.steps == 7


def test_base_point_is_the_base_values_of_the_searched_keys_inside_their_domains():
    base = apply_values(BASE, {"generate.contrast": 0.6, "generate.sampler.steps": 4, "generate.mode": "energy"})
    params = parse_search({
        "generate.contrast": {"uniform": [0.5, 0.9]},
        "generate.sampler.steps": {"randint": [2, 4]},  # 4: the inclusive upper end is inside
        "generate.mode": {"choice": ["energy", "combined"]},
    }, base)
    assert base_point(params, base) == {"generate.contrast": 0.6, "generate.sampler.steps": 4, "generate.mode": "energy"}
    for key, value, domain in (("generate.contrast", 0.95, "uniform(0.5, 0.9)"),
                               ("generate.sampler.steps", 5, "randint(2, 4)"),
                               ("generate.mode", "pgd", "choice(energy, combined)")):
        with pytest.raises(ConfigError) as err:
            base_point(params, apply_values(base, {key: value}))
        assert f"search.{key}: the base config's value {value!r} is outside {domain}" in str(err.value)
    assert not Param("k", "uniform", (0.0, 1.0)).contains(True)  # a bool is not a number here


def test_leaf_types_follow_the_typed_config():
    assert leaf_type("generate.sampler.steps") is int
    assert leaf_type("attack.eps") is float
    assert leaf_type("generate.mode") is str
    assert leaf_type("eval.robust_step_size") is float  # Optional[float] unwraps


@pytest.mark.parametrize("search, message", [
    ({"generate.sampler.stepz": {"grid": [1]}}, "unknown key 'stepz'; allowed keys under generate.sampler"),
    ({"generate.sampler": {"grid": [1]}}, "search.generate.sampler: is a section"),
    ({"generate.contrast": {"grid": [0.5, 1.5]}}, "value 1.5 is invalid: generate.contrast: 1.5 is out of range"),
    ({"generate.contrast": {"uniform": [0.5, 1.5]}}, "value 1.5 is invalid"),
    ({"generate.mode": {"choice": ["energy", "langevin"]}}, "'langevin' is not allowed"),
    ({"generate.sampler.steps": {"uniform": [1, 5]}}, "is an integer; use randint, choice or grid"),
    ({"generate.mode": {"uniform": [0, 1]}}, "is not numeric (str); use choice or grid"),
    ({"generate.contrast": {"gaussian": [0, 1]}}, "'gaussian' is not a distribution"),
    ({"generate.contrast": 0.5}, "a fixed value belongs in the experiment keys"),
    ({"generate.contrast": {"uniform": [0.9, 0.5]}}, "needs finite low < high"),
    ({"generate.sampler.step_size": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
    ({"generate.sampler.steps": {"randint": [1.5, 4]}}, "randint takes integer ends"),
    ({"generate.contrast": {"choice": []}}, "takes a non-empty list"),
    ({}, "search: expected a non-empty mapping"),
])
def test_bad_search_fails_naming_the_key(search, message):
    with pytest.raises(ConfigError) as err:
        parse_search(search, BASE)
    assert message in str(err.value)


def test_scope_restrictions():
    with pytest.raises(ConfigError, match="allowed keys start with generate."):
        parse_search({"optim.lr": {"grid": [0.1]}}, BASE, allowed_prefixes=("generate.",))
    with pytest.raises(ConfigError, match="must not be searched"):
        parse_search({"eval.fid_samples": {"grid": [10, 20]}}, BASE, forbidden=("eval.",))
    with pytest.raises(ConfigError, match="must not be searched"):
        parse_search({"train.steps": {"grid": [10, 20]}}, BASE, forbidden=("train.steps",))
    assert parse_search({"train.steps": {"grid": [10, 20]}}, BASE, forbidden=("train.step",))  # exact keys only
