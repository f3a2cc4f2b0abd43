"""The JEM loss of one training step: its forward passes (:class:`JointForward`) and its value (:func:`jem_loss`).

    ``L = CE(f(x_cls), y) + w_px (mean E(x_pos) − mean E(x_q)) + λ (E(x_pos)² + E(x_q)²).mean()``

with ``E(x) = −logsumexp_y f(x)[y]`` in nats, ``x_cls`` the classification input (``inputs.py``: the clean
batch, PGD's ``x_adv`` or, with gradreg, the clean batch plus a penalty added by that input), ``x_pos`` the
clean positive batch (``x_cls`` itself outside robust-jem) and ``x_q`` the sampler's negatives
(``negatives.py``); ``w_px`` is ``train.energy_weight`` and ``λ`` ``train.energy_l2``. Classifier modes keep
the first term only.

Design choices that the reference code leaves implicit:

* The three forward passes of the loss (``x_cls``, ``x``, ``x_q``) are made by one module,
  :class:`JointForward`, so DDP sees one forward and one backward per step while BatchNorm still
  normalises each batch by its own statistics (as the JEM++ reference does with separate calls).
* The Langevin sampler and the loss's view of its samples ``x_q`` share one BatchNorm choice,
  ``train.sampler_bn_mode``, so the energy the loss raises is the one the sampler lowered:
  ``train`` (default) normalises the negative batch by its own statistics in both places; ``eval``
  uses the running statistics in both. Neither updates the running statistics. Measured on the demo
  config (400 steps, docs/RESULTS.md): ``eval`` let the loss drive E(x_q) far above E(x) (−1.3 vs +1.4,
  a contrast the short-run sampler never closes) and left PGD-20 at 0.10 and AutoAttack at 0.00; the
  batch-statistics view kept E(x) ≈ E(x_q) and reached AutoAttack 0.49, against 0.21 for main's mixed
  choice (eval-mode sampler, train-mode loss view).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import BN_MODES, batchnorm_eval, is_batchnorm, running_stats_frozen
from .energy import marginal_energy

__all__ = ["JointForward", "jem_loss"]


class JointForward(nn.Module):
    """Logits for the classification batch, the positive batch and the negative samples, in one call.

    Each batch goes through ``model`` separately, so BatchNorm (train mode) uses per-batch statistics
    for ``x_cls`` and ``x_pos``. The negative samples never update the running statistics (those
    describe data only, since they are what evaluation and generation normalise with), and they are
    seen under the BatchNorm mode the sampler used (``neg_bn_mode``), so ``E(x_q)`` in the loss equals
    the energy the sampler descended (on main before this rule the sampler ran in eval mode and the
    loss looked in train mode: the sampler's energy fell −3.8 → −13.4 while the loss's view of the same
    samples moved −3.7 → −4.1):

    * ``"train"`` (default; JEM++ samples in train mode too): the negative batch's own statistics;
    * ``"eval"``: running statistics.

    The clean positive batch ``x_pos`` (robust-jem) is normalised by its own statistics too, but updates
    the running statistics only with ``pos_updates_running_stats`` (``train.bn_running_stats:
    classification+positive``). By default only ``x_cls`` does, so the running statistics describe the
    batches the classifier is trained on (``x_adv`` in robust modes). Averaging clean and adversarial
    statistics gives evaluation a network that no training pass ever was: on the 600-step demo
    checkpoint, re-estimating the running statistics on PGD-5 images alone raised APGD-CE accuracy
    0.704 → 0.776 and shrank the PGD-20 − APGD-CE gap 0.084 → 0.024 with clean accuracy unchanged, while
    re-estimating them on clean images alone left PGD-20 at 0.06 (docs/RESULTS.md).

    ``x_pos`` may be ``None`` when it equals ``x_cls`` (non-robust energy mode) and ``x_neg`` may be
    ``None`` (classifier modes).

    Without BatchNorm (``model.norm: group | none | farkas``) every pass is a per-image function, so the
    batches go through the network as **one** concatenated forward (``concat``): one graph, whose backward
    produces the last layers' gradients first, and DDP's bucket all-reduces start while the rest of the
    backward runs. (With three separate calls the autograd engine finishes the last call's backward before
    the others', and no parameter's gradient is complete until the first call's backward.) BatchNorm needs
    each batch's own statistics, so there the calls stay separate.
    """

    def __init__(self, model: nn.Module, neg_bn_mode: str = "train", pos_updates_running_stats: bool = False):
        super().__init__()
        if neg_bn_mode not in BN_MODES:
            raise ValueError(f"neg_bn_mode must be 'eval' or 'train', got {neg_bn_mode!r}")
        self.model = model
        self.neg_bn_mode = neg_bn_mode
        self.pos_updates_running_stats = pos_updates_running_stats
        self.concat = not any(is_batchnorm(m) for m in model.modules())

    def forward(self, x_cls, x_pos=None, x_neg=None, x_fd=None):
        """``(f(x_cls), f(x_pos) | None, f(x_neg) | None)``, and ``f(x_fd)`` fourth when ``x_fd`` is given
        (gradreg's ``x + h d``: batch statistics like ``x_cls``, running statistics frozen)."""
        if self.concat:
            given = [x for x in (x_cls, x_pos, x_neg, x_fd) if x is not None]
            outs = iter(self.model(torch.cat(given)).split([len(x) for x in given]))
            out = [next(outs) if x is not None else None for x in (x_cls, x_pos, x_neg, x_fd)]
            return tuple(out) if x_fd is not None else tuple(out[:3])
        out_neg = None
        if x_neg is not None:
            # First: the x_cls / x_pos passes move the running statistics, which an eval-mode sampler used.
            view = batchnorm_eval if self.neg_bn_mode == "eval" else running_stats_frozen
            with view(self.model):
                out_neg = self.model(x_neg)
        out_cls = self.model(x_cls)
        out_pos = None
        if x_pos is not None:
            with contextlib.nullcontext() if self.pos_updates_running_stats else running_stats_frozen(self.model):
                out_pos = self.model(x_pos)
        if x_fd is None:
            return out_cls, out_pos, out_neg
        with running_stats_frozen(self.model):
            return out_cls, out_pos, out_neg, self.model(x_fd)


def jem_loss(
    logits_cls: torch.Tensor,
    y: torch.Tensor,
    logits_pos: torch.Tensor | None,
    logits_neg: torch.Tensor | None,
    energy_weight: float,
    energy_l2: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(f(x_cls), y) + w_px (mean E(x_pos) − mean E(x_q)) + λ (E(x_pos)² + E(x_q)²).mean()``.

    Returns the loss and its parts as Python floats (``loss``, ``ce``, ``acc``, ``e_pos``, ``e_neg``),
    read from the device in one transfer (one host synchronisation per step, not one per figure).
    """
    logits_cls = logits_cls.float()
    ce = F.cross_entropy(logits_cls, y)
    names, figures = ["ce", "acc"], [ce.detach(), (logits_cls.argmax(1) == y).float().mean()]
    loss = ce
    if logits_neg is not None:
        e_pos = marginal_energy((logits_pos if logits_pos is not None else logits_cls).float())
        e_neg = marginal_energy(logits_neg.float())
        loss = loss + energy_weight * (e_pos.mean() - e_neg.mean())
        if energy_l2 > 0:
            loss = loss + energy_l2 * (e_pos.pow(2) + e_neg.pow(2)).mean()
        names += ["e_pos", "e_neg"]
        figures += [e_pos.detach().mean(), e_neg.detach().mean()]
    values = torch.stack([loss.detach(), *figures]).tolist()
    return loss, dict(zip(["loss", *names], values))
