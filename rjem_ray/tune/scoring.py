"""What a trial is scored with: the FID/KID/IS protocol of the sweep, and the preparation done once per sweep.

Every figure is computed by ``fidelity.fidelity_metrics`` against the training split in the feature space of
``evaluate.fid_feature_space`` (the extractor, its weights and the reference-statistics cache ``rjem eval``
uses), so a sweep's FID or KID is the one ``rjem eval`` reports for the same knobs.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..core.data import load_split, to_uint8
from ..core.devices import default_device
from ..evaluation.evaluate import evaluate_model
from ..evaluation.generation_metrics import fid_extractor_for, fid_feature_space
from ..method.prior import load_train_gmm
from ..method.restore import load_model
from ..robustness.autoattack import STANDARD_ATTACKS

# evaluation/fidelity.py is imported inside the functions that score (marked `# lazy: torch-fidelity, see top`):
# it imports torch-fidelity and torchvision (~1.5 s), and rjem_ray/cli.py's parser imports the tune package.


def feature_space(cfg: Config, train_imgs, train_labels) -> dict:
    """The sweep's FID/KID feature space: ``evaluate.fid_feature_space`` of the extractor ``rjem eval`` uses."""
    return fid_feature_space(cfg, fid_extractor_for(cfg), train_imgs, train_labels)


def score_samples(x, cfg: Config, metrics: tuple[str, ...] = ("fid", "kid", "is")) -> dict:
    """FID, KID and IS of generated images ``x`` (``[N, C, H, W]`` in [-1, 1]) with the protocol of ``cfg``.

    FID = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^½) of the extractor's features; KID is the unbiased
    MMD² with the cubic polynomial kernel k(a, b) = (aᵀb / d + 1)³ over subsets of min(1000, N) samples
    (``kid`` its mean, ``kid_std`` its spread over subsets). Both are in squared feature units; FID is biased
    upward at small N, KID is not. Returns the figures and ``protocol`` (extractor, sample and reference
    counts, reference set, weights digest, generation knobs).
    """
    from ..evaluation.fidelity import fidelity_metrics  # lazy: torch-fidelity, see top

    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir)
    res = fidelity_metrics(
        to_uint8(x), train_imgs, **feature_space(cfg, train_imgs, train_labels),
        fid="fid" in metrics, kid="kid" in metrics, isc="is" in metrics, isc_splits=min(10, len(x)),
    )
    proto = dict(res.pop("protocol"))
    proto["reference_set"] = f"{cfg.data.name} train split ({len(train_imgs)} images)"
    s = cfg.generate.sampler
    proto.update(generation_mode=cfg.generate.mode, conditional=cfg.generate.conditional,
                 sampler=f"{s.kind} steps={s.steps} inner={s.inner_steps} lr={s.step_size} noise={s.noise_std}")
    return {**res, "protocol": proto}


def prepare(cfg_dict: dict, scope: str, checkpoint: str | None, num_threads: int) -> dict:
    """Once per sweep, before any trial (a Ray task): the reference classifier, FID reference statistics,
    KID reference features and GMM are computed and cached, so concurrent trials only read them. Scope sample also measures the
    checkpoint's accuracy, robust accuracy (AutoAttack) and PGD robust accuracy here (the searched knobs
    cannot change them)."""
    torch.set_num_threads(max(1, num_threads))
    cfg = Config.from_dict(cfg_dict)
    test_imgs, _ = load_split(cfg.data.name, "test", cfg.data.data_dir, cfg.data.download)
    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    from ..evaluation.fidelity import fidelity_metrics  # lazy: torch-fidelity, see top

    space = feature_space(cfg, train_imgs, train_labels)
    warm = fidelity_metrics(  # a few real test images as "samples": what is cached is the reference side
        test_imgs[:64], train_imgs, **space, fid=True, kid=True, isc=False)
    protocol = {
        "extractor": space["extractor"], "num_samples": cfg.eval.fid_samples,
        "reference_set": f"{cfg.data.name} train split ({len(train_imgs)} images)",
        "reference_cache": space["reference_cache_name"], "weights": warm["protocol"]["weights"],
    }
    e = cfg.eval
    pgd = {"attack": "PGD, untargeted, random start", "norm": "linf", "eps": e.robust_eps,
           "eps_unit": "model input space [-1, 1]", "steps": e.robust_steps,
           "step_size": e.robust_step_size or 2.5 * e.robust_eps / e.robust_steps, "restarts": e.robust_restarts,
           "num_samples": min(e.robust_max_samples, len(test_imgs)), "split": f"{cfg.data.name} test"}
    aa = {"attack": "AutoAttack (pyautoattack, the fra31/auto-attack code)", "version": e.autoattack_version,
          "attacks": list(STANDARD_ATTACKS) if e.autoattack_version == "standard" else e.autoattack_attacks,
          "norm": "linf", "eps": e.robust_eps, "eps_unit": "model input space [-1, 1]",
          "eps_01_scale": e.robust_eps / 2, "num_samples": min(e.autoattack_max_samples, len(test_imgs)),
          "split": f"{cfg.data.name} test"}
    robust = {"robust_accuracy": aa, "pgd_robust_accuracy": pgd}
    out: dict = {"protocol": protocol, "robust_protocol": robust, "checkpoint_metrics": {}}
    if scope == "train" and cfg.uses_energy:
        load_train_gmm(cfg, train_imgs, train_labels)
    if scope == "sample":
        device = default_device()  # the GPU Ray assigned this trial, else CPU
        model, _ = load_model(checkpoint, map_location=device)
        res = evaluate_model(model, cfg, ["accuracy", "robust", "autoattack"])
        out["checkpoint_metrics"] = {k: res[k] for k in ("accuracy", "robust_accuracy", "pgd_robust_accuracy")}
    return out


