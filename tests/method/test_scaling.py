"""rjem_ray/method/scaling.py: batch, learning rate, buffer and step increment for N workers; the config keys' errors."""

from __future__ import annotations

import math

import pytest

from rjem_ray.config import ConfigError, load_config
from rjem_ray.method.scaling import crossed, lr_factor, lr_rule, plan


def _cfg(*overrides):
    return load_config("tune_configs/smoke.yaml", list(overrides))


def test_weak_scaling_keeps_the_batch_and_buffer_per_worker_and_scales_the_lr_by_the_optimisers_rule():
    adam = plan(_cfg("trainer.num_workers=4"))  # smoke.yaml: adam, lr 0.001, batch 16, buffer 128
    assert (adam.scaling, adam.batch_per_worker, adam.global_batch) == ("weak", 16, 64)
    assert adam.lr_rule == "sqrt" and adam.lr == pytest.approx(0.001 * 2)
    assert (adam.buffer_per_worker, adam.buffer_total, adam.step_increment) == (128, 512, 4)
    sgd = plan(_cfg("trainer.num_workers=4", "optim.name=sgd", "optim.lr=0.1"))
    assert sgd.lr_rule == "linear" and sgd.lr == pytest.approx(0.4)
    fixed = plan(_cfg("trainer.num_workers=4", "optim.lr_scaling=none"))
    assert fixed.lr == pytest.approx(0.001) and fixed.global_batch == 64
    one = plan(_cfg())
    assert (one.global_batch, one.lr, one.step_increment, one.buffer_total) == (16, 0.001, 1, 128)


def test_strong_scaling_splits_the_global_batch_and_keeps_lr_and_steps():
    p = plan(_cfg("trainer.scaling=strong", "trainer.num_workers=4"))
    assert (p.batch_per_worker, p.global_batch, p.lr, p.step_increment) == (4, 16, 0.001, 1)
    assert p.buffer_per_worker == 32 and p.buffer_total == 128


def test_the_first_line_wording_names_workers_and_global_batch():
    assert plan(_cfg("trainer.num_workers=2")).describe().startswith("2 worker(s), global batch 32")


@pytest.mark.parametrize("rule,k,want", [("linear", 8, 8.0), ("sqrt", 16, 4.0), ("none", 64, 1.0)])
def test_lr_factor(rule, k, want):
    assert lr_factor(rule, k) == pytest.approx(want)


def test_auto_rule_per_optimiser():
    assert lr_rule("auto", "sgd") == "linear" and lr_rule("auto", "adam") == "sqrt" and lr_rule("sqrt", "sgd") == "sqrt"
    with pytest.raises(ValueError, match="choose one of"):
        lr_factor("cubic", 2)


def test_crossed_counts_every_multiple_passed_by_a_jump():
    assert crossed(0, 1, 1) and crossed(3, 5, 4) and not crossed(4, 7, 4) and crossed(7, 8, 4)
    assert not crossed(0, 100, 0)  # 0 = never
    # a counter moving by 3 (3 workers, weak) fires a cadence of 4 at most once per multiple
    fires = [s for s in range(3, 30, 3) if crossed(s - 3, s, 4)]
    assert fires == [6, 9, 12, 18, 21, 24]  # the multiples 4..24, each once (15 and 27 cross none)


@pytest.mark.parametrize("override,match", [
    ("trainer.scaling=elastic", r"trainer.scaling: 'elastic' is not allowed; choose one of weak, strong"),
    ("optim.lr_scaling=cubic", r"optim.lr_scaling: 'cubic' is not allowed; choose one of auto, linear, sqrt, none"),
    ("trainer.grad_compression=fp8", r"trainer.grad_compression: 'fp8' is not allowed; choose one of none, bf16"),
    ("trainer.min_workers=5", r"trainer.min_workers: 5 is out of range; it must be at most trainer.num_workers \(1\)"),
])
def test_bad_scaling_keys_name_the_key_and_what_is_allowed(override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_images_per_run_do_not_depend_on_the_worker_count():
    """Weak scaling counts train.steps in reference steps: N workers take ceil(steps / N) optimiser steps of
    N × batch images, the same images as one worker (up to one global batch at the end)."""
    for n in (1, 2, 3, 4, 8):
        p = plan(_cfg(f"trainer.num_workers={n}"))
        steps = 6
        optimiser_steps = math.ceil(steps / p.step_increment)
        images = optimiser_steps * p.global_batch
        assert steps * 16 <= images < steps * 16 + p.global_batch


def test_min_workers_makes_ray_trains_worker_group_elastic_and_the_gpu_type_is_requested():
    from rjem_ray.distributed.ray_setup import scaling_config

    elastic = scaling_config(_cfg("trainer.num_workers=4", "trainer.min_workers=2"), use_gpu=False)
    assert elastic.num_workers == (2, 4)
    fixed = scaling_config(_cfg("trainer.num_workers=4", "trainer.accelerator_type=A100"), use_gpu=True)
    assert fixed.num_workers == 4 and fixed.accelerator_type == "A100" and fixed.resources_per_worker["GPU"] == 1
    assert scaling_config(_cfg("trainer.accelerator_type=A100"), use_gpu=False).accelerator_type is None


def test_the_resumed_runs_line_says_what_a_resize_changed():
    from rjem_ray.distributed.train_worker import resize_line

    now = plan(_cfg("trainer.num_workers=4"))
    saved = {"world_size": 2, "global_batch": 32, "scaling": "weak"}
    line = resize_line(saved, now)
    assert "2 -> 4 worker(s), global batch 32 -> 64" in line and "lr now 0.002" in line
    assert resize_line({"world_size": 4, "global_batch": 64, "scaling": "weak"}, now) == ""
    assert resize_line({}, now) == ""  # a checkpoint from before the worker count was saved
