"""rjem_ray.robustness.autoattack: the scale change to AutoAttack's [0, 1], ε on both scales, and the bookkeeping.

Each test fails if the wrapper, the ε conversion, the per-attack cascade or the protocol is wrong. A small
MLP trained for ~2 s on the offline mnist5k digits (average-pooled to 14×14) is the "small trained model".
"""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.robustness import autoattack as aa
from rjem_ray.evaluation.metrics import accuracy, robust_accuracy

from digit_models import digit_subset, digits_14, train_digit_mlp

EPS = 0.1  # [-1, 1] units (0.05 on [0, 1]): PGD leaves this MLP about 0.7 of its ~0.92


@pytest.fixture(scope="module")
def mlp():
    """An MLP on 14×14 digits, ~0.92 test accuracy, eval mode."""
    return train_digit_mlp()


@pytest.fixture(scope="module")
def test_subset():
    return digit_subset("test", 120)


@pytest.fixture(scope="module")
def cheap_run(mlp, test_subset):
    """The cheap custom version (APGD-CE + APGD-T) on 120 test digits: (robust mask, protocol)."""
    x, y = test_subset
    return aa.autoattack_robust(mlp, x, y, eps=EPS, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0,
                                subset="120 drawn at random (seed 0)")


def test_attack_names_and_standard_list_are_the_librarys():
    import pyautoattack
    from pyautoattack.autoattack import AttackName

    assert set(aa.ATTACKS) == set(typing.get_args(AttackName))
    adversary = pyautoattack.AutoAttack(nn.Linear(2, 2), eps=0.1, version="standard")
    assert list(aa.STANDARD_ATTACKS) == adversary.attacks_to_run


def test_wrapper_sees_the_same_logits_as_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[0] = -1.0
    x[1] = 1.0  # the ends of the range map to u = 0 and u = 1
    u = aa.to_unit_interval(x)
    assert u.min() >= 0 and u.max() <= 1 and u[0].eq(0).all() and u[1].eq(1).all()
    g = aa.UnitIntervalModel(model)
    with torch.no_grad():
        torch.testing.assert_close(g(u), model(x), rtol=1e-6, atol=1e-6)
    assert not model.training and list(g.parameters()) == list(model.parameters())


class _SignModel(nn.Module):
    """Two classes, logits ``[s, −s]`` with ``s = mean(x)``: an image of constant value ``m`` keeps its
    label exactly while the L∞ perturbation (in [-1, 1] units) stays below ``|m|``."""

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([s, -s], 1)


def test_eps_is_in_model_units_and_halved_for_the_library():
    n, margin = 12, 0.3
    y = torch.arange(n) % 2
    x = ((1 - 2 * y).float() * margin).view(-1, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    model = _SignModel()
    kw = dict(version="custom", attacks=["apgd-ce", "square"], square_queries=300)
    torch.manual_seed(5)
    expected_draw = torch.rand(4)
    torch.manual_seed(5)
    # ε = 0.25 < margin in [-1, 1]: nothing can flip. If ε were passed unhalved (0.25 on [0, 1] = 0.5 here)
    # every image would flip.
    inside, proto = aa.autoattack_accuracy(model, x, y, eps=0.25, **kw)
    assert torch.equal(torch.rand(4), expected_draw)  # the library reseeds torch; the caller's stream is restored
    assert inside == 1.0 and proto["eps"] == 0.25 and proto["eps_01_scale"] == 0.125
    # ε = 0.35 > margin: every image flips. Halved twice (0.0875 on [0, 1] = 0.175 here) none would.
    outside, _ = aa.autoattack_accuracy(model, x, y, eps=0.35, **kw)
    assert outside == 0.0


def test_autoattack_is_at_most_pgd_and_clean_accuracy(mlp, test_subset, cheap_run):
    x, y = test_subset
    clean = accuracy(mlp, x, y)
    pgd = robust_accuracy(mlp, x, y, eps=EPS, steps=20, generator=torch.Generator().manual_seed(0))
    robust = cheap_run[0].double().mean().item()
    assert robust <= pgd <= clean
    assert robust < clean - 0.1  # the attacks do attack: ~0.92 clean, ~0.7 robust
    assert cheap_run[1]["clean_accuracy"] == pytest.approx(clean)
    # Every robust image is correctly classified clean.
    assert (mlp(x).argmax(1)[cheap_run[0]] == y[cheap_run[0]]).all()


def test_per_attack_cascade_equals_the_librarys_own_run(mlp, test_subset, cheap_run):
    from pyautoattack import AutoAttack

    x, y = test_subset
    adversary = AutoAttack(aa.UnitIntervalModel(mlp), norm="Linf", eps=EPS / 2, version="standard", seed=0)
    adversary.attacks_to_run = ["apgd-ce", "apgd-t"]
    _, y_adv = adversary.run_standard_evaluation(aa.to_unit_interval(x), y, batch_size=256)
    assert torch.equal(cheap_run[0], y_adv == y)


def test_protocol_names_library_version_units_samples_and_each_attack(cheap_run):
    import pyautoattack

    robust, p = cheap_run
    assert p["library"] == "pyautoattack" and p["library_version"] == pyautoattack.__version__
    assert p["version"] == "custom" and p["attacks"] == ["apgd-ce", "apgd-t"]
    assert p["norm"] == "linf" and p["eps"] == EPS and p["eps_01_scale"] == EPS / 2
    assert "[-1, 1]" in p["eps_unit"] and "[0, 1]" in p["eps_01_unit"]
    assert p["num_samples"] == 120 and p["subset"] == "120 drawn at random (seed 0)" and p["seed"] == 0
    # The standard version's settings, not the library's "custom" defaults (5 restarts for APGD-CE).
    assert p["attack_settings"]["apgd-ce"]["restarts"] == 1 and p["attack_settings"]["apgd-ce"]["iterations"] == 100
    assert p["attack_settings"]["apgd-t"]["target_classes"] == 9
    steps = [s["attack"] for s in p["accuracy_after"]]
    accs = [p["clean_accuracy"]] + [s["accuracy"] for s in p["accuracy_after"]]
    assert steps == ["apgd-ce", "apgd-t"]
    assert all(a >= b for a, b in zip(accs, accs[1:]))  # each attack can only remove robust points
    assert accs[-1] == pytest.approx(robust.double().mean().item())
    assert p["library_warnings"] == []  # a deterministic, gradient-bearing model raises none of its flags


def test_eps_zero_leaves_clean_accuracy(mlp):
    x, y = digits_14("test")
    with torch.no_grad():
        right = mlp(x).argmax(1) == y
    pick = torch.cat([right.nonzero()[:6, 0], (~right).nonzero()[:2, 0]])  # 6 right, 2 wrong: clean 0.75
    attacks = list(aa.STANDARD_ATTACKS)  # every attack of the suite; Square on a smaller budget
    acc, p = aa.autoattack_accuracy(mlp, x[pick], y[pick], eps=0.0, version="custom", attacks=attacks,
                                    square_queries=200)
    assert acc == pytest.approx(0.75) and p["clean_accuracy"] == pytest.approx(0.75)
    assert [s["accuracy"] for s in p["accuracy_after"]] == pytest.approx([0.75] * 4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(version="custom", attacks=["pgd"]), "'pgd' is not an AutoAttack attack"),
        (dict(version="custom", attacks=[]), "non-empty list"),
        (dict(version="custom", attacks=["square", "square"]), "must not repeat"),
        (dict(version="standard", attacks=["apgd-ce"]), "fixed by the standard version"),
        (dict(version="plus"), "version must be one of standard, custom"),
        (dict(norm="l1"), "norm must be one of linf, l2"),
        (dict(eps=-0.1), "eps must be a finite number >= 0"),
        (dict(version="standard", square_queries=100), "fixes Square at 5000"),
    ],
)
def test_bad_arguments_name_what_is_allowed(kwargs, fragment):
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    kwargs = {"eps": 0.1, **kwargs}
    with pytest.raises(ValueError) as exc:
        aa.autoattack_accuracy(_SignModel(), x, y, **kwargs)
    assert fragment in str(exc.value)


def test_package_imports_without_the_library_and_without_ray_or_mlflow():
    code = (
        "import sys; sys.modules['pyautoattack'] = None\n"  # as if it were not installed
        "import rjem_ray.robustness.autoattack, rjem_ray.evaluation.masking, rjem_ray.evaluation.evaluate\n"
        "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules, 'pure modules import Ray or MLflow'\n"
        "import torch\n"
        "try:\n"
        "    rjem_ray.robustness.autoattack.autoattack_accuracy(torch.nn.Linear(4, 2), torch.zeros(1, 4),"
        " torch.zeros(1, dtype=torch.long), eps=0.1)\n"
        "except ImportError:\n"
        "    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("eval.autoattack_version=plus", "eval.autoattack_version: 'plus' is not allowed; choose one of standard, custom"),
        ("eval.autoattack_attacks=apgd-ce,pgd", "eval.autoattack_attacks: 'pgd' is not allowed; choose one of apgd-ce"),
        ("eval.autoattack_attacks=square,square", "eval.autoattack_attacks: ['square', 'square'] repeats an attack"),
        ("eval.autoattack_max_samples=0", "eval.autoattack_max_samples: 0 is out of range"),
        ("eval.masking_eps_factors=[1.0,0]", "eval.masking_eps_factors: 0.0 is out of range; it must be > 0"),
        ("eval.metrics=[accuracy,aa]", "eval.metrics: 'aa' is not allowed"),
    ],
)
def test_config_keys_are_validated_with_the_key_and_allowed_values(override, fragment):
    from rjem_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_config_defaults_report_autoattack_and_custom_needs_attacks():
    from rjem_ray.config import METRIC_NAMES, ConfigError, load_config

    cfg = load_config(None, [])
    assert {"autoattack", "masking"} <= set(METRIC_NAMES)
    assert "autoattack" in cfg.eval.metrics and "robust" in cfg.eval.metrics and "masking" not in cfg.eval.metrics
    assert cfg.eval.autoattack_version == "standard"
    custom = load_config(None, ["eval.autoattack_version=custom", "eval.autoattack_attacks=apgd-ce,apgd-t"])
    assert custom.eval.autoattack_attacks == ["apgd-ce", "apgd-t"]
    with pytest.raises(ConfigError, match="eval.autoattack_attacks: empty"):
        load_config(None, ["eval.autoattack_version=custom", "eval.autoattack_attacks=[]"])
