"""IS/FID through torch-fidelity with the reference-classifier extractor, on real offline digits.

scikit-learn's ``load_digits`` (1,797 real 8×8 digits, 17 grey levels scaled to 0..255) keeps the
classifier's training to about a second; one classifier is trained for the whole module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rjem_ray  # noqa: F401  (installs the torchvision shim before torch_fidelity is imported)
from rjem_ray.evaluation import fidelity as fd
from rjem_ray.evaluation import reference_classifier as rc

NUM_TRAIN = 1297  # the remaining 500 digits are the "test" set


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    return images[tr], labels[tr], images[te], labels[te]


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    x_tr, y_tr, _, _ = digits
    cache_dir = tmp_path_factory.mktemp("classifier")
    path = rc.load_or_train_reference_classifier(cache_dir, "digits8", x_tr, y_tr, 10, epochs=10)
    return path


def _fid(samples, reference, weights, cache_root, name, **kw):
    return fd.fidelity_metrics(
        samples, reference, extractor="reference-classifier", weights_path=weights,
        cache_root=str(cache_root), reference_cache_name=name, **kw,
    )


# ---------------------------------------------------------------- the classifier and its cache


def test_reference_classifier_reaches_high_heldout_accuracy(classifier, digits):
    model, meta = rc.load_reference_classifier(classifier)
    assert meta["heldout_accuracy"] > 0.9, meta
    assert (meta["channels"], meta["size"], meta["num_classes"], meta["dataset"]) == (1, 8, 10, "digits8")
    # ... and it generalises to digits it never saw (neither trained on nor held out).
    _, _, x_te, y_te = digits
    with torch.no_grad():
        acc = (model(x_te.float() / 127.5 - 1).argmax(1) == y_te).double().mean().item()
    assert acc > 0.9


def test_classifier_file_is_reused_without_retraining(classifier, digits, monkeypatch):
    x_tr, y_tr, _, _ = digits
    before = classifier.read_bytes()

    def no_training(*a, **k):
        raise AssertionError("retrained although the cached file exists")

    monkeypatch.setattr(rc, "train_reference_classifier", no_training)
    again = rc.load_or_train_reference_classifier(classifier.parent, "digits8", x_tr, y_tr, 10)
    assert again == classifier == rc.reference_classifier_path(classifier.parent, "digits8")
    assert classifier.read_bytes() == before
    # A cached file for other shapes is refused, not silently overwritten.
    with pytest.raises(ValueError, match="delete it"):
        rc.load_or_train_reference_classifier(classifier.parent, "digits8", x_tr.repeat(1, 3, 1, 1), y_tr, 10)


def test_classifier_file_is_written_atomically(tmp_path, digits, monkeypatch):
    x_tr, y_tr, _, _ = digits
    x, y = x_tr[:200], y_tr[:200]
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"partial")  # a writer killed half-way
        else:
            with open(f, "wb") as fh:
                fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        rc.load_or_train_reference_classifier(tmp_path, "tiny", x, y, 10, epochs=1)
    assert list(tmp_path.iterdir()) == []  # no truncated final file, no temporary left behind

    monkeypatch.setattr(torch, "save", real_save)
    path = rc.load_or_train_reference_classifier(tmp_path, "tiny", x, y, 10, epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    model, meta = rc.load_reference_classifier(path)
    assert meta["num_train"] + meta["num_heldout"] == 200


def test_extractor_reads_channel_zero_scaled_to_unit_range(classifier):
    ext = rc.ReferenceClassifierExtractor(
        rc.REFERENCE_EXTRACTOR, ["logits_unbiased", "penultimate"], feature_extractor_weights_path=str(classifier)
    )
    gray = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    logits, h = ext(gray.expand(-1, 3, -1, -1))  # features come back in the requested order
    model, _ = rc.load_reference_classifier(classifier)
    h_ref, logits_ref = model.features(gray.float() / 127.5 - 1)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(logits, logits_ref)
    assert h.shape == (5, 128) and logits.shape == (5, 10)
    assert ext.get_default_feature_layer_for_metric("fid") == "penultimate"
    assert ext.get_default_feature_layer_for_metric("isc") == "logits_unbiased"


# ---------------------------------------------------------------- FID and IS


def test_fid_and_is_order_real_noise_and_single_class(classifier, digits, tmp_path):
    x_tr, _, x_te, y_te = digits
    real = _fid(x_te, x_tr, classifier, tmp_path, "digits8-train")
    noise = _fid(torch.randint(0, 256, (500, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                 x_tr, classifier, tmp_path, "digits8-train")
    ones = x_te[y_te == 1]
    single = _fid(ones, x_tr, classifier, tmp_path, "digits8-train", isc_splits=5)
    print(f"FID real {real['fid']:.3f}  noise {noise['fid']:.1f}  single-class {single['fid']:.1f}; "
          f"IS real {real['inception_score']:.2f}  single-class {single['inception_score']:.3f}")

    assert real["fid"] < 0.05 * min(single["fid"], noise["fid"])
    # IS: about K for confident, balanced predictions; about 1 when every image is the same class.
    assert 6.0 < real["inception_score"] <= 10.0
    assert single["inception_score"] < 1.5
    assert real["protocol"] == {
        "extractor": "reference-classifier", "num_samples": 500, "num_reference": NUM_TRAIN,
        "reference": "digits8-train", "isc_splits": 10, "weights": real["protocol"]["weights"],
    }
    assert len(real["protocol"]["weights"]) == 12  # sha256 prefix of the classifier file


def test_fid_of_a_set_against_itself_is_zero(classifier, digits, tmp_path):
    x_tr, _, _, _ = digits
    out = _fid(x_tr, x_tr, classifier, tmp_path, "self", isc=False)
    assert abs(out["fid"]) < 1e-3
    assert "inception_score" not in out


def test_reference_statistics_are_cached_and_reused(classifier, digits, tmp_path, monkeypatch):
    x_tr, _, x_te, _ = digits
    seen = []

    class Counting(rc.ReferenceClassifierExtractor):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, rc.REFERENCE_EXTRACTOR, Counting)
    first = _fid(x_te, x_tr, classifier, tmp_path, "digits8-ref")
    assert sum(seen) == len(x_te) + len(x_tr)
    assert any(p.name.startswith("digits8-ref-") and "stat-fid" in p.name for p in tmp_path.iterdir())

    seen.clear()
    garbage = torch.zeros_like(x_tr)  # the name, not the tensor, identifies the cached reference
    second = _fid(x_te, garbage, classifier, tmp_path, "digits8-ref")
    assert sum(seen) == len(x_te)  # only the samples were extracted
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)


def test_rejects_mismatched_shapes_and_missing_weights(classifier, digits, tmp_path):
    x_tr, _, x_te, _ = digits
    with pytest.raises(ValueError, match="reads 1×8×8"):
        _fid(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
             classifier, tmp_path, "x")
    with pytest.raises(ValueError, match="weights_path"):
        _fid(x_te, x_tr, None, tmp_path, "x")
    with pytest.raises(ValueError, match="uint8"):
        _fid(x_te.float(), x_tr, classifier, tmp_path, "x")


def test_inception_path_passes_the_offline_weights_to_torch_fidelity(digits, tmp_path, monkeypatch):
    """Inception cannot run here (no weights); check only what we would hand to torch-fidelity."""
    _, _, x_te, _ = digits
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 12.5, "inception_score_mean": 7.0, "inception_score_std": 0.5}

    monkeypatch.setattr(fd.torch_fidelity, "calculate_metrics", fake)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    out = fd.fidelity_metrics(x_te[:20], x_te[20:40], extractor="inception", weights_path=str(weights),
                              cache_root=str(tmp_path), reference_cache_name="cifar10-train", isc_splits=2)
    assert seen["feature_extractor"] == "inception-v3-compat"
    assert seen["feature_extractor_weights_path"] == str(weights)
    assert seen["input2_cache_name"] == "cifar10-train" and seen.get("input1_cache_name") is None
    assert seen["save_cpu_ram"] is True and seen["verbose"] is False
    assert seen["cuda"] == torch.cuda.is_available()
    item = seen["input1"][0]
    assert item.dtype == torch.uint8 and item.shape == (3, 8, 8)  # grayscale repeated to RGB
    assert out["fid"] == 12.5 and out["inception_score"] == 7.0 and out["protocol"]["extractor"] == "inception"


# ---------------------------------------------------------------- the robust reference classifier and KID


@pytest.fixture(scope="module")
def robust_classifier(classifier, digits):
    """Adversarially trained (the kind's own ε and PGD steps), in the same cache directory as the plain one."""
    x_tr, y_tr, _, _ = digits
    return rc.load_or_train_reference_classifier(
        classifier.parent, "digits8", x_tr, y_tr, 10, kind="robust-reference-classifier", epochs=3)


def test_robust_classifier_is_cached_beside_the_plain_one_and_adversarially_trained(classifier, robust_classifier):
    assert robust_classifier == rc.reference_classifier_path(classifier.parent, "digits8", "robust-reference-classifier")
    assert robust_classifier.name == "robust-reference-classifier-digits8.pt" and classifier.exists()
    _, meta = rc.load_reference_classifier(robust_classifier)
    _, plain_meta = rc.load_reference_classifier(classifier)
    assert (meta["adversarial_eps"], meta["adversarial_steps"]) == (rc.ROBUST_REFERENCE_EPS, rc.ROBUST_REFERENCE_STEPS)
    assert plain_meta["adversarial_eps"] == 0.0
    assert meta["heldout_accuracy"] > 0.85, meta  # still a good classifier of clean digits
    with pytest.raises(ValueError, match="kind must be one of"):
        rc.reference_classifier_path(classifier.parent, "digits8", "inception")


def test_targeted_pgd_fools_the_plain_extractor_far_more_than_the_robust_one(classifier, robust_classifier, digits):
    """Generation's pgd mode, run on an independent plain classifier, transfers to the plain extractor.

    The prior is fitted with labels shifted by one, so the seeds "of class c" are digits c − 1, and PGD
    (ε = 0.5, generation's default budget, [-1, 1] units) pushes them toward c. Measured (50 per class):
    the plain extractor's share of argmax = c rises 0.002 → 0.72, the robust one's 0.000 → 0.32.
    """
    from rjem_ray.config import GenerateConfig
    from rjem_ray.core.data import to_model_space, to_uint8
    from rjem_ray.evaluation.generate import generate
    from rjem_ray.method.gmm import fit_class_gmm

    x_tr, y_tr, _, _ = digits
    generator = rc.train_reference_classifier(x_tr, y_tr, 10, epochs=10, seed=1)
    gmm = fit_class_gmm(to_model_space(x_tr), (y_tr + 1) % 10, 10)
    plain, _ = rc.load_reference_classifier(classifier)
    robust, _ = rc.load_reference_classifier(robust_classifier)
    cfg = GenerateConfig(pgd_eps=0.5, pgd_steps=20, pgd_step_size=2.5 * 0.5 / 20, batch_size=50)
    hits = {"plain": [0, 0], "robust": [0, 0]}  # [seeds, PGD images] predicted as the target class
    for c in range(10):
        seeds, _ = gmm.sample(50, classes=torch.full((50,), c), generator=torch.Generator().manual_seed(c))
        x, _ = generate(generator, gmm, cfg, mode="pgd", n=50, classes=c, generator=torch.Generator().manual_seed(c))
        assert (x - seeds).abs().max() <= 0.5 + 1e-5
        with torch.no_grad():  # as the extractor reads them: through uint8
            for name, model in (("plain", plain), ("robust", robust)):
                for i, images in enumerate((seeds, x)):
                    hits[name][i] += (model(to_model_space(to_uint8(images))).argmax(1) == c).sum().item()
    rate = {k: (s / 500, p / 500) for k, (s, p) in hits.items()}
    print("share of argmax == target (seeds, PGD images):", rate)
    rise = {k: p - s for k, (s, p) in rate.items()}
    assert max(rate["plain"][0], rate["robust"][0]) < 0.05  # the seeds are not the target class
    assert rise["plain"] > 0.5
    assert rise["plain"] - rise["robust"] > 0.25


def test_kid_is_near_zero_for_two_halves_of_the_data_and_large_for_noise(classifier, robust_classifier, digits,
                                                                           tmp_path):
    """KID has the kernel's scale, (h·h'/128 + 1)³, so "near zero" is relative to what another distribution scores.

    Measured at 200 vs 200 images (float64, 100 random splits of the training digits): plain extractor
    KID(split halves) std 19, max |·| 58, noise 944; robust extractor std 0.41, max 1.6, noise 27.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x_tr = digits[0]
    noise = torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for extractor, weights in (("reference-classifier", classifier), ("robust-reference-classifier", robust_classifier)):
        def kid(samples):
            # torch-fidelity's KID is 300 numpy matmuls: a multi-threaded BLAS on a busy 2-core box takes
            # ~15x longer than one thread
            with threadpool_limits(limits=1):
                return fd.fidelity_metrics(samples, x_tr[200:400], extractor=extractor, weights_path=weights,
                                           cache_root=str(tmp_path), reference_cache_name=f"second-200-{extractor}",
                                           fid=False, isc=False, kid=True)

        half, far = kid(x_tr[:200]), kid(noise)
        print(f"{extractor}: KID halves {half['kid']:.4f} ± {half['kid_std']:.4f}, noise {far['kid']:.2f}")
        assert set(half) == {"kid", "kid_std", "protocol"}  # no FID or IS asked for, none computed
        assert half["protocol"]["num_reference"] == 200
        assert far["kid"] > 10
        assert abs(half["kid"]) < 0.15 * far["kid"]


# ---------------------------------------------------------------- precision / recall (diversity)


def test_precision_recall_see_fidelity_and_diversity_apart(classifier, digits, tmp_path):
    """Held-out digits of every class: high precision and recall. One class only: still precise (real
    digits), but most of the reference is not recalled. Noise: neither."""
    x_tr, _, x_te, y_te = digits
    ref, tag = fd.prc_reference(x_tr, 150)
    assert tag == "-prc150s0" and len(ref) == 150

    def prc(samples):
        return _fid(samples, ref, classifier, tmp_path, "digits8-ref" + tag, fid=False, isc=False, prc=True)

    real = prc(x_te[:150])
    ones = x_te[y_te == 1][:40].repeat(4, 1, 1, 1)[:150]  # one class, few distinct images
    noise = prc(torch.randint(0, 256, (150, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    single = prc(ones)
    print({k: (round(v["precision"], 3), round(v["recall"], 3)) for k, v in
           {"real": real, "single": single, "noise": noise}.items()})
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert single["recall"] < 0.3 < real["recall"] - 0.3
    assert single["precision"] > 0.5
    assert noise["precision"] < real["precision"] - 0.5 and noise["recall"] < 0.1
    assert real["protocol"]["prc_neighborhood"] == 3 and "fid" not in real


def test_prc_reference_is_a_seeded_subset_and_refuses_bad_sizes(digits):
    x_tr = digits[0]
    a, _ = fd.prc_reference(x_tr, 50, seed=1)
    b, _ = fd.prc_reference(x_tr, 50, seed=1)
    c, _ = fd.prc_reference(x_tr, 50, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = {bytes(x.numpy()) for x in x_tr}
    assert all(bytes(x.numpy()) in rows for x in a)
    with pytest.raises(ValueError, match="n must be in"):
        fd.prc_reference(x_tr, len(x_tr) + 1)
