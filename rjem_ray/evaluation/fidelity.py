"""Inception Score, FID, KID and precision/recall through torch-fidelity, in a chosen feature space.

All figures are computed by ``torch_fidelity.calculate_metrics`` (:func:`fidelity_metrics`) from features
``φ(x)`` of a fixed network:

* FID ``= ‖μ_s − μ_r‖² + tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^{1/2})``, features of samples (s) and reference (r);
* KID, the unbiased polynomial-kernel MMD² of the same features (Bińkowski et al. 2018);
* IS  ``= exp E_x KL(p(y|x) ‖ p(y))`` from softmax of logits, averaged over ``isc_splits`` splits;
* precision / recall, k-th nearest-neighbour balls in the features (Kynkäänniemi et al. 2019).

Feature extractors (``extractor=``):

* ``"inception"`` — torch-fidelity's ``inception-v3-compat`` (2048-d pool features, unbiased logits).
  Its weights are downloaded on first use, or read from ``weights_path`` on an offline cluster.
* ``"reference-classifier"`` and ``"robust-reference-classifier"`` — a small CNN trained once per dataset,
  plainly or adversarially: its 128-d penultimate features and its logits
  (``rjem_ray/evaluation/reference_classifier.py``, which registers it with torch-fidelity).

Images enter as ``uint8`` NCHW in [0, 255]; grayscale is repeated to three channels for torch-fidelity
(the reference classifier reads channel 0 back). Reference statistics are cached by torch-fidelity under
``cache_root``; for the reference classifier the cache name includes a digest of its weights file, so a
retrained classifier never reuses stale statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from .._torchvision_compat import ensure_torchvision_importable
from ..core.devices import default_device

ensure_torchvision_importable()  # torch_fidelity imports torchvision; also when rjem_ray/__init__ did not run

import torch_fidelity  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

# registers the reference classifier's feature extractor with torch-fidelity
from .reference_classifier import (  # noqa: E402
    REFERENCE_EXTRACTOR,
    REFERENCE_KINDS,
    as_uint8_images,
    reference_classifier_meta,
)

INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTORS = {
    "inception": INCEPTION_EXTRACTOR,
    "reference-classifier": REFERENCE_EXTRACTOR,
    "robust-reference-classifier": REFERENCE_EXTRACTOR,  # same network and glue, adversarially trained weights
}


class _UInt8Images(Dataset):
    """torch-fidelity input: item ``i`` is ``uint8`` 3×H×W (grayscale repeated to three channels)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _file_digest(path: str | os.PathLike, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _check_cache_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.strip() != name or os.sep in name or "/" in name:
        raise ValueError(f"reference_cache_name must be a plain non-empty name (no path separators), got {name!r}")


def fidelity_metrics(
    samples_uint8: Tensor,
    reference_uint8: Tensor | None,
    *,
    extractor: str,
    weights_path: str | os.PathLike | None,
    cache_root: str | os.PathLike,
    reference_cache_name: str,
    fid: bool = True,
    isc: bool = True,
    kid: bool = False,
    prc: bool = False,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict:
    """FID of ``samples_uint8`` against ``reference_uint8`` and IS of ``samples_uint8``, via torch-fidelity.

    Both image sets are ``uint8`` ``[N, C, H, W]`` in [0, 255] with C = 1 or 3. ``extractor`` is
    ``"inception"`` (``weights_path`` None downloads torch-fidelity's weights; a local file for offline
    clusters) or ``"reference-classifier"`` (``weights_path`` = the file from
    ``reference_classifier.load_or_train_reference_classifier``, required). Reference features and FID
    statistics are cached under ``cache_root`` as ``reference_cache_name`` (plus ``-<sha256[:12]>`` of the
    weights file for the reference classifier), so later calls with the same name skip the reference
    entirely — the same name must always mean the same reference images. Samples are never cached.

    KID (``kid=True``, unbiased polynomial-kernel MMD², Bińkowski et al. 2018) is the small-sample
    companion of FID: FID is biased upward at a few hundred samples, KID is not. It is computed on
    ``min(1000, N_samples, N_reference)``-image subsets (100 of them), as torch-fidelity does.

    Precision and recall (``prc=True``, Kynkäänniemi et al. 2019, torch-fidelity's PRC): a sample is
    *precise* if it lies within the ``prc_neighborhood``-th nearest-neighbour radius of some reference
    image (fidelity), a reference image is *recalled* if it lies within that radius of some sample
    (diversity: samples that collapse onto a few modes recall little). Both are fractions in [0, 1]; the
    radii depend on the set sizes, so compare them at equal sizes (:func:`prc_reference`).

    Returns ``{"fid", "kid", "kid_std", "inception_score", "inception_score_std", "precision", "recall",
    "protocol"}``; ``fid`` is present only when ``fid=True``, the KID keys only when ``kid=True``, the
    two IS keys only when ``isc=True`` and precision/recall only when ``prc=True``. ``protocol`` names the extractor, the
    sample and reference counts, the reference cache name, ``isc_splits`` and the weights used.
    ``device``: where the extractor runs (None: the device this process was given, ``devices.py``).
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
    if not (fid or isc or kid or prc):
        raise ValueError("fidelity_metrics needs fid=True, kid=True, prc=True or isc=True")
    if prc and prc_neighborhood < 1:
        raise ValueError(f"prc_neighborhood must be >= 1, got {prc_neighborhood}")
    need_reference = fid or kid or prc
    samples = as_uint8_images(samples_uint8, "samples_uint8")
    n = samples.shape[0]
    reference = None
    if need_reference:
        if reference_uint8 is None:
            raise ValueError("fid=True, kid=True or prc=True needs reference_uint8")
        reference = as_uint8_images(reference_uint8, "reference_uint8")
        if n < 2 or reference.shape[0] < 2:
            raise ValueError(f"FID needs >= 2 images per set, got {n} samples and {reference.shape[0]} reference")
        if reference.shape[1:] != samples.shape[1:]:
            raise ValueError(
                f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} differ in C×H×W"
            )
    _check_cache_name(reference_cache_name)

    cache_name = reference_cache_name
    weights = None
    if extractor in REFERENCE_KINDS:
        if weights_path is None:
            raise ValueError(
                f"extractor {extractor!r} needs weights_path (see load_or_train_reference_classifier)"
            )
        meta = reference_classifier_meta(weights_path)
        if (meta["channels"], meta["size"], meta["size"]) != tuple(samples.shape[1:]):
            raise ValueError(
                f"reference classifier {weights_path} reads {meta['channels']}×{meta['size']}×{meta['size']}, "
                f"samples are {'×'.join(map(str, samples.shape[1:]))}"
            )
        weights = _file_digest(weights_path)
        cache_name = f"{reference_cache_name}-{weights}"
    elif weights_path is not None:
        weights = os.path.basename(weights_path)
    if isc and not 1 <= isc_splits <= n:
        raise ValueError(f"isc_splits must be in [1, num_samples={n}], got {isc_splits}")

    device = default_device() if device is None else torch.device(device)
    kwargs = dict(
        input1=_UInt8Images(samples),
        input2=_UInt8Images(reference) if need_reference else None,
        input2_cache_name=cache_name if need_reference else None,
        fid=fid,
        isc=isc,
        kid=kid,
        prc=prc,
        prc_neighborhood=int(prc_neighborhood),
        isc_splits=isc_splits,
        feature_extractor=EXTRACTORS[extractor],
        feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        cache_root=str(cache_root),
        cache=True,
        cuda=device.type == "cuda",
        batch_size=batch_size,
        save_cpu_ram=True,  # otherwise torch-fidelity starts 4 loader workers
        verbose=False,
    )
    if kid:
        kwargs["kid_subset_size"] = min(1000, n, reference.shape[0])
    # torch-fidelity moves its extractor to the current CUDA device when cuda=True: make that the device
    # this process was given (a Ray process given no GPU still sees the node's GPUs; devices.py).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        raw = torch_fidelity.calculate_metrics(**kwargs)

    out: dict = {}
    if fid:
        out["fid"] = float(raw["frechet_inception_distance"])
    if kid:
        out["kid"] = float(raw["kernel_inception_distance_mean"])
        out["kid_std"] = float(raw["kernel_inception_distance_std"])
    if prc:
        out["precision"] = float(raw["precision"])
        out["recall"] = float(raw["recall"])
    if isc:
        out["inception_score"] = float(raw["inception_score_mean"])
        out["inception_score_std"] = float(raw["inception_score_std"])
    out["protocol"] = {
        "extractor": extractor,
        "num_samples": int(n),
        "num_reference": int(reference.shape[0]) if need_reference else 0,
        "reference": reference_cache_name,
        "isc_splits": int(isc_splits),
        "weights": weights,
    }
    if prc:
        out["protocol"]["prc_neighborhood"] = int(prc_neighborhood)
    return out


def prc_reference(images_uint8: Tensor, n: int, seed: int = 0) -> tuple[Tensor, str]:
    """``n`` reference images drawn at random (seeded) for precision/recall against ``n`` samples, and the
    suffix that names them in the reference cache (``-prc<n>s<seed>``): PRC's k-NN radii shrink as a set
    grows, so samples and reference must be the same size for the two figures to mean what they say."""
    if not 1 <= n <= len(images_uint8):
        raise ValueError(f"prc_reference: n must be in [1, {len(images_uint8)}], got {n}")
    idx = torch.randperm(len(images_uint8), generator=torch.Generator().manual_seed(seed))[:n]
    return images_uint8[idx], f"-prc{n}s{seed}"
