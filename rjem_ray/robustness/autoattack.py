"""Robust accuracy under AutoAttack (Croce & Hein 2020), the field's accepted robustness figure.

The attacks are the authors' own implementation (fra31/auto-attack, the code RobustBench runs), installed
from PyPI as ``pyautoattack``; nothing here re-implements them. What this module adds is the change of
scale and the bookkeeping:

* Our models map NCHW images ``x`` in **[-1, 1]** to logits. AutoAttack attacks images ``u`` in
  **[0, 1]**. The library therefore sees ``g(u) = f(2u − 1)`` and inputs ``u = (x + 1) / 2``; since the
  map is affine with factor ½, a ball of radius ε around ``x`` (L∞ per pixel, or L2 per image) is the
  ball of radius ε/2 around ``u``, and ``g(u) = f(x)`` exactly (up to float rounding).
* ``robust accuracy = mean[correct on u and on every attack's output]``: each attack of the suite runs,
  in order, on the points that are still robust, exactly as the library's ``run_standard_evaluation``
  cascades them (same batches, same seed per batch). Running the cascade one attack at a time gives the
  accuracy remaining after each attack, which the library only logs.

The standard version is APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes) and Square (5,000
queries), each with the library's standard settings. ``version="custom"`` runs a chosen sub-list of the
library's attacks with those same standard settings (e.g. APGD-CE + APGD-T, or Square alone as a
black-box check); the protocol names the attacks and settings actually used.

Pure: torch and the library only (imported lazily, so the rest of the package imports without it).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
import time
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["ATTACKS", "STANDARD_ATTACKS", "VERSIONS", "LIBRARY", "UnitIntervalModel", "to_unit_interval",
           "autoattack_accuracy", "autoattack_robust", "fab_min_norm"]

LIBRARY = "pyautoattack"
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")  # every name the library's AutoAttack accepts
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # the standard version, in the library's order
VERSIONS = ("standard", "custom")  # eval.autoattack_version: custom = the sub-list eval.autoattack_attacks
_LIBRARY_NORMS = {"linf": "Linf", "l2": "L2"}
_LOGGER = "auto-attack"  # the library logs its checks (warnings) and progress (debug) here
# pyautoattack is imported inside the functions that run it (marked `# lazy: pyautoattack, see top`): the config
# imports this module for its names (ATTACKS, VERSIONS), and the rest of the package imports without the library.


def to_unit_interval(x: Tensor) -> Tensor:
    """``u = (x + 1) / 2``: an image in the model's [-1, 1] space on the [0, 1] scale AutoAttack uses."""
    return (x + 1) / 2


class UnitIntervalModel(nn.Module):
    """``g(u) = f(2u − 1)``: the model ``f`` (inputs in [-1, 1]) as a classifier of images ``u`` in [0, 1].

    With ``u = to_unit_interval(x)``, ``g(u) = f(x)``. The wrapper holds ``f`` as a submodule and never
    changes its train/eval mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, u: Tensor) -> Tensor:
        return self.model(2 * u - 1)


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


def library_version() -> str:
    import pyautoattack  # lazy: pyautoattack, see top

    return getattr(pyautoattack, "__version__", "unknown")


def _settings(adversary, attack: str) -> dict:
    """The parameters the library will run ``attack`` with (read from its attack objects)."""
    if attack in ("apgd-ce", "apgd-dlr"):
        a = adversary.apgd
        return {"loss": attack.split("-")[1], "iterations": a.n_iter, "restarts": a.n_restarts, "rho": a.thr_decr}
    if attack == "apgd-t":
        a = adversary.apgd_targeted
        return {"loss": "dlr-targeted", "iterations": a.n_iter, "restarts": a.n_restarts,
                "target_classes": a.n_target_classes, "rho": a.thr_decr}
    if attack in ("fab", "fab-t"):
        a = adversary.fab
        out = {"iterations": a.n_iter, "restarts": 1 if attack == "fab-t" else a.n_restarts}
        if attack == "fab-t":
            out["target_classes"] = a.n_target_classes
        return out
    a = adversary.square
    return {"queries": a.n_queries, "p_init": a.p_init, "restarts": a.n_restarts, "loss": a.loss}


class _Collect(logging.Handler):
    """Keeps the library's warnings (its checks for randomised, dynamic or zero-gradient defences).

    A check fires once per batch and target class; messages that differ only in their numbers are kept
    once, the first one, with the number of times they were raised.
    """

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self._first: dict[str, str] = {}
        self._count: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        key = re.sub(r"\d+", "#", msg)
        self._first.setdefault(key, msg)
        self._count[key] = self._count.get(key, 0) + 1

    @property
    def messages(self) -> list[str]:
        return [m if self._count[k] == 1 else f"{m} (raised {self._count[k]} times)" for k, m in self._first.items()]


def _check_args(x: Tensor, y: Tensor, eps: float, norm: str, version: str, attacks, batch_size: int) -> list[str]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("autoattack_accuracy needs at least one input")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm not in _LIBRARY_NORMS:
        raise ValueError(f"norm must be one of {', '.join(_LIBRARY_NORMS)}, got {norm!r}")
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if version == "standard":
        if attacks is not None and list(attacks) != list(STANDARD_ATTACKS):
            raise ValueError(f"attacks are fixed by the standard version ({', '.join(STANDARD_ATTACKS)}); "
                             "use version='custom' to choose them")
        return list(STANDARD_ATTACKS)
    attacks = list(attacks or [])
    if not attacks:
        raise ValueError(f"version 'custom' needs a non-empty list of attacks from {', '.join(ATTACKS)}")
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"attack {a!r} is not an AutoAttack attack; choose from {', '.join(ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must not repeat, got {attacks}")
    return attacks


def autoattack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    subset: str = "all given images",
    square_queries: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, dict]:
    """Robust accuracy of ``model`` on ``(x, y)`` under AutoAttack, and the protocol that produced it.

    ``robust accuracy = (1/N) Σ_i 1[f(x_i) = y_i  ∧  f(A_k(x_i)) = y_i for every attack k]``, a fraction
    in [0, 1] that never exceeds the clean accuracy. ``x`` is NCHW in the model's [-1, 1] space and ``eps``
    the radius of the ``norm`` ball there (L∞ per pixel, L2 per flattened image); the library attacks
    ``u = (x + 1)/2`` in [0, 1] with radius ``eps / 2`` through ``g(u) = f(2u − 1)``. So ε = 0.6 here is
    the digit budget 0.3 on [0, 1], and ε = 0.1 here is 0.05 = 12.75/255 there.

    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T, Square; ``"custom"`` runs ``attacks`` (names in
    :data:`ATTACKS`, in the given order) with the standard version's per-attack settings. ``seed`` seeds
    every attack (the library reseeds torch's global generator per batch; the caller's generator state
    is restored afterwards). ``subset`` describes how ``x`` was drawn, for the protocol. The model's mode
    is the caller's (``eval()``: the library's check flags a model whose outputs vary between calls).

    Returns ``(robust_accuracy, protocol)``; the protocol holds the library and its version, the version
    and attack list, the per-attack settings, the norm, ε on both scales, the number of samples and how
    they were drawn, the seed, the clean accuracy, the accuracy remaining after each attack in order
    (with its wall and CPU seconds) and any warnings the library's own checks raised.

    ``square_queries`` (custom version only) replaces Square's standard budget of 5,000 queries, for
    cheap checks; the protocol records the budget used.
    """
    robust, protocol = autoattack_robust(
        model, x, y, eps=eps, norm=norm, version=version, attacks=attacks, seed=seed, batch_size=batch_size,
        subset=subset, square_queries=square_queries, progress=progress)
    return robust.double().mean().item(), protocol


def autoattack_robust(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    subset: str = "all given images",
    square_queries: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, dict]:
    """:func:`autoattack_accuracy` per sample: a bool tensor ``[N]`` (on ``y``'s device), true where the
    image is classified correctly clean and after every attack; and the same protocol."""
    attacks = _check_args(x, y, eps, norm, version, attacks, batch_size)
    if square_queries is not None:
        if version == "standard":
            raise ValueError("square_queries: the standard version fixes Square at 5000 queries; use version='custom'")
        if isinstance(square_queries, bool) or not isinstance(square_queries, numbers.Integral) or square_queries < 1:
            raise ValueError(f"square_queries must be an int >= 1, got {square_queries!r}")
    from pyautoattack import AutoAttack  # lazy: pyautoattack, see top

    say = progress or (lambda s: None)
    device = _device_of(model, x.device)
    g = UnitIntervalModel(model)
    u = to_unit_interval(x.detach()).clamp(0, 1)
    y = y.detach()
    with torch.no_grad():
        logits = [g(u[s : s + batch_size].to(device)) for s in range(0, len(y), batch_size)]
    num_classes = int(logits[0].shape[1])
    alive = torch.cat([lg.argmax(1).to(y.device) for lg in logits]) == y
    n = len(y)
    clean = alive.double().mean().item()

    collect = _Collect()
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(collect)
    cuda = [device.index or 0] if device.type == "cuda" else []
    after: list[dict] = []
    settings: dict[str, dict] = {}
    try:
        with torch.random.fork_rng(devices=cuda):
            # The standard version's settings for every attack (version 'custom' in the library would
            # silently switch APGD-CE to 5 restarts); only the list of attacks differs.
            adversary = AutoAttack(g, norm=_LIBRARY_NORMS[norm], eps=eps / 2, version="standard", seed=seed,
                                   device=device)
            # 9 target classes need 10 classes; with fewer, target every other class.
            adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
            adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
            if square_queries is not None:
                adversary.square.n_queries = int(square_queries)
            for attack in attacks:
                settings[attack] = _settings(adversary, attack)
                idx = alive.nonzero().squeeze(1)
                t0, c0 = time.time(), time.process_time()
                if idx.numel() > 0:
                    say(f"AutoAttack {attack} on {idx.numel()} still-robust images")
                    adversary.attacks_to_run = [attack]
                    # The library's own verdict: y_adv is the prediction on the attack's output for the
                    # points it broke and the clean prediction (= y, they are still robust) elsewhere.
                    tracer = sys.gettrace()  # its dynamic-defence check ends with sys.settrace(None)
                    _, y_adv = adversary.run_standard_evaluation(u[idx], y[idx], batch_size=batch_size)
                    sys.settrace(tracer)  # give a debugger or coverage its tracer back
                    alive[idx] = y_adv.to(y.device) == y[idx]
                # CPU seconds beside wall seconds: on a shared machine the wall time also counts waiting.
                after.append({"attack": attack, "accuracy": alive.double().mean().item(),
                              "wall_s": round(time.time() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)})
            # The library's end-of-cascade check (Square breaking what the others could not), which its
            # one-attack-per-call runs above never reach: same function, same accuracies.
            from pyautoattack import checks  # lazy: pyautoattack, see top

            checks.check_square_sr({"clean": clean, **{a["attack"]: a["accuracy"] for a in after}}, logger=logger)
    finally:
        logger.removeHandler(collect)

    protocol = {
        "library": LIBRARY,
        "library_version": library_version(),
        "implementation": "fra31/auto-attack (Croce & Hein 2020), as run by RobustBench",
        "version": version,
        "attacks": attacks,
        "attack_settings": settings,
        "norm": norm,
        "eps": eps,
        "eps_unit": "model input space [-1, 1]",
        "eps_01_scale": eps / 2,
        "eps_01_unit": "[0, 1] pixel scale, what the library attacks (g(u) = f(2u - 1), u = (x + 1) / 2)",
        "num_samples": n,
        "subset": subset,
        "seed": seed,
        "clean_accuracy": clean,
        "accuracy_after": after,
        "wall_s": round(sum(a["wall_s"] for a in after), 2),
        "cpu_s": round(sum(a["cpu_s"] for a in after), 2),
        "library_warnings": collect.messages,
    }
    return alive, protocol


FAB_NORMS = {"l1": "L1", "l2": "L2", "linf": "Linf"}


def fab_min_norm(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2", iterations: int = 100,
                 restarts: int = 1, seed: int = 0, batch_size: int = 256) -> tuple[Tensor, dict]:
    """Per-image minimum-norm distances found by FAB (Croce & Hein 2020, the library's ``FABAttack_PT``,
    untargeted), the public reference for ``rjem_ray/robustness/minnorm.py``.

    FAB attacks ``u = (x + 1)/2`` through ``g(u) = f(2u − 1)``; its L1/L2/L∞ distances on [0, 1] are
    doubled back to the model's [-1, 1] space (the map is affine with factor ½). Returns ``d`` ``[N]``
    (CPU; 0 where ``x`` is already misclassified, ``inf`` where FAB found no adversarial point) and the
    protocol (library, version, norm, iterations, restarts, seed).
    """
    if norm not in FAB_NORMS:
        raise ValueError(f"FAB supports the norms {', '.join(FAB_NORMS)}, got {norm!r}")
    from pyautoattack.fab_pt import FABAttack_PT  # lazy: pyautoattack, see top

    device = _device_of(model, x.device)
    g = UnitIntervalModel(model)
    out = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        fab = FABAttack_PT(g, norm=FAB_NORMS[norm], n_iter=iterations, n_restarts=restarts, seed=seed, device=device)
        for s in range(0, len(y), batch_size):
            u = to_unit_interval(x[s : s + batch_size].detach()).clamp(0, 1).to(device)
            yb = y[s : s + batch_size].to(device)
            torch.manual_seed(seed)
            with torch.no_grad():
                clean_wrong = g(u).argmax(1) != yb
            u_adv = fab.attack_single_run(u, yb, use_rand_start=False, is_targeted=False)
            with torch.no_grad():
                fooled = g(u_adv).argmax(1) != yb
            delta = (2 * (u_adv - u)).flatten(1)
            d = {"l1": delta.abs().sum(1), "l2": delta.norm(dim=1), "linf": delta.abs().amax(1)}[norm]
            d = torch.where(fooled, d, torch.full_like(d, math.inf))
            out.append(torch.where(clean_wrong, torch.zeros_like(d), d).cpu())
    protocol = {"library": LIBRARY, "library_version": library_version(), "attack": "FAB (FABAttack_PT), untargeted",
                "norm": norm, "iterations": iterations, "restarts": restarts, "seed": seed,
                "scale": "distances doubled from [0, 1] to the model's [-1, 1] space"}
    return torch.cat(out), protocol
