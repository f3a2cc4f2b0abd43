"""The generation metrics of ``rjem eval``: ``fid`` and ``is`` of samples drawn from the model.

Both measure one set of ``eval.fid_samples`` samples, generated once (``generate.generate`` in
``generate.mode``, from the checkpoint's Gaussian-mixture prior, classes cycled, seeded), against the
training split in the feature space of ``eval.fid_extractor`` (``fid_feature_space``; the figures themselves
by ``fidelity.fidelity_metrics``). With ``fid``, the same figures in a second feature space
(``eval.fid_second_extractor``), the no-op baseline of the seeds alone, and precision / recall. The protocol
(extractor, sample and reference counts, generation mode, sampler, ...) is one block for both, ``protocol_fidelity``
in ``evaluate_model``'s result (``protocol.fidelity`` in ``rjem eval``'s).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.data import dataset_info, load_split, to_uint8
from ..method.prior import load_train_gmm
from .generate import generate
from .metric_base import Metric, MetricResult, Progress

if TYPE_CHECKING:
    from ..config import Config
    from .metric_base import EvalContext

IS_FIGURES = ("inception_score", "inception_score_std")
# eval.fid_extractor: auto = inception for natural images, reference-classifier for digits (fid_extractor_for)
FID_EXTRACTORS = ("auto", "inception", "reference-classifier", "robust-reference-classifier")
FIDELITY_KEYS = ("eval.fid_samples", "eval.fid_extractor", "eval.fid_second_extractor", "eval.inception_weights",
                 "eval.prc_neighborhood", "generate", "cache_dir")


def fid_extractor_for(cfg: Config) -> str:
    """The extractor of ``eval.fid_extractor``; ``auto``: inception, or reference-classifier for grayscale data."""
    if cfg.eval.fid_extractor != "auto":
        return cfg.eval.fid_extractor
    return "reference-classifier" if dataset_info(cfg.data.name).channels == 1 else "inception"


def second_fid_extractor_for(cfg: Config) -> str | None:
    """The extractor of the second FID/KID (``eval.fid_second_extractor``), or None."""
    name = cfg.eval.fid_second_extractor
    if name == "auto":
        return "robust-reference-classifier" if fid_extractor_for(cfg) == "reference-classifier" else None
    return None if name == "none" else name


def fid_feature_space(cfg: Config, extractor: str, train_imgs, train_labels,
                      progress: Progress = lambda s: None) -> dict:
    """The ``fidelity_metrics`` keywords that fix ``extractor``'s feature space for ``cfg``'s dataset.

    ``extractor``, its ``weights_path`` (``eval.inception_weights``, or the dataset's plain or robust
    reference classifier, trained once and cached under ``cache_dir``), and where the training split's
    reference statistics are cached (``cache_dir/fidelity``, ``DATASET-train-EXTRACTOR``): every FID/KID of
    the project (``rjem eval``, the sweeps) uses these names, so the statistics are computed once.
    """
    if extractor == "inception":
        weights = cfg.eval.inception_weights
    else:
        # lazy: reference_classifier and fidelity import torch-fidelity and torchvision (~1.5 s), and the config
        # imports this module
        from .reference_classifier import load_or_train_reference_classifier

        progress(f"{extractor} for FID (trained once per dataset, cached)")
        weights = str(load_or_train_reference_classifier(
            Path(cfg.cache_dir), cfg.data.name, train_imgs, train_labels, dataset_info(cfg.data.name).num_classes,
            kind=extractor))
    return {"extractor": extractor, "weights_path": weights, "cache_root": str(Path(cfg.cache_dir) / "fidelity"),
            "reference_cache_name": f"{cfg.data.name}-train-{extractor}"}


def seed_images(gmm, n: int, seed: int, batch_size: int) -> torch.Tensor:
    """The Gaussian-mixture seeds that ``generate`` starts from for the same ``n``, seed and batch size.

    ``generate`` cycles the classes and draws ``gmm.sample`` batch by batch from one generator seeded
    with ``seed``; drawing the same way gives exactly its starting points, with no model involved.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % gmm.num_classes
    return torch.cat([gmm.sample(len(yb), classes=yb, generator=g)[0] for yb in y.split(batch_size)])


def fidelity_figures(model, cfg: Config, gmm, metrics, device, progress: Progress, seed: int) -> dict:
    """The figures of ``fid`` and ``is`` (those of ``metrics``), computed together on one set of samples, and
    their protocol under ``protocol_fidelity``."""
    from .fidelity import fidelity_metrics, prc_reference  # lazy: torch-fidelity, see fid_feature_space

    e = cfg.eval
    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir)
    if gmm is None:
        gmm = load_train_gmm(cfg, train_imgs, train_labels)
    n = e.fid_samples
    progress(f"generating {n} samples ({cfg.generate.mode} mode) for FID/IS")
    x_gen, _ = generate(model.net, gmm, cfg.generate, n=n, generator=torch.Generator().manual_seed(seed), device=device,
                        precision=model.precision, progress=progress)
    samples = to_uint8(x_gen)
    extractor = fid_extractor_for(cfg)
    spaces = {extractor: fid_feature_space(cfg, extractor, train_imgs, train_labels, progress)}
    progress(f"FID/KID/IS with the {extractor} extractor")
    res = fidelity_metrics(samples, train_imgs, **spaces[extractor], device=device,
                           fid="fid" in metrics, kid="fid" in metrics, isc="is" in metrics)
    out = {k: v for k, v in res.items() if k != "protocol"}
    proto = dict(res.get("protocol", {}))
    second = second_fid_extractor_for(cfg) if "fid" in metrics else None
    if second is not None:
        spaces[second] = fid_feature_space(cfg, second, train_imgs, train_labels, progress)
        progress(f"FID/KID with the {second} extractor")
        res2 = fidelity_metrics(samples, train_imgs, **spaces[second], device=device, fid=True, kid=True, isc=False)
        out.update(fid_2=res2["fid"], kid_2=res2["kid"], kid_2_std=res2["kid_std"])
        proto["second_extractor"] = res2["protocol"]
    if "fid" in metrics:
        # The no-op baseline: the Gaussian-mixture seeds themselves (same classes, same draws, no model),
        # in both feature spaces. A generation mode that does not beat this row has not helped.
        progress("FID/KID of the Gaussian-mixture seeds alone (the no-op baseline)")
        seeds = seed_images(gmm, n, seed, cfg.generate.batch_size)
        for suffix, name in (("", extractor), ("_2", second)):
            if name is None:
                continue
            r = fidelity_metrics(to_uint8(seeds), train_imgs, **spaces[name], device=device, fid=True, kid=True,
                                 isc=False)
            out[f"fid{suffix}_seeds"], out[f"kid{suffix}_seeds"] = r["fid"], r["kid"]
        # Diversity: precision / recall of the samples and of their seeds against as many training images, in
        # the first feature space (the FID's).
        progress("precision / recall of the samples and of their seeds")
        ref, tag = prc_reference(train_imgs, min(n, len(train_imgs)))
        space = {**spaces[extractor], "reference_cache_name": spaces[extractor]["reference_cache_name"] + tag}
        for suffix, imgs in (("", samples), ("_seeds", to_uint8(seeds))):
            r = fidelity_metrics(imgs, ref, **space, device=device, fid=False, isc=False, prc=True,
                                 prc_neighborhood=e.prc_neighborhood)
            out[f"precision{suffix}"], out[f"recall{suffix}"] = r["precision"], r["recall"]
        proto["precision_recall"] = {
            "method": "Kynkäänniemi et al. 2019 (torch-fidelity prc): k-th nearest-neighbour balls in the "
                      f"{extractor} features, k = {e.prc_neighborhood}",
            "num_samples": n, "num_reference": len(ref),
            "reference": f"{len(ref)} {cfg.data.name} training images drawn at random (seed 0)",
        }
    s = cfg.generate.sampler
    proto.update({
        "generation_mode": cfg.generate.mode, "conditional": cfg.generate.conditional,
        "classes": "cycled 0..K-1", "reference_set": f"{cfg.data.name} train split ({len(train_imgs)} images)",
        "pgd_norm": cfg.generate.pgd_norm, "pgd_eps": cfg.generate.pgd_eps, "pgd_steps": cfg.generate.pgd_steps,
        "contrast": cfg.generate.contrast, "contrast_center": cfg.generate.contrast_center,
        "sampler": f"{s.kind} steps={s.steps} inner={s.inner_steps} lr={s.step_size} noise={s.noise_std} "
                   f"outer_lr={s.outer_step_size}",
        "kid_subset_size": min(1000, n, len(train_imgs)),
    })
    return {**out, "protocol_fidelity": proto}


def _shared_fidelity(ctx: EvalContext) -> dict:
    """:func:`fidelity_figures` of the requested ones of ``fid`` and ``is``, computed once for both."""
    return ctx.once("fidelity", lambda: fidelity_figures(ctx.model, ctx.cfg, ctx.gmm, ctx.requested, ctx.device,
                                                         ctx.progress, ctx.seed))


class FrechetInceptionDistance(Metric):
    """``fid``: FID and KID of the samples against the training split in the first feature space (``fid``,
    ``kid``, ``kid_std``; lower is better, squared feature units, comparable only within one extractor), in
    the second (``fid_2``, ``kid_2``, ``kid_2_std``), the same for the seeds alone (``fid_seeds``, ...), and
    precision / recall of samples and seeds (fractions in [0, 1]). Protocol: ``protocol_fidelity``."""

    name = "fid"
    config_keys = FIDELITY_KEYS
    needs_prior = True

    def run(self, ctx: EvalContext) -> MetricResult:
        return MetricResult({k: v for k, v in _shared_fidelity(ctx).items() if k not in IS_FIGURES})


class InceptionScore(Metric):
    """``is``: the Inception Score ``exp E_x KL(p(y|x) ‖ p(y))`` of the samples in the first feature space's
    logits (``inception_score``, mean over 10 splits, and its ``inception_score_std``); unitless, 1 to the
    number of classes, higher is better. Protocol: ``protocol_fidelity``."""

    name = "is"
    config_keys = FIDELITY_KEYS
    needs_prior = True

    def run(self, ctx: EvalContext) -> MetricResult:
        res = _shared_fidelity(ctx)
        return MetricResult({k: res[k] for k in (*IS_FIGURES, "protocol_fidelity")})
