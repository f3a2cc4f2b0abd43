"""Class-conditional GMM initialisation: sample statistics, low-rank budget, persistence, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rjem_ray import gmm as gmm_mod
from rjem_ray.gmm import (
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
