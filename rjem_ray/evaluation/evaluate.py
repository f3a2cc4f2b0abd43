"""``rjem eval``: accuracy, robust accuracy, calibration, OOD detection, FID and IS of a checkpoint.

Every figure comes with its protocol (split, number of samples, ε and its unit, attack steps, reference
set, feature extractor), because a figure without one cannot be compared. ε is given in the model's
[-1, 1] input space and, for convenience, on the [0, 1] pixel scale (half of it).

Robustness: ``robust_accuracy`` is AutoAttack's (metric ``autoattack``, ``rjem_ray/robustness/autoattack.py``), the
figure the field accepts; ``pgd_robust_accuracy`` is our PGD (metric ``robust``), a cheap signal that
overstates robustness when gradients are masked; ``masking`` holds the gradient-masking report
(``rjem_ray/evaluation/masking.py``) and its warnings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..config import METRIC_NAMES, Config, ConfigError
from ..core.data import dataset_info, load_split, to_model_space, to_uint8

Progress = Callable[[str], None]


def fid_extractor_for(cfg: Config) -> str:
    if cfg.eval.fid_extractor != "auto":
        return cfg.eval.fid_extractor
    return "reference-classifier" if dataset_info(cfg.data.name).channels == 1 else "inception"


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
        from .fidelity import load_or_train_reference_classifier

        progress(f"{extractor} for FID (trained once per dataset, cached)")
        weights = str(load_or_train_reference_classifier(
            Path(cfg.cache_dir), cfg.data.name, train_imgs, train_labels, dataset_info(cfg.data.name).num_classes,
            kind=extractor))
    return {"extractor": extractor, "weights_path": weights, "cache_root": str(Path(cfg.cache_dir) / "fidelity"),
            "reference_cache_name": f"{cfg.data.name}-train-{extractor}"}


def evaluate_model(
    model,
    cfg: Config,
    metrics: list[str] | None = None,
    gmm=None,
    progress: Progress = lambda s: None,
    seed: int = 0,
    artifact_dir: str | Path | None = None,
) -> dict:
    """Compute the requested metrics on the test split; returns the figures and a ``protocol`` block.

    ``artifact_dir`` (or ``eval.artifact_dir`` when set) receives the files a metric draws (min-norm's
    plot and per-image CSV); with neither, no files are written."""
    metrics = list(metrics or cfg.eval.metrics)
    for m in metrics:
        if m not in METRIC_NAMES:
            raise ConfigError(f"--metrics: {m!r} is not a metric; choose from {', '.join(METRIC_NAMES)}")
    from .metrics import accuracy, expected_bayes_ratio, expected_calibration_error, predict_logits, robust_accuracy

    e = cfg.eval
    device = next(model.parameters()).device
    model.eval()
    # Every metric's passes under train.precision's autocast (logits in fp32; speed.py).
    from ..method.speed import FastNet

    model = FastNet(model, precision=cfg.train.precision, device=device).eval()
    imgs, labels = load_split(cfg.data.name, "test", cfg.data.data_dir)
    x, y = to_model_space(imgs).to(device), labels.to(device)
    out: dict = {"protocol": {"dataset": cfg.data.name, "split": "test", "num_test": len(y),
                              "precision": model.precision}}
    g = torch.Generator().manual_seed(seed)
    if "accuracy" in metrics or "ece" in metrics or "ebr" in metrics:
        progress("accuracy / calibration")
        logits = predict_logits(model, x, e.batch_size)
        if "accuracy" in metrics:
            out["accuracy"] = accuracy(model, x, y, e.batch_size)
        if "ece" in metrics:
            out["ece"] = expected_calibration_error(logits.softmax(1).cpu(), y.cpu(), e.ece_bins)
            out["protocol"]["ece"] = {"bins": e.ece_bins, "binning": "equal-width confidence", "num_samples": len(y)}
        if "ebr" in metrics:
            out["ebr"], hist = expected_bayes_ratio(logits.softmax(1).cpu(), y.cpu(), e.ece_bins, e.ebr_pseudo_count)
            out["protocol"]["ebr"] = {
                "definition": "E[BR] = sum_b P(b) O(C|b)/O(C), odds of a correct prediction given its confidence bin "
                              "over the prior odds (Finlay & Oberman 2019)",
                "uncertainty_metric": "max softmax probability", "bins": e.ece_bins,
                "binning": "equal-width confidence (b/bins, (b+1)/bins]", "pseudo_count": e.ebr_pseudo_count,
                "num_samples": len(y), "histogram": hist,
            }

    def subset(max_samples: int) -> tuple[torch.Tensor, str]:
        # A seeded random subset: test files are often sorted by class, so the first n would not be
        # representative (the first 200 mnist5k test digits are classes 0-3 only). One permutation per
        # seed, so PGD, AutoAttack and the masking report share their images when their sizes agree.
        n = min(max_samples, len(y))
        sub = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].to(device)
        return sub, "all test images" if n == len(y) else f"{n} drawn at random (seed {seed})"

    if "robust" in metrics:
        # PGD: a cheap signal (and the training-time one); the reported robust accuracy is AutoAttack's.
        sub, how = subset(e.robust_max_samples)
        n = len(sub)
        step = e.robust_step_size or 2.5 * e.robust_eps / e.robust_steps
        progress(f"PGD robust accuracy: PGD-{e.robust_steps} at eps {e.robust_eps} on {n} images")
        out["pgd_robust_accuracy"] = robust_accuracy(
            model, x[sub], y[sub], eps=e.robust_eps, steps=e.robust_steps, step_size=step, norm="linf",
            restarts=e.robust_restarts, batch_size=e.batch_size, generator=g,
        )
        out["protocol"]["pgd_robust_accuracy"] = {
            "attack": "PGD, untargeted, random start", "norm": "linf", "eps": e.robust_eps,
            "eps_unit": "model input space [-1, 1]", "eps_01_scale": e.robust_eps / 2,
            "steps": e.robust_steps, "step_size": step, "restarts": e.robust_restarts, "num_samples": n,
            "subset": how,
        }
    aa_result = None
    if "autoattack" in metrics or "masking" in metrics:
        from ..robustness.autoattack import autoattack_robust

        sub, how = subset(e.autoattack_max_samples)
        x_aa, y_aa = x[sub], y[sub]
    if "autoattack" in metrics:
        attacks = e.autoattack_attacks if e.autoattack_version == "custom" else None
        progress(f"robust accuracy: AutoAttack ({e.autoattack_version}) at eps {e.robust_eps} on {len(sub)} images")
        aa_result = autoattack_robust(
            model, x_aa, y_aa, eps=e.robust_eps, norm="linf", version=e.autoattack_version, attacks=attacks,
            seed=seed, batch_size=e.batch_size, subset=how, progress=progress,
        )
        out["robust_accuracy"] = aa_result[0].double().mean().item()
        out["protocol"]["robust_accuracy"] = aa_result[1]
    if "masking" in metrics:
        from .masking import masking_report

        report = masking_report(
            model, x_aa, y_aa, eps=e.robust_eps, norm="linf", eps_factors=e.masking_eps_factors,
            pgd_steps=e.robust_steps, pgd_restarts=e.robust_restarts, autoattack=aa_result, seed=seed,
            batch_size=e.batch_size, progress=progress,
        )
        report["subset"] = how
        out["masking"] = report
    if "min-norm" in metrics:
        out["min_norm"], out["protocol"]["min_norm"] = _min_norm(model, x, y, cfg, subset, seed, progress,
                                                                 e.artifact_dir or artifact_dir)
        # flat scalars beside the block, for train.eval_metrics / MLflow (which keep numbers only)
        for run, r in out["min_norm"].items():
            if r["median"] is not None:
                out[f"min_norm_median_{run.replace('-', '_')}"] = r["median"]
    if "certified" in metrics:
        from ..robustness.certify import certified_report

        sub, how = subset(e.certify_max_samples)
        out["certified"] = certified_report(
            model, x[sub], y[sub], sigma=e.certify_sigma, n0=e.certify_n0, n=e.certify_n, alpha=e.certify_alpha,
            radii=e.certify_radii, methods=e.certify_methods, num_classes=dataset_info(cfg.data.name).num_classes,
            batch_size=e.batch_size, seed=seed, progress=progress,
        )
        for method, block in out["certified"].items():  # flat scalars, as for min-norm
            for r, acc in zip(block["radii"], block["certified_accuracy"]):
                out[f"certified_accuracy_{method}_r{r:g}"] = acc
        out["protocol"]["certified"] = {
            "norm": "l2", "sigma": e.certify_sigma, "sigma_01": e.certify_sigma / 2,
            "units": "sigma and radii in the model's [-1, 1] space; *_01 on the [0, 1] scale (half)",
            "methods": list(e.certify_methods), "num_samples": len(sub), "subset": how, "seed": seed,
            "test_indices": sub.cpu().tolist(),
            "smoothing": {"method": "CERTIFY (Cohen et al. 2019): n0 copies choose the class, n copies bound its "
                                    "probability (one-sided Clopper-Pearson), radius sigma * Phi^-1(p_lower), "
                                    "abstain if p_lower <= 1/2", "n0": e.certify_n0, "n": e.certify_n,
                          "alpha": e.certify_alpha, "noise": "N(0, sigma^2 I), not clamped"},
            "gaussian_average": {"method": "one evaluation: R = sigma/2 (Phi^-1(p_A) - Phi^-1(p_B)) of the softmax, a "
                                           "certificate only if the model is a Gaussian average at sigma (trained "
                                           "for it, Campbell et al.); a heuristic radius otherwise"},
        }
    if "ood" in metrics:
        from .ood import ood_report, shifts_for

        shifts = shifts_for(cfg.data.name, e.ood_shifts)
        progress(f"OOD AUROC against {', '.join(shifts)} ({', '.join(e.ood_scores)})")
        out["ood"], proto = ood_report(model, x, shifts, list(e.ood_scores), e.ood_samples,
                                       torch.Generator().manual_seed(seed), cfg.data.data_dir, e.batch_size)
        worst = min(shifts, key=lambda s: out["ood"][s]["logsumexp"])
        out["ood_auroc"] = out["ood"][worst]["logsumexp"]
        out["protocol"]["ood_auroc"] = {**proto, "in": f"{cfg.data.name} test split",
                                        "headline": f"ood_auroc = the worst shift under logsumexp ({worst})"}
    if "fid" in metrics or "is" in metrics:
        out.update(_fidelity(model, cfg, gmm, metrics, device, progress, seed))
    return out


def _min_norm(model, x, y, cfg: Config, subset, seed: int, progress: Progress, artifact_dir) -> tuple[dict, dict]:
    """``(min_norm block, its protocol)`` (``rjem_ray/robustness/minnorm.py``): per run, distances, median, robust-accuracy curve;
    FAB (pyautoattack) as the reference where ``eval.min_norm_reference`` is fab."""
    from ..robustness.minnorm import MU_DEFAULT, min_norm_report

    e = cfg.eval
    sub, how = subset(e.min_norm_max_samples)
    xs, ys = x[sub], y[sub]
    reference = None
    if e.min_norm_reference == "fab":
        from ..robustness.autoattack import FAB_NORMS, fab_min_norm

        def reference(norm):
            if norm not in FAB_NORMS:
                return None
            progress(f"min-norm reference: FAB {norm} on {len(ys)} images")
            return fab_min_norm(model, xs, ys, norm=norm, iterations=e.min_norm_reference_iterations, seed=seed,
                                batch_size=e.batch_size)
    runs = min_norm_report(
        model, xs, ys, runs=e.min_norm_runs, outer_steps=e.min_norm_outer_steps, inner_steps=e.min_norm_inner_steps,
        mu=e.min_norm_mu, mu_decay=e.min_norm_mu_decay, targets=e.min_norm_targets, curve_points=e.min_norm_curve_points,
        batch_size=e.batch_size, seed=seed, reference=reference, progress=progress,
    )
    protocol = {
        "attacks": "LogBarrier (Finlay et al. 2019), ProxLogBarrier (Pooladian et al. 2019); rjem_ray/robustness/minnorm.py",
        "runs": list(e.min_norm_runs), "outer_steps": e.min_norm_outer_steps, "inner_steps": e.min_norm_inner_steps,
        "mu": e.min_norm_mu if e.min_norm_mu is not None else {"per norm": dict(MU_DEFAULT)}, "mu_decay": e.min_norm_mu_decay,
        "targets": e.min_norm_targets, "starts": "the untargeted start (noise / margin ascent, bisected) and a targeted "
                   "margin-ascent start toward each of the `targets` most likely wrong classes; the closest result kept; "
                   "L0's ascent moves the 1 % of entries of largest gradient (sparse), the others' are L2 / sign steps",
        "num_samples": len(ys), "subset": how, "seed": seed,
        "test_indices": sub.cpu().tolist(), "labels": ys.cpu().tolist(),
        "units": "L1/L2/Linf distances in the model's [-1, 1] space (fields without suffix) and on the [0, 1] "
                 "scale (suffix _01, half); L0 counts changed pixels (any channel) on both",
        "median_over": "images the attack broke (finite, non-zero distance)",
        "reference": e.min_norm_reference,
    }
    if artifact_dir is not None:
        protocol["files"] = write_min_norm_artifacts(runs, protocol, Path(artifact_dir))
    return runs, protocol


def write_min_norm_artifacts(runs: dict, protocol: dict, directory: Path) -> list[str]:
    """``min_norm.png`` (robust accuracy vs ε on the [0, 1] scale, one panel per norm, FAB dashed) and
    ``min_norm_distances.csv`` (one row per image: test index, label, each run's distance in [-1, 1] units)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..robustness.minnorm import robust_curve

    directory.mkdir(parents=True, exist_ok=True)
    norms = list(dict.fromkeys(r["norm"] for r in runs.values()))
    fig, axes = plt.subplots(1, len(norms), figsize=(4 * len(norms), 3.2), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for name, r in runs.items():
            if r["norm"] != norm:
                continue
            ax.plot(r["curve"]["eps_01"], r["curve"]["robust_accuracy"], label=r["attack"])
            if "reference_distances" in r and not any("FAB" in line.get_label() for line in ax.lines):
                d = torch.tensor([math.inf if v is None else v for v in r["reference_distances"]])
                ax.plot(r["curve"]["eps_01"], robust_curve(d, r["curve"]["eps"]), "--", label="FAB (pyautoattack)")
        ax.set_xlabel("ε, changed pixels" if norm == "l0" else f"ε ({norm}, [0, 1] scale)")
        ax.set_ylabel("robust accuracy (upper bound)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"minimum-norm attacks, {protocol['num_samples']} images", fontsize=9)
    fig.tight_layout()
    png = directory / "min_norm.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    path = directory / "min_norm_distances.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_index", "label"] + list(runs))
        cols = [r["distances"] for r in runs.values()]
        for i, (idx, lab) in enumerate(zip(protocol["test_indices"], protocol["labels"])):
            w.writerow([idx, lab] + ["inf" if c[i] is None else c[i] for c in cols])
    return [str(png), str(path)]


def seed_images(gmm, n: int, seed: int, batch_size: int) -> torch.Tensor:
    """The Gaussian-mixture seeds that ``generate`` starts from for the same ``n``, seed and batch size.

    ``generate`` cycles the classes and draws ``gmm.sample`` batch by batch from one generator seeded
    with ``seed``; drawing the same way gives exactly its starting points, with no model involved.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % gmm.num_classes
    return torch.cat([gmm.sample(len(yb), classes=yb, generator=g)[0] for yb in y.split(batch_size)])


def second_fid_extractor_for(cfg: Config) -> str | None:
    """The extractor of the second FID/KID (``eval.fid_second_extractor``), or None."""
    name = cfg.eval.fid_second_extractor
    if name == "auto":
        return "robust-reference-classifier" if fid_extractor_for(cfg) == "reference-classifier" else None
    return None if name == "none" else name


def _fidelity(model, cfg: Config, gmm, metrics, device, progress: Progress, seed: int) -> dict:
    from .fidelity import fidelity_metrics, prc_reference
    from .generate import generate

    e = cfg.eval
    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir)
    if gmm is None:
        from ..method.prior import load_train_gmm

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
        "pgd_norm": cfg.generate.pgd_norm, "pgd_eps": cfg.generate.pgd_eps, "pgd_steps": cfg.generate.pgd_steps, "contrast": cfg.generate.contrast,
        "contrast_center": cfg.generate.contrast_center,
        "sampler": f"{s.kind} steps={s.steps} inner={s.inner_steps} lr={s.step_size} noise={s.noise_std} "
                   f"outer_lr={s.outer_step_size}",
        "kid_subset_size": min(1000, n, len(train_imgs)),
    })
    return {**out, "protocol_fidelity": proto}


def default_artifact_dir(checkpoint_dir: str | Path) -> Path:
    """Where ``rjem eval`` writes the files a metric draws when ``eval.artifact_dir`` is not set: a folder of
    their own per checkpoint, ``PARENT/eval-NAME`` beside the checkpoint directory ``PARENT/NAME``, so two
    checkpoints of one folder do not overwrite each other's (``rjem eval`` of a ``models:/``/``runs:/`` URI,
    whose download is temporary, passes ``./rjem-eval/<URI>`` instead; ``cli.eval_artifact_dir``)."""
    d = Path(checkpoint_dir).resolve()
    return d.parent / f"eval-{d.name}"


def evaluate_checkpoint(path: str | Path, metrics: list[str] | None = None, overrides: list[str] | None = None,
                        progress: Progress = lambda s: None, device: str | torch.device | None = None,
                        artifact_dir: str | Path | None = None) -> dict:
    """``rjem eval``: the checkpoint's model on ``device`` (None/"auto": the GPU this process was given,
    else CPU; ``devices.resolve_device``), every metric computed there. Drawn files go to ``eval.artifact_dir``,
    else ``artifact_dir``, else :func:`default_artifact_dir` of the checkpoint."""
    from ..method.checkpoint import load_model
    from ..config import apply_overrides
    from ..core.devices import resolve_device
    from ..method.prior import gmm_for_checkpoint

    model, cfg = load_model(path, map_location=resolve_device(device))
    if overrides:
        cfg = Config.from_dict(apply_overrides(cfg.to_dict(), overrides))
    gmm = gmm_for_checkpoint(cfg, path) if any(m in (metrics or cfg.eval.metrics) for m in ("fid", "is")) else None
    result = evaluate_model(model, cfg, metrics, gmm=gmm, progress=progress,
                            artifact_dir=artifact_dir or default_artifact_dir(path))
    if "protocol_fidelity" in result:
        result["protocol"]["fidelity"] = result.pop("protocol_fidelity")
    result["checkpoint"] = str(Path(path).resolve())
    result["protocol"]["device"] = str(next(model.parameters()).device)
    return result
