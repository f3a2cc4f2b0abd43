"""Class-conditional Gaussian-mixture initialisation of the sampler (JEM++ "informative initialisation").

Per class ``c`` over the flattened training images ``x ∈ [-1, 1]^D`` (``D = C·H·W``, pixel units of the
[-1, 1] scale, no augmentation):

    μ_c = mean_i x_i                                   (over the ``n_c`` images of class c)
    S_c = Σ_i (x_i - μ_c)(x_i - μ_c)^T / (n_c - 1)     (unbiased sample covariance)

A draw picks a class uniformly (or takes the given one) and returns ``clamp(μ_c + ε, -1, 1)`` with
``ε ~ N(0, Σ̂_c)``, reshaped to ``[C, H, W]``. The modelled covariance ``Σ̂_c`` is stored as a factor
``L_c ∈ R^{D×r}`` and a diagonal residual ``d_c ∈ R^D``:

    Σ̂_c = L_c L_c^T + diag(d_c²)        sampled as   ε = L_c z + d_c ⊙ e,   z ~ N(0, I_r), e ~ N(0, I_D)

* exact mode (``r = D``): ``L_c = chol(S_c + jitter·I)``, ``d_c = 0``, so ``Σ̂_c = S_c + jitter·I``;
* low-rank mode (``r < D``): ``L_c = U_r diag(√λ_r)`` from the top-r eigenpairs of ``S_c`` and
  ``d_c² = diag(S_c) - diag(L_c L_c^T) + jitter``, so the marginal variances are exact
  (``diag Σ̂_c = diag S_c + jitter``) and the leading r principal directions are kept.

Memory is bounded by ``max_bytes``: a full CIFAR-10 factor is 3072² · 4 B = 38 MB per class, and
CIFAR-100 would need 3.8 GB, so the rank is chosen to fit the budget (:func:`choose_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.files import atomic_torch_save

_STATE_VERSION = 1
_BYTES_PER_FLOAT = 4  # everything is stored in float32


def choose_rank(num_classes: int, dim: int, max_bytes: int, rank: int | None = None) -> tuple[int, bool]:
    """Rank ``r`` of the per-class factor and whether the model is exact (full Cholesky factor).

    The model stores ``K·D·(r + 2)`` float32 values (factors ``K·D·r``, means and residual std
    ``K·D`` each), i.e. ``4·K·D·(r + 2)`` bytes.

    * ``rank is None`` and ``4·K·D·(D + 2) <= max_bytes``  ->  ``(D, True)`` (exact);
    * ``rank is None`` otherwise  ->  the largest ``r`` with ``4·K·D·(r + 2) <= max_bytes``, at least 1;
    * ``rank`` given  ->  ``min(rank, D)``, low-rank-plus-diagonal, regardless of ``max_bytes``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be None or >= 1, got {rank}")
        return min(int(rank), dim), False
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    per_column = _BYTES_PER_FLOAT * num_classes * dim
    if per_column * (dim + 2) <= max_bytes:
        return dim, True
    # At least one principal direction even if the budget is smaller than that: a diagonal-only
    # model would lose all pixel correlations, which is what makes the initialisation informative.
    return max(1, min(dim - 1, max_bytes // per_column - 2)), False


@dataclass
class ClassConditionalGMM:
    """One Gaussian per class, ``x ~ N(μ_c, L_c L_c^T + diag(d_c²))`` clamped to [-1, 1].

    Fields (all float32, CPU): ``means [K, D]``, ``factors [K, D, r]`` (``L_c``),
    ``resid_std [K, D]`` (``d_c``, 0 in exact mode); ``shape = (C, H, W)`` with ``C·H·W = D``.
    """

    means: torch.Tensor
    factors: torch.Tensor
    resid_std: torch.Tensor
    shape: tuple[int, int, int]
    jitter: float = 1e-4

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        k, d = self.means.shape
        if self.factors.ndim != 3 or self.factors.shape[:2] != (k, d):
            raise ValueError(f"factors must be [K={k}, D={d}, r], got {tuple(self.factors.shape)}")
        if tuple(self.resid_std.shape) != (k, d):
            raise ValueError(f"resid_std must be [K={k}, D={d}], got {tuple(self.resid_std.shape)}")
        if int(np.prod(self.shape)) != d:
            raise ValueError(f"shape {self.shape} has {int(np.prod(self.shape))} elements, D is {d}")

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.factors.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the model's tensors (means, factors, residual std)."""
        return sum(t.numel() * t.element_size() for t in (self.means, self.factors, self.resid_std))

    def covariance(self, c: int) -> torch.Tensor:
        """The modelled covariance ``Σ̂_c = L_c L_c^T + diag(d_c²)`` of class ``c``, ``[D, D]`` float64."""
        lc = self.factors[c].double()
        return lc @ lc.T + torch.diag(self.resid_std[c].double() ** 2)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        classes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` images: ``y ~ U{0..K-1}`` (or ``classes``), ``x = clamp(μ_y + L_y z + d_y ⊙ e, -1, 1)``.

        Returns ``x [n, C, H, W]`` float32 in [-1, 1] and ``y [n]`` int64. The same ``generator`` state
        gives the same draws (the random numbers are drawn in a fixed order: classes, z, e).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        k = self.num_classes
        if classes is None:
            y = torch.randint(k, (n,), generator=generator)
        else:
            y = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
            if y.numel() != n:
                raise ValueError(f"classes has {y.numel()} entries, n is {n}")
            if n and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"classes must lie in [0, {k - 1}], got range [{int(y.min())}, {int(y.max())}]")
        z = torch.randn(n, self.rank, generator=generator)
        e = torch.randn(n, self.dim, generator=generator)
        x = self.means[y] + self.resid_std[y] * e
        # Grouped by class rather than factors[y] (a [n, D, r] gather): that would be n × 27 MB for a
        # CIFAR-10 factor of rank 2182.
        for c in torch.unique(y).tolist():
            idx = (y == c).nonzero().squeeze(1)
            x[idx] += z[idx] @ self.factors[c].T
        return x.clamp_(-1.0, 1.0).reshape(n, *self.shape), y

    def state_dict(self) -> dict:
        """Tensors, ints, floats and lists only, so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "version": _STATE_VERSION,
            "means": self.means,
            "factors": self.factors,
            "resid_std": self.resid_std,
            "shape": list(self.shape),
            "jitter": float(self.jitter),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClassConditionalGMM":
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"GMM state version {version!r} is not supported (expected {_STATE_VERSION})")
        return cls(
            means=state["means"].float(),
            factors=state["factors"].float(),
            resid_std=state["resid_std"].float(),
            shape=tuple(state["shape"]),
            jitter=float(state["jitter"]),
        )


def as_init_fn(gmm: ClassConditionalGMM, noise_init: float = 0.0) -> Callable[[int, np.random.Generator], np.ndarray]:
    """Adapt ``gmm`` to the replay buffer's ``InitFn``: ``(n, rng) -> float32 [n, C, H, W]`` (classes uniform).

    Each draw is, independently with probability ``noise_init``, uniform noise on [-1, 1] instead of a
    mixture sample (``buffer.noise_init``: chains that start from noise, as JEM's all do). The torch
    generator is seeded from ``rng``, so the draws are a function of the numpy RNG state (a restored
    buffer replays the same reinitialisations).
    """
    if not 0.0 <= noise_init <= 1.0:
        raise ValueError(f"noise_init must be in [0, 1], got {noise_init}")

    def init_fn(n: int, rng: np.random.Generator) -> np.ndarray:
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        x, _ = gmm.sample(n, generator=g)
        if noise_init > 0:
            noise = torch.rand(n, generator=g) < noise_init
            x[noise] = torch.rand((int(noise.sum()),) + tuple(x.shape[1:]), generator=g) * 2 - 1
        return x.numpy()

    return init_fn


def _factor_exact(cov: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L L^T = cov`` (float64, cov positive definite thanks to the jitter)."""
    lower, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return lower
    # Jitter too small for the rounding error of a near-singular S: an eigen factor tolerates it.
    lam, u = torch.linalg.eigh(cov)
    return u * lam.clamp_min(0).sqrt()


def _top_eigen(xc: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` eigenpairs ``(λ [r], U [D, r])`` of ``S = xc^T xc / (n - 1)``, descending, zero-padded."""
    n, d = xc.shape
    if n < d:
        # Thin SVD of the centred data costs O(n² D) instead of O(D³): CIFAR-100 has 500 images a class.
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        lam, u = s**2 / (n - 1), vh.T
    else:
        lam, u = torch.linalg.eigh(xc.T @ xc / (n - 1))
        lam, u = lam.flip(0), u.flip(1)
    lam, u = lam[:r].clamp_min(0), u[:, :r]
    if lam.numel() < r:  # rank of S is below r: the missing directions have zero variance
        pad = r - lam.numel()
        lam = torch.cat([lam, lam.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(d, pad)], dim=1)
    return lam, u


@torch.no_grad()
def fit_class_gmm(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    max_bytes: int = 256 * 2**20,
    rank: int | None = None,
    jitter: float = 1e-4,
) -> ClassConditionalGMM:
    """Fit ``μ_c`` and ``Σ̂_c`` (see the module docstring) for every class of ``x [N, C, H, W]`` in [-1, 1].

    ``y [N]`` holds labels in ``[0, num_classes)``; every class needs at least 2 images. The rank comes
    from :func:`choose_rank` (exact when the full factors fit in ``max_bytes`` and ``rank`` is None).
    Statistics are computed in float64 one class at a time (peak extra memory ``≈ 8·(n_c·D + D²)``
    bytes) and stored in float32. ``jitter`` is a variance in squared pixel units of the [-1, 1] scale.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    y = torch.as_tensor(y).reshape(-1).long()
    if y.numel() != x.shape[0]:
        raise ValueError(f"y has {y.numel()} labels for {x.shape[0]} images")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=num_classes)
    for c, n_c in enumerate(counts.tolist()):
        if n_c < 2:
            raise ValueError(f"class {c} has {n_c} training image(s); a covariance needs at least 2")

    shape = tuple(x.shape[1:])
    d = int(np.prod(shape))
    r, exact = choose_rank(num_classes, d, max_bytes, rank)
    flat = x.reshape(x.shape[0], d)
    means = torch.empty(num_classes, d)
    factors = torch.empty(num_classes, d, r)
    resid_std = torch.zeros(num_classes, d)
    for c in range(num_classes):
        xc = flat[y == c].double()
        mu = xc.mean(0)
        xc -= mu
        n_c = xc.shape[0]
        means[c] = mu.float()
        if exact:
            cov = xc.T @ xc / (n_c - 1)
            cov.diagonal().add_(jitter)
            factors[c] = _factor_exact(cov).float()
        else:
            lam, u = _top_eigen(xc, r)
            lc = u * lam.sqrt()
            var = (xc**2).sum(0) / (n_c - 1)
            # What the top-r directions leave unexplained of each pixel's variance goes on the diagonal,
            # so the per-pixel spread of the initial samples matches the data.
            resid_var = (var - (lc**2).sum(1)).clamp_min(0) + jitter
            factors[c] = lc.float()
            resid_std[c] = resid_var.sqrt().float()
    return ClassConditionalGMM(means=means, factors=factors, resid_std=resid_std, shape=shape, jitter=jitter)


def load_or_fit_gmm(
    cache_file: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    **fit_kwargs,
) -> ClassConditionalGMM:
    """Read the GMM cached at ``cache_file``, or fit it with :func:`fit_class_gmm` and cache it.

    The cache is written to a temporary file in the same directory and moved into place with
    ``os.replace`` (atomic on POSIX), so a crash never leaves a half-written cache and two racing
    processes both end with a readable file (the last replace wins; both fits are identical).
    A cache whose class count or image shape disagrees with ``x``/``num_classes`` raises ``ValueError``
    rather than being silently used. ``fit_kwargs`` are not checked against the cache.
    """
    path = Path(cache_file)
    if path.exists():
        gmm = ClassConditionalGMM.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if gmm.num_classes != num_classes or gmm.shape != tuple(x.shape[1:]):
            raise ValueError(
                f"GMM cache {path} holds {gmm.num_classes} classes of shape {gmm.shape}, but the data has "
                f"{num_classes} classes of shape {tuple(x.shape[1:])}; delete the file to refit"
            )
        return gmm
    gmm = fit_class_gmm(x, y, num_classes, **fit_kwargs)
    atomic_torch_save(gmm.state_dict(), path)
    return gmm


__all__ = ["ClassConditionalGMM", "as_init_fn", "choose_rank", "fit_class_gmm", "load_or_fit_gmm"]
