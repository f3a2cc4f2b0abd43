"""Class-conditional GMM initialisation: sample statistics, low-rank budget, persistence, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rjem_ray.method import gmm as gmm_mod
from rjem_ray.method.gmm import (
    ClassConditionalGMM,
    as_init_fn,
    choose_rank,
    fit_class_gmm,
    load_or_fit_gmm,
)

SHAPE = (3, 2, 2)  # D = 12
D = 12
K = 3


def _synthetic(n_per_class: int = 1500, seed: int = 0):
    """K Gaussians well inside [-1, 1] with distinct means, scales and strongly correlated covariances."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(K):
        mean = torch.rand(D, generator=g) * 0.8 - 0.4
        a = torch.randn(D, D, generator=g)
        # Non-symmetric, scale differing per class: L^T L != L L^T and class covariances differ.
        factor = torch.linalg.cholesky(a @ a.T / D + 0.1 * torch.eye(D)) * 0.04 * (c + 1)
        xs.append(mean + torch.randn(n_per_class, D, generator=g) @ factor.T)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs).reshape(-1, *SHAPE), torch.cat(ys)


@pytest.fixture(scope="module")
def data():
    return _synthetic()


def _class_stats(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x[y == c].reshape(-1, D).double()
    return xc.mean(0), torch.cov(xc.T)


def test_exact_fit_stores_class_mean_and_covariance_plus_jitter(data):
    x, y = data
    gmm = fit_class_gmm(x, y, K, jitter=1e-4)
    assert gmm.rank == D and gmm.num_classes == K and gmm.shape == SHAPE
    assert torch.all(gmm.resid_std == 0)
    for c in range(K):
        mu, cov = _class_stats(x, y, c)
        torch.testing.assert_close(gmm.means[c].double(), mu, atol=1e-6, rtol=0)
        torch.testing.assert_close(gmm.covariance(c), cov + 1e-4 * torch.eye(D, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [None, D])
def test_samples_reproduce_each_class_mean_and_covariance(data, rank):
    x, y = data
    gmm = fit_class_gmm(x, y, K, rank=rank)
    n = 20000
    g = torch.Generator().manual_seed(1)
    for c in range(K):
        xs, ys = gmm.sample(n, classes=torch.full((n,), c), generator=g)
        assert xs.shape == (n, *SHAPE) and xs.dtype == torch.float32
        assert torch.all(ys == c)
        xs = xs.reshape(n, D).double()
        cov_model = gmm.covariance(c)
        # Mean error ~ σ/√n ≈ 1e-3 at the largest class scale; the class means differ by ~0.3.
        torch.testing.assert_close(xs.mean(0), gmm.means[c].double(), atol=5e-3, rtol=0)
        # Entry error ~ σ²·√(2/n) ≈ 1.5e-4; a transposed factor or another class's factor is off by > 3e-3.
        err = (torch.cov(xs.T) - cov_model).abs().max().item()
        assert err < 1.5e-3 * (c + 1) ** 2, err
        other = gmm.covariance((c + 1) % K)
        assert (torch.cov(xs.T) - other).abs().max().item() > 5 * err
        lc = gmm.factors[c].double()
        transposed = lc.T @ lc + torch.diag(gmm.resid_std[c].double() ** 2)
        assert (torch.cov(xs.T) - transposed).abs().max().item() > 5 * err


def test_unconditional_sampling_is_uniform_over_classes_and_clamped(data):
    x, y = data
    gmm = fit_class_gmm(x, y, K)
    # Inflate the spread so clamping matters.
    wide = ClassConditionalGMM(gmm.means, gmm.factors * 30, gmm.resid_std, gmm.shape)
    xs, ys = wide.sample(6000, generator=torch.Generator().manual_seed(0))
    assert xs.min() >= -1 and xs.max() <= 1 and (xs.abs() == 1).any()
    counts = torch.bincount(ys, minlength=K).double() / 6000
    # Binomial sd ≈ 0.006: ±0.03 is 5 sd.
    assert torch.all((counts - 1 / K).abs() < 0.03), counts


def test_class_conditional_sampling_returns_requested_classes(data):
    x, y = data
    gmm = fit_class_gmm(x, y, K)
    classes = torch.tensor([2, 0, 2, 1, 1, 0, 2])
    xs, ys = gmm.sample(7, classes=classes, generator=torch.Generator().manual_seed(0))
    assert ys.dtype == torch.int64 and torch.equal(ys, classes)
    # Each draw lies near its own class mean rather than another's.
    dist = torch.cdist(xs.reshape(7, D), gmm.means)
    assert torch.equal(dist.argmin(1), classes)
    with pytest.raises(ValueError, match="classes"):
        gmm.sample(2, classes=torch.tensor([0, K]))


def test_low_rank_respects_budget_and_keeps_marginals_and_top_direction(data):
    x, y = data
    r = 4
    max_bytes = 4 * K * D * (r + 2)
    assert 4 * K * D * (D + 2) > max_bytes  # exact would not fit
    gmm = fit_class_gmm(x, y, K, max_bytes=max_bytes)
    assert gmm.rank == r and gmm.nbytes <= max_bytes
    n = 20000
    g = torch.Generator().manual_seed(2)
    for c in range(K):
        _, cov = _class_stats(x, y, c)
        # Marginal variances are exact in the model by construction ...
        torch.testing.assert_close(torch.diagonal(gmm.covariance(c)), torch.diagonal(cov) + 1e-4, atol=1e-6, rtol=0)
        # ... and reproduced by the samples.
        xs, _ = gmm.sample(n, classes=torch.full((n,), c), generator=g)
        var = xs.reshape(n, D).double().var(0)
        torch.testing.assert_close(var, torch.diagonal(cov) + 1e-4, rtol=0.05, atol=0)
        # Leading principal direction of the samples matches the data's.
        top_data = torch.linalg.eigh(cov).eigenvectors[:, -1]
        top_samples = torch.linalg.eigh(torch.cov(xs.reshape(n, D).double().T)).eigenvectors[:, -1]
        assert abs(float(top_data @ top_samples)) > 0.99
        # The off-diagonal structure of the top-r subspace is kept (a diagonal-only model would fail).
        lam, u = torch.linalg.eigh(cov)
        best = u[:, -r:] @ torch.diag(lam[-r:]) @ u[:, -r:].T
        lc = gmm.factors[c].double()
        torch.testing.assert_close(lc @ lc.T, best, atol=1e-5, rtol=0)


def test_explicit_rank_overrides_budget(data):
    x, y = data
    gmm = fit_class_gmm(x, y, K, rank=2)
    assert gmm.rank == 2 and gmm.factors.shape == (K, D, 2) and torch.all(gmm.resid_std > 0)


def test_choose_rank_bounds_memory_for_cifar_sizes():
    d = 3 * 32 * 32
    default = 256 * 2**20
    # CIFAR-10: the exact model (377 MB) does not fit in 256 MiB.
    r10, exact10 = choose_rank(10, d, default)
    assert not exact10 and 4 * 10 * d * (r10 + 2) <= default < 4 * 10 * d * (r10 + 3)
    # CIFAR-100 would need 3.8 GB exactly.
    r100, exact100 = choose_rank(100, d, default)
    assert not exact100 and 1 <= r100 and 4 * 100 * d * (r100 + 2) <= default
    assert choose_rank(2, 4, 10**6) == (4, True)
    assert choose_rank(100, d, 1) == (1, False)  # never below one direction
    assert choose_rank(10, d, default, rank=5000) == (d, False)
    with pytest.raises(ValueError, match="rank"):
        choose_rank(10, d, default, rank=0)


def test_hundred_classes_cifar_dim_fit_stays_within_budget():
    k, n_per = 100, 3
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(k * n_per, 3, 32, 32, generator=g) * 2 - 1) * 0.5
    y = torch.arange(k).repeat_interleave(n_per)
    max_bytes = 16 * 2**20
    gmm = fit_class_gmm(x, y, k, max_bytes=max_bytes)
    assert gmm.nbytes <= max_bytes and gmm.rank == choose_rank(k, 3072, max_bytes)[0]
    # 3 images in 3,072 dims (the thin-SVD path): S has rank 2 <= r, so the factor carries S itself
    xc = x[y == 7].reshape(n_per, -1).double()
    lc = gmm.factors[7].double()
    torch.testing.assert_close(lc @ lc.T, torch.cov(xc.T), atol=1e-6, rtol=0)
    xs, ys = gmm.sample(8, generator=g)
    assert xs.shape == (8, 3, 32, 32) and torch.isfinite(xs).all()


def test_too_few_samples_names_the_class(data):
    x, y = data
    keep = torch.cat([torch.nonzero(y != 1).squeeze(1), torch.nonzero(y == 1).squeeze(1)[:1]])
    with pytest.raises(ValueError, match="class 1 has 1"):
        fit_class_gmm(x[keep], y[keep], K)
    with pytest.raises(ValueError, match="class 3 has 0"):
        fit_class_gmm(x, y, K + 1)


def test_state_dict_round_trip_gives_identical_samples(data, tmp_path):
    x, y = data
    gmm = fit_class_gmm(x, y, K, rank=5)
    torch.save(gmm.state_dict(), tmp_path / "gmm.pt")
    restored = ClassConditionalGMM.from_state_dict(torch.load(tmp_path / "gmm.pt", weights_only=True))
    assert restored.shape == gmm.shape and restored.rank == 5 and restored.nbytes == gmm.nbytes
    a = gmm.sample(50, generator=torch.Generator().manual_seed(7))
    b = restored.sample(50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_as_init_fn_is_a_deterministic_function_of_the_numpy_rng(data):
    x, y = data
    init_fn = as_init_fn(fit_class_gmm(x, y, K))
    a = init_fn(5, np.random.default_rng(3))
    b = init_fn(5, np.random.default_rng(3))
    assert a.dtype == np.float32 and a.shape == (5, *SHAPE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, init_fn(5, np.random.default_rng(4)))


def test_load_or_fit_writes_then_reuses_cache(data, tmp_path, monkeypatch):
    x, y = data
    calls = []
    real_fit = gmm_mod.fit_class_gmm

    def counting_fit(*args, **kwargs):
        calls.append(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(gmm_mod, "fit_class_gmm", counting_fit)
    cache = tmp_path / "stats" / "gmm.pt"
    first = load_or_fit_gmm(cache, x, y, K, rank=3)
    assert len(calls) == 1 and calls[0] == {"rank": 3}
    assert [p.name for p in cache.parent.iterdir()] == ["gmm.pt"]  # no temp files left
    second = load_or_fit_gmm(cache, x, y, K, rank=3)
    assert len(calls) == 1  # read from the cache, not refitted
    for name in ("means", "factors", "resid_std"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    with pytest.raises(ValueError, match="delete the file"):
        load_or_fit_gmm(cache, x, y, K + 1)


def test_load_or_fit_leaves_no_partial_file_when_writing_fails(data, tmp_path, monkeypatch):
    x, y = data

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gmm_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_or_fit_gmm(tmp_path / "gmm.pt", x, y, K, rank=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank", [None, 4])
def test_fit_and_draws_match_a_dense_reference(data, rank):
    """Exact and low-rank paths against dense linear algebra: the factor is chol(S + jitter I) or
    U_r diag(λ_r)^½ from eigh(S) with d² = diag(S) − diag(L Lᵀ) + jitter, and a draw with given classes
    is clamp(μ_y + L_y z + d_y ⊙ e) for the generator's z ~ N(0, I_r), then e ~ N(0, I_D)."""
    x, y = data
    gmm = fit_class_gmm(x, y, K, rank=rank, jitter=1e-4)
    r = D if rank is None else rank
    for c in range(K):
        _, cov = _class_stats(x, y, c)
        lc = gmm.factors[c].double()
        if rank is None:
            torch.testing.assert_close(lc @ lc.T, cov + 1e-4 * torch.eye(D, dtype=torch.float64), atol=1e-6, rtol=0)
        else:
            vals, vecs = torch.linalg.eigh(cov)
            top = vecs[:, -r:] @ torch.diag(vals[-r:]) @ vecs[:, -r:].T
            torch.testing.assert_close(lc @ lc.T, top, atol=1e-6, rtol=0)
            torch.testing.assert_close(gmm.resid_std[c].double() ** 2, torch.diag(cov) - torch.diag(top) + 1e-4,
                                       atol=1e-6, rtol=0)
    classes = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2])
    draws, labels = gmm.sample(len(classes), classes=classes, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    z, e = torch.randn(len(classes), r, generator=g), torch.randn(len(classes), D, generator=g)
    dense = gmm.means[classes] + torch.einsum("ndr,nr->nd", gmm.factors[classes], z) + gmm.resid_std[classes] * e
    assert torch.equal(labels, classes)
    torch.testing.assert_close(draws, dense.clamp(-1, 1).reshape(-1, *SHAPE), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ fewer images than dimensions (n < D)
# The low-rank path takes the thin SVD of the centred class data instead of eigh(S) when n_c < D, as for
# CIFAR-100 (500 images a class in 3,072 dims). S then has rank n_c − 1: the model keeps its top r
# eigenpairs (zero-padded when r exceeds the n_c singular values) plus the exact marginal variances.

SHAPE_WIDE = (3, 4, 4)  # D = 48
D_WIDE = 48
N_WIDE = (20, 14, 31)  # images per class, all below D


@pytest.fixture(scope="module")
def wide_data():
    """Three classes of fewer images than dimensions, correlated, with distinct means and scales."""
    g = torch.Generator().manual_seed(5)
    xs, ys = [], []
    for c, n in enumerate(N_WIDE):
        mean = torch.rand(D_WIDE, generator=g) * 0.6 - 0.3
        mix = torch.randn(D_WIDE, D_WIDE, generator=g) * 0.03 * (c + 1) / D_WIDE**0.5
        xs.append(mean + torch.randn(n, D_WIDE, generator=g) @ mix.T)
        ys.append(torch.full((n,), c))
    return torch.cat(xs).reshape(-1, *SHAPE_WIDE), torch.cat(ys)


def _dense_reference(xc: np.ndarray, r: int, jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, ``U_r Λ_r U_rᵀ`` and ``Σ̂ = U_r Λ_r U_rᵀ + diag(diag S − diag(U_r Λ_r U_rᵀ) + jitter)`` from
    numpy's dense unbiased covariance ``S`` and its full eigendecomposition (no SVD)."""
    s = np.cov(xc, rowvar=False, ddof=1)
    lam, u = np.linalg.eigh(s)
    lam, u = np.clip(lam[::-1][:r], 0, None), u[:, ::-1][:, :r]
    top = (u * lam) @ u.T
    resid = np.clip(np.diag(s) - np.diag(top), 0, None) + jitter
    return xc.mean(0), top, top + np.diag(resid)


@pytest.mark.parametrize("rank", [5, 40])  # r < n_c − 1 for every class, and r > n_c (the padded directions)
def test_thin_svd_path_matches_dense_covariance_when_images_are_fewer_than_dimensions(wide_data, rank):
    x, y = wide_data
    jitter = 1e-4
    gmm = fit_class_gmm(x, y, len(N_WIDE), rank=rank, jitter=jitter)
    assert gmm.rank == rank and gmm.factors.shape == (len(N_WIDE), D_WIDE, rank)
    for c, n in enumerate(N_WIDE):
        xc = x[y == c].reshape(n, D_WIDE).double().numpy()
        mean, top, cov = _dense_reference(xc, rank, jitter)
        lc = gmm.factors[c].double().numpy()
        scale = np.abs(cov).max()  # ~1e-3 · (c + 1)²: tolerances relative to the class's spread
        np.testing.assert_allclose(gmm.means[c].double().numpy(), mean, atol=1e-6, rtol=0)
        np.testing.assert_allclose(lc @ lc.T, top, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(gmm.covariance(c).numpy(), cov, atol=1e-5 * scale, rtol=0)
        # S has rank n − 1: with r >= n − 1 the factor carries all of S and the residual is the jitter alone
        if rank >= n - 1:
            np.testing.assert_allclose(lc @ lc.T, np.cov(xc, rowvar=False), atol=1e-5 * scale, rtol=0)
            np.testing.assert_allclose(gmm.resid_std[c].double().numpy() ** 2, jitter, rtol=1e-4)
        # the top direction's variance is the largest eigenvalue of S (the n − 1 normalisation, squared singular values)
        col_var = (lc**2).sum(0)
        np.testing.assert_allclose(col_var.max(), np.linalg.eigvalsh(np.cov(xc, rowvar=False))[-1], rtol=1e-5)


def test_thin_svd_path_matches_the_dense_eigh_path_on_the_same_class(wide_data):
    """The same class fitted at n < D (thin SVD) and with its images repeated past D (n ≥ D, eigh of S):
    repeating every image k times scales S by k·(n − 1)/(k·n − 1), so the factors agree after that rescaling."""
    x, y = wide_data
    rank, k = 6, 3
    c = 2
    xc = x[y == c]
    n = xc.shape[0]
    assert n < D_WIDE <= k * n
    thin = fit_class_gmm(xc, torch.zeros(n), 1, rank=rank, jitter=0.0)
    dense = fit_class_gmm(xc.repeat(k, 1, 1, 1), torch.zeros(k * n), 1, rank=rank, jitter=0.0)
    ratio = k * (n - 1) / (k * n - 1)
    lt, ld = thin.factors[0].double(), dense.factors[0].double()
    scale = (lt @ lt.T).abs().max().item()
    torch.testing.assert_close(ld @ ld.T, ratio * (lt @ lt.T), atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(dense.resid_std[0].double() ** 2, ratio * thin.resid_std[0].double() ** 2,
                               atol=1e-5 * scale, rtol=0)


def test_thin_svd_path_draws_have_the_dense_mean_and_covariance(wide_data):
    """Many draws of each class reproduce numpy's dense μ_c and Σ̂_c at n < D."""
    x, y = wide_data
    rank, jitter, m = 5, 1e-4, 40000
    gmm = fit_class_gmm(x, y, len(N_WIDE), rank=rank, jitter=jitter)
    g = torch.Generator().manual_seed(3)
    for c, n in enumerate(N_WIDE):
        mean, _, cov = _dense_reference(x[y == c].reshape(n, D_WIDE).double().numpy(), rank, jitter)
        xs, _ = gmm.sample(m, classes=torch.full((m,), c), generator=g)
        assert xs.abs().max() < 1  # no clamping at these scales: the draws are the Gaussian itself
        xs = xs.reshape(m, D_WIDE).double().numpy()
        sd = np.sqrt(np.diag(cov))
        # mean error sd/√m: 5 standard errors per pixel
        assert np.all(np.abs(xs.mean(0) - mean) < 5 * sd / np.sqrt(m))
        # covariance entry error ≈ sd_i·sd_j·√(2/m) at most: 6 of those, against entries up to sd_i·sd_j
        emp = np.cov(xs, rowvar=False)
        assert np.all(np.abs(emp - cov) < 6 * np.outer(sd, sd) * np.sqrt(2 / m))
