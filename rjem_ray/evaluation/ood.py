"""Out-of-distribution detection: the shifts a model is tested against and the scores that rank them.

A score ``s(x)`` is larger for inputs the model takes to be in distribution; a shift's figure is the AUROC
of "test image scores above shifted image" (:func:`rjem_ray.evaluation.metrics.ood_auroc`, scikit-learn's
``roc_auc_score``). All images are in the model's **[-1, 1]** space with the in-distribution shape.

Scores (JEM, Grathwohl et al. 2020, Table 3):

* ``logsumexp`` -- ``-E(x) = log Σ_k exp f(x)[k]``, the energy model's unnormalised log-density ``log p(x) + log Z``.
* ``max_softmax`` -- ``max_k softmax(f(x))[k]``, the classifier's baseline (Hendrycks & Gimpel 2017).
* ``grad_norm`` -- ``-‖∂E(x)/∂x‖₂`` (units: energy per [-1, 1] pixel unit), JEM's "approximate mass": a point
  of high density that also sits in a flat region of ``E`` scores high.

Shifts:

* ``uniform`` -- i.i.d. uniform noise on [-1, 1].
* ``gaussian`` -- ``N(0, 0.5²)`` noise, clamped to [-1, 1].
* ``smooth`` -- low-frequency noise: uniform noise at a quarter of the side, upsampled bilinearly (blobs).
* ``constant`` -- one random grey level (or colour) per image.
* ``photos`` -- crops of **real photographs** that ship inside packages this project depends on, so they
  exist offline: scikit-learn's ``china.jpg`` and ``flower.jpg`` (``sklearn.datasets.load_sample_images``)
  and matplotlib's ``grace_hopper.jpg`` (``matplotlib.cbook.get_sample_data``). Square crops of side
  between 1/8 and 1/2 of the photo's shorter side at random places, resized (antialiased) to the
  dataset's side, grey (channel mean) for grey datasets.
* ``inverted`` -- the in-distribution test images with their pixels negated (``-x``: white background,
  dark strokes for digits), a transformed copy of the data.
* a dataset name (``svhn``, ``cifar100``, ``cifar10``, ``mnist5k``) -- its test split through
  :func:`rjem_ray.core.data.load_split` (torchvision's own dataset classes for SVHN and CIFAR), converted to
  the in-distribution channels and side.

:class:`OODDetection` is ``rjem eval``'s ``ood`` metric: the suite of ``eval.ood_shifts`` and its headline figure.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.data import DATASETS, load_split, to_model_space
from ..method.energy import marginal_energy
from .metric_base import Metric, MetricResult
from .metrics import ood_auroc, predict_logits

if TYPE_CHECKING:
    from .metric_base import EvalContext

# eval.ood_shifts takes these (each described below): synthetic shifts, then the datasets; eval.ood_scores these
SHIFT_NAMES = ("uniform", "gaussian", "smooth", "constant", "photos", "inverted") + tuple(DATASETS)
SCORE_NAMES = ("logsumexp", "max_softmax", "grad_norm")

# eval.ood_shifts = [auto]: the suite of each dataset. Digits: noise, real photographs, a synthetic image and
# a transformed copy of the digits; natural images: the usual SVHN / CIFAR-100 (CIFAR-10 for the others),
# noise, photographs and a synthetic image.
DEFAULT_SHIFTS: dict[str, tuple[str, ...]] = {
    "mnist5k": ("uniform", "photos", "smooth", "inverted"),
    "cifar10": ("svhn", "cifar100", "uniform", "photos", "smooth"),
    "cifar100": ("svhn", "cifar10", "uniform", "photos", "smooth"),
    "svhn": ("cifar10", "cifar100", "uniform", "photos", "smooth"),
}

PHOTO_SOURCES = ("scikit-learn sample images china.jpg, flower.jpg; matplotlib sample data grace_hopper.jpg")


def shifts_for(dataset: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` with ``auto`` expanded to the dataset's :data:`DEFAULT_SHIFTS`, duplicates dropped, the
    in-distribution dataset itself refused (ValueError naming it)."""
    out: list[str] = []
    for name in names:
        for n in (DEFAULT_SHIFTS[dataset] if name == "auto" else (name,)):
            if n == dataset:
                raise ValueError(f"eval.ood_shifts: {n!r} is the in-distribution dataset; choose another shift")
            if n not in out:
                out.append(n)
    return out


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The shipped photographs as ``uint8 [H, W, 3]`` arrays."""
    # lazy: the photos shift only: scikit-learn (~1.7 s) and matplotlib ship the photographs, Pillow opens one
    from matplotlib import cbook
    from PIL import Image  # lazy: the photos shift only, as above
    from sklearn.datasets import load_sample_images  # lazy: the photos shift only, as above

    images = [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        images.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
    return tuple(images)


def photo_crops(n: int, channels: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random square crops of the shipped photographs, ``[n, channels, side, side]`` in [-1, 1]."""
    photos = _photos()
    out = torch.empty(n, channels, side, side)
    for i in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        h, w = img.shape[:2]
        short = min(h, w)
        c = int(torch.randint(short // 8, short // 2 + 1, (1,), generator=generator))
        top = int(torch.randint(h - c + 1, (1,), generator=generator))
        left = int(torch.randint(w - c + 1, (1,), generator=generator))
        crop = torch.from_numpy(np.ascontiguousarray(img[top:top + c, left:left + c])).permute(2, 0, 1).float()
        crop = F.interpolate(crop[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = _channels(crop[None], channels)[0] / 127.5 - 1
    return out.clamp(-1, 1)


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(1, keepdim=True)
    return x.repeat(1, channels // x.shape[1], 1, 1)


def shift_images(name: str, n: int, x_in: torch.Tensor, generator: torch.Generator,
                 data_dir: str | None = None) -> tuple[torch.Tensor, str]:
    """``(n images of shift name in [-1, 1] shaped like x_in's, a one-line description)``.

    ``x_in`` (in-distribution test images, [-1, 1]) gives the shape and, for ``inverted``, the images.
    """
    c, side = x_in.shape[1], x_in.shape[-1]
    shape = (n,) + tuple(x_in.shape[1:])
    if name == "uniform":
        return torch.rand(shape, generator=generator) * 2 - 1, "uniform noise on [-1, 1]"
    if name == "gaussian":
        return (torch.randn(shape, generator=generator) * 0.5).clamp(-1, 1), "Gaussian noise (std 0.5, clamped)"
    if name == "smooth":
        low = torch.rand((n, c, max(side // 4, 2), max(side // 4, 2)), generator=generator) * 2 - 1
        x = F.interpolate(low, size=tuple(x_in.shape[-2:]), mode="bilinear", align_corners=False)
        return x, f"uniform noise at {low.shape[-1]}x{low.shape[-1]} upsampled bilinearly (smooth blobs)"
    if name == "constant":
        return ((torch.rand((n, c, 1, 1), generator=generator) * 2 - 1).expand(shape).contiguous(),
                "constant images, one uniform random level per image and channel")
    if name == "photos":
        return photo_crops(n, c, side, generator), (
            f"crops of real photographs shipped offline ({PHOTO_SOURCES}), side 1/8-1/2 of the photo's, "
            f"resized to {side}x{side}" + (", grey" if c == 1 else ""))
    if name == "inverted":
        idx = torch.randperm(len(x_in), generator=generator)[:n]
        return -x_in[idx].cpu(), "the test images negated (-x)"
    if name in DATASETS:
        imgs, _ = load_split(name, "test", data_dir)
        idx = torch.randperm(len(imgs), generator=generator)[:n]
        x = _channels(to_model_space(imgs[idx]), c)
        if x.shape[-2:] != x_in.shape[-2:]:
            x = F.interpolate(x, size=tuple(x_in.shape[-2:]), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(-1, 1), f"{name} test split ({len(x)} drawn at random)"
    raise ValueError(f"unknown OOD shift {name!r}; allowed: auto, {', '.join(SHIFT_NAMES)}")


def ood_scores(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, score: str,
               batch_size: int = 256) -> torch.Tensor:
    """Per-image score ``[N]`` (float32, CPU) of :data:`SCORE_NAMES`; larger = more in distribution."""
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown OOD score {score!r}; allowed: {', '.join(SCORE_NAMES)}")
    if score != "grad_norm":
        logits = predict_logits(model, x, batch_size).float().cpu()
        return -marginal_energy(logits) if score == "logsumexp" else logits.softmax(1).amax(1)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(marginal_energy(model(xb).float()).sum(), xb)
        out.append(-grad.flatten(1).norm(dim=1).detach().cpu())
    return torch.cat(out)


def ood_report(model, x_in: torch.Tensor, shifts: list[str], scores: list[str], n: int,
               generator: torch.Generator, data_dir: str | None = None, batch_size: int = 256) -> tuple[dict, dict]:
    """``({shift: {score: AUROC}}, protocol)``: each shift's ``n`` images against the ``x_in`` test images."""
    s_in = {s: ood_scores(model, x_in, s, batch_size) for s in scores}
    figures, described = {}, {}
    for shift in shifts:
        x_out, desc = shift_images(shift, n, x_in, generator, data_dir)
        figures[shift] = {s: ood_auroc(s_in[s], ood_scores(model, x_out, s, batch_size)) for s in scores}
        described[shift] = {"images": desc, "num_out": len(x_out)}
    protocol = {
        "auroc": "sklearn.metrics.roc_auc_score, test images positive (label 1): P(s_in > s_out) + 1/2 P(tie)",
        "scores": {"logsumexp": "-E(x) = logsumexp_k f(x)[k]", "max_softmax": "max_k softmax(f(x))[k]",
                   "grad_norm": "-||dE/dx||_2 in [-1, 1] pixel units (JEM's approximate mass)"},
        "num_in": len(x_in), "shifts": described,
    }
    return figures, protocol


class OODDetection(Metric):
    """``ood``: per shift of ``eval.ood_shifts`` (``eval.ood_samples`` images each) and per score of
    ``eval.ood_scores``, the AUROC in [0, 1] of "a test image scores above a shifted one" (0.5: chance), as
    ``ood`` ``{shift: {score: AUROC}}``; the headline ``ood_auroc`` is the worst shift under logsumexp.
    Protocol (``protocol.ood_auroc``): the AUROC, the scores, each shift's images, the headline's shift."""

    name = "ood"
    protocol_key = "ood_auroc"
    config_keys = ("eval.ood_shifts", "eval.ood_scores", "eval.ood_samples")

    def run(self, ctx: EvalContext) -> MetricResult:
        e, data = ctx.cfg.eval, ctx.cfg.data
        shifts = shifts_for(data.name, e.ood_shifts)
        ctx.progress(f"OOD AUROC against {', '.join(shifts)} ({', '.join(e.ood_scores)})")
        figures, proto = ood_report(ctx.model, ctx.x, shifts, list(e.ood_scores), e.ood_samples,
                                    torch.Generator().manual_seed(ctx.seed), data.data_dir, ctx.batch_size)
        worst = min(shifts, key=lambda s: figures[s]["logsumexp"])
        return MetricResult({"ood": figures, "ood_auroc": figures[worst]["logsumexp"]},
                            {**proto, "in": f"{data.name} test split",
                             "headline": f"ood_auroc = the worst shift under logsumexp ({worst})"})
