"""The threat model of ``rjem eval``: the one perturbation set every robustness metric attacks in.

A :class:`ThreatModel` is the ``norm`` ball of radius ``eps`` around each test image, in the model's input
space [-1, 1] (L∞: per pixel; L2: per flattened image), and the PGD attack that probes it (steps, step size,
restarts). It is built once per evaluation from the config (:meth:`ThreatModel.from_config`) and shared by
the metrics that attack in it: ``robust`` (PGD robust accuracy), ``autoattack`` (AutoAttack robust accuracy)
and ``masking`` (the gradient-masking report at the same ε). ``min-norm`` measures distances instead of
attacking one ball, and ``certified`` certifies L2 radii of a Gaussian-smoothed model; neither has an ε.

Config keys: ``eval.robust_eps`` (ε, [-1, 1] units), ``eval.robust_steps``, ``eval.robust_step_size``
(None: 2.5 ε / steps, Madry et al.), ``eval.robust_restarts``. The config has no key for the evaluation norm:
it is L∞ (:data:`DEFAULT_NORM`), as it has always been; an ``eval.robust_norm`` key, where a config has one,
chooses it (``linf`` or ``l2``, the norms PGD, AutoAttack and the masking report take).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

DEFAULT_NORM = "linf"
EPS_UNIT = "model input space [-1, 1]"


@dataclass(frozen=True)
class ThreatModel:
    """The ``norm`` ball of radius ``eps`` ([-1, 1] units) and the PGD that attacks it.

    ``pgd_step_size`` is resolved (never None); the masking report's PGD grid uses ``pgd_steps`` and
    ``pgd_restarts`` at each of its radii, with its own step of 2.5 ε / steps.
    """

    norm: str
    eps: float
    pgd_steps: int
    pgd_step_size: float
    pgd_restarts: int

    @classmethod
    def from_config(cls, cfg: Config) -> ThreatModel:
        """The evaluation's threat model; the norm is ``eval.robust_norm`` where the config has that key, else L∞."""
        e = cfg.eval
        return cls(norm=getattr(e, "robust_norm", DEFAULT_NORM), eps=e.robust_eps, pgd_steps=e.robust_steps,
                   pgd_step_size=e.robust_step_size or 2.5 * e.robust_eps / e.robust_steps,
                   pgd_restarts=e.robust_restarts)

    @property
    def eps_01(self) -> float:
        """ε on the [0, 1] pixel scale: half of ε in [-1, 1] (the map u = (x + 1) / 2 halves every distance)."""
        return self.eps / 2

    def describe(self) -> dict:
        """The ball as a protocol records it: norm, ε, its unit and ε on the [0, 1] scale."""
        return {"norm": self.norm, "eps": self.eps, "eps_unit": EPS_UNIT, "eps_01_scale": self.eps_01}
