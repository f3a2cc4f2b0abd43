"""What one training step feeds its loss, per training mode: the wiring the primitives' tests cannot see.

For every mode the step's three batches are recorded where they enter the loss (``Learner.joint``):
the classification batch ``x_cls``, the positive energy batch ``x_pos`` and the negatives ``x_q``.

* ``classifier``:        x_cls = the augmented data batch x; no energy term.
* ``robust-classifier``: x_cls = PGD(x) at the warmed-up ε(step), on the sphere ‖x_cls − x‖∞ = ε(step), with a
  higher CE than x; no energy term.
* ``jempp``:             x_cls = x (which is also the positive batch: x_pos None); x_q = the sampler's output
  from the leased buffer slots, written back to exactly those slots.
* ``robust-jem``:        x_cls = PGD(x), x_pos = x (clean), x_q as in jempp.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rjem_ray.config import load_config
from rjem_ray.core.data import load_split, to_model_space
from rjem_ray.method.gmm import fit_class_gmm
from rjem_ray.method.batchnorm import running_stats_frozen
from rjem_ray.method.learner import Learner
from rjem_ray.method.schedules import attack_eps


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("mnist5k", "train")
    return x[::8], y[::8]


@pytest.fixture(scope="module")
def gmm(digits):
    return fit_class_gmm(to_model_space(digits[0]), digits[1], 10)


def recorded_step(digits, gmm, mode, *overrides, steps_before=0):
    cfg = load_config("tune_configs/smoke.yaml", ["buffer.size=64", "train.batch_size=8", f"train.mode={mode}",
                                                  "attack.eps=0.6", "attack.eps_warmup_steps=10",
                                                  "attack.steps=5", "attack.step_size=0.2", *overrides])
    learner = Learner(cfg, digits[0], digits[1], gmm if cfg.uses_energy else None)
    for _ in range(steps_before):
        learner.step()
    seen: dict = {}
    augment = learner.augment

    def record_augment(x, generator=None):
        seen["x"] = augment(x, generator=generator).clone()
        return seen["x"]

    joint = learner.joint

    def record_joint(x_cls, x_pos=None, x_neg=None):
        seen.update(x_cls=x_cls.detach().clone(), x_pos=None if x_pos is None else x_pos.detach().clone(),
                    x_neg=None if x_neg is None else x_neg.detach().clone())
        # CE of the attacked and the clean batch under the view the attack used (before the update)
        bn_train = cfg.attack.bn_mode == "train"
        learner.net.train(bn_train)
        with torch.no_grad(), running_stats_frozen(learner.model) if bn_train else contextlib.nullcontext():
            y = seen["y"]
            seen["ce_cls"] = F.cross_entropy(learner.net(x_cls), y).item()
            seen["ce_clean"] = F.cross_entropy(learner.net(seen["x"].clamp(-1, 1)), y).item()
        learner.net.train()
        return joint(x_cls, x_pos, x_neg)

    stream = learner.stream

    class RecordLabels:
        def __next__(self):
            x, y = next(stream)
            seen["y"] = y.clone()
            return x, y

    learner.augment, learner.joint, learner.stream = record_augment, record_joint, RecordLabels()
    if learner.buffer is not None:
        lease, write_back = learner.buffer.lease, learner.buffer.write_back

        def record_lease(n):
            out = lease(n)
            seen["leased"] = (np.array(out.slots), out.x.copy())
            return out

        def record_write_back(slots, x):
            seen["written"] = (np.array(slots), np.array(x).copy())
            return write_back(slots, x)

        learner.buffer.lease, learner.buffer.write_back = record_lease, record_write_back
    step = learner.step_count
    learner.step()
    return learner, seen, attack_eps(step, cfg)


def _assert_attacked(seen, eps):
    delta = (seen["x_cls"] - seen["x"].clamp(-1, 1)).abs().amax(dim=(1, 2, 3))
    # L∞ PGD with a random start and sign steps ends on the sphere of the *warmed-up* radius
    torch.testing.assert_close(delta, torch.full_like(delta, eps), atol=1e-5, rtol=0)
    assert seen["ce_cls"] > seen["ce_clean"]  # the attack raised the classification loss


def _assert_negatives_are_the_written_back_chains(learner, seen):
    slots, x_written = seen["written"]
    np.testing.assert_array_equal(slots, seen["leased"][0])
    np.testing.assert_allclose(seen["x_neg"].cpu().numpy(), x_written, rtol=0, atol=0)
    assert not np.allclose(x_written, seen["leased"][1])  # the sampler moved the leased chains
    stored = learner.buffer.state_dict()["buffer"].numpy()
    np.testing.assert_array_equal(stored[slots], x_written)


def test_classifier_step_trains_on_the_augmented_clean_batch_only(digits, gmm):
    _, seen, _ = recorded_step(digits, gmm, "classifier")
    torch.testing.assert_close(seen["x_cls"], seen["x"], atol=0, rtol=0)
    assert seen["x_pos"] is None and seen["x_neg"] is None


@pytest.mark.parametrize("steps_before", [0, 3])
def test_robust_classifier_step_trains_on_pgd_at_the_warmed_up_eps(digits, gmm, steps_before):
    _, seen, eps = recorded_step(digits, gmm, "robust-classifier", steps_before=steps_before)
    assert eps == pytest.approx(0.6 * (steps_before + 1) / 10)
    _assert_attacked(seen, eps)
    assert seen["x_pos"] is None and seen["x_neg"] is None


def test_jempp_step_contrasts_the_clean_batch_with_the_buffer_chains(digits, gmm):
    learner, seen, _ = recorded_step(digits, gmm, "jempp")
    torch.testing.assert_close(seen["x_cls"], seen["x"], atol=0, rtol=0)
    assert seen["x_pos"] is None  # the classification batch is the positive batch
    _assert_negatives_are_the_written_back_chains(learner, seen)


def test_robust_jem_step_classifies_pgd_and_contrasts_the_clean_batch(digits, gmm):
    learner, seen, eps = recorded_step(digits, gmm, "robust-jem", steps_before=2)
    _assert_attacked(seen, eps)
    torch.testing.assert_close(seen["x_pos"], seen["x"], atol=0, rtol=0)
    _assert_negatives_are_the_written_back_chains(learner, seen)


@pytest.mark.parametrize("reinit", [0.0, 1.0])
def test_leased_chains_are_reinitialised_at_the_configured_rate(digits, gmm, reinit):
    """buffer.reinit_freq reaches the buffer: 0 leases the stored chains, 1 replaces every one by a prior draw."""
    cfg = load_config("tune_configs/smoke.yaml", ["buffer.size=64", "train.batch_size=8", "train.mode=jempp",
                                                  f"buffer.reinit_freq={reinit}"])
    learner = Learner(cfg, digits[0], digits[1], gmm)
    stored = learner.buffer.state_dict()["buffer"].numpy().copy()
    lease = learner.buffer.lease(8)
    same = np.all(lease.x == stored[np.array(lease.slots)], axis=(1, 2, 3))
    assert same.all() if reinit == 0.0 else not same.any()
