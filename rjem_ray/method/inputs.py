"""The classification input of a training step, one strategy object per way of making it, chosen once from the config.

As ``attacks.py`` does for norms, what differs between the training modes' classification terms lives in a
small object, and the step (``learner.Learner.step``) is one straight line over it. A strategy turns the
augmented batch ``(x, y)`` (in [-1, 1]) into the batches the loss sees (:class:`LossBatches`) and may add a
term to the loss:

* :class:`CleanInput` (``classifier``, ``jempp``): ``x_cls = x``; the positive batch is ``x_cls`` itself;
* :class:`PGDInput` (robust modes, ``train.robust_term: pgd``): ``x_cls = x_adv = PGD(x, y)``, untargeted,
  in the ε-ball ∩ [-1, 1] at the warmed-up ε (``schedules.attack_eps``), on the network in ``attack.bn_mode``;
  robust-jem's positive batch is the clean ``x``;
* :class:`FusedPGDInput`: the same, with each PGD step and sampler step sharing one forward/backward of the
  concatenated batch (:func:`attack_and_sample_fused`; robust-jem with ``train.fuse_passes`` and BatchNorm in
  eval mode for both, ``attack.bn_mode = train.sampler_bn_mode = eval``);
* :class:`GradRegInput` (robust modes, ``train.robust_term: gradreg``): ``x_cls = x`` plus the
  finite-difference input-gradient penalty ``λ mean_i ((CE(x_i + h d_i) − CE(x_i)) / h)²`` (``gradreg.py``;
  no PGD), ``λ = train.gradreg_strength``, ``h = train.gradreg_step`` in [-1, 1] units.

Each strategy also draws the step's negatives (``negatives.py``), in the order the step has always made its
passes and random draws: the attack (PGD's random start) first, then the sampler (SGLD's noise), then gradreg's
input-gradient pass (dropout draws in train mode); a seeded run is the same run whichever object makes it.

PGD runs on the unwrapped model (``net``, never the DDP wrapper): in eval mode by default (running
statistics, which come from data only, and by default from the classification batch only:
``train.bn_running_stats``, ``loss.JointForward``), or with ``attack.bn_mode = train`` on the batch's own
statistics (the function the loss will train), running statistics frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attacks import pgd, pgd_objective, pgd_start
from .batchnorm import pass_mode
from .energy import marginal_energy
from .gradreg import gradreg_penalty, loss_gradient, steepest_direction
from .samplers import pyld_update, sgld_update
from .schedules import attack_eps, attack_step_size

if TYPE_CHECKING:
    from ..config import Config
    from .negatives import Negatives, NoNegatives

__all__ = ["LossBatches", "ClassificationInput", "CleanInput", "PGDInput", "FusedPGDInput", "GradRegInput",
           "classification_input", "attack_and_sample_fused"]


@dataclass
class LossBatches:
    """The batches one step's loss sees: ``x_cls`` (classification), ``x_pos`` (clean positive batch; None
    when it is ``x_cls``), ``x_neg`` (the negatives ``x_q``; None in classifier modes), ``x_fd`` (gradreg's
    ``x + h d``; None otherwise), and ``eps``, the attack radius the classification input was made at
    ([-1, 1] units; 0.0 without PGD)."""

    x_cls: torch.Tensor
    x_pos: torch.Tensor | None
    x_neg: torch.Tensor | None
    eps: float = 0.0
    x_fd: torch.Tensor | None = None

    @property
    def passes(self) -> tuple:
        """The arguments of ``JointForward``: ``(x_cls, x_pos, x_neg)``, and ``x_fd`` fourth when there is one."""
        batches = (self.x_cls, self.x_pos, self.x_neg)
        return batches if self.x_fd is None else (*batches, self.x_fd)


class ClassificationInput:
    """How a step makes its classification input ``x_cls`` (and the loss term that goes with it).

    ``net`` is the network every pass calls (a ``FastNet``), ``model`` the module inside it (its BatchNorm
    layers, its train/eval flag), ``negatives`` the step's negative samples (``NoNegatives`` in classifier
    modes). Subclasses implement :meth:`batches` and, when they add to the loss, :meth:`add_penalty`.
    """

    fused = False  # whether PGD and the sampler share their passes

    def __init__(self, cfg: Config, net: nn.Module, model: nn.Module, negatives: Negatives | NoNegatives):
        self.cfg, self.net, self.model, self.negatives = cfg, net, model, negatives

    def batches(self, x: torch.Tensor, y: torch.Tensor, step: int) -> LossBatches:
        """The loss's batches for the augmented batch ``(x, y)`` at optimiser step ``step`` (reference steps)."""
        raise NotImplementedError

    def add_penalty(self, loss: torch.Tensor, figures: dict[str, float], logits_cls: torch.Tensor,
                    extra_logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss + this input's term, figures with it)``; ``extra_logits`` are the logits of the passes
        beyond the first three (``LossBatches.x_fd``). None here: the loss and figures unchanged."""
        return loss, figures


class CleanInput(ClassificationInput):
    """``x_cls = x`` (classifier, jempp): the augmented batch, which is also the positive batch."""

    def batches(self, x, y, step):
        return LossBatches(x_cls=x, x_pos=None, x_neg=self.negatives.sample())


class PGDInput(ClassificationInput):
    """``x_cls = PGD(x, y)`` at ε(step) (robust modes), the clean ``x`` the positive batch of robust-jem."""

    def batches(self, x, y, step):
        a = self.cfg.attack
        eps = attack_eps(step, self.cfg)
        # train: attack the function the loss will train (batch statistics), running statistics frozen
        with pass_mode(self.net, self.model, a.bn_mode):
            x_adv = pgd(self.net, x.clamp(-1, 1), y, eps=eps, steps=a.steps, step_size=attack_step_size(eps, self.cfg),
                        norm=a.norm, random_start=a.random_start)
        x_pos = x if self.cfg.uses_energy else None
        return LossBatches(x_cls=x_adv, x_pos=x_pos, x_neg=self.negatives.sample(), eps=eps)


class FusedPGDInput(ClassificationInput):
    """:class:`PGDInput` whose attack shares each network pass with the sampler (:func:`attack_and_sample_fused`):
    robust-jem with ``train.fuse_passes`` and BatchNorm in eval mode for both (``attack.bn_mode`` and
    ``train.sampler_bn_mode``). The chains come from ``negatives`` and go back to it."""

    fused = True

    def batches(self, x, y, step):
        a, s = self.cfg.attack, self.cfg.sampler
        eps = attack_eps(step, self.cfg)
        step_size = attack_step_size(eps, self.cfg)
        lease, x_q = self.negatives.lease()
        with pass_mode(self.net, self.model, "eval"):
            x_adv, x_q = attack_and_sample_fused(
                self.net, x.clamp(-1, 1), y, x_q, eps=eps,
                attack_steps=a.steps, attack_step_size=step_size, norm=a.norm, random_start=a.random_start,
                sampler_kind=s.kind, sampler_steps=s.steps, inner_steps=s.inner_steps, sampler_step_size=s.step_size,
                noise_std=s.noise_std, outer_step_size=s.outer_step_size,
            )
        self.negatives.write_back(lease, x_q)
        return LossBatches(x_cls=x_adv, x_pos=x, x_neg=x_q, eps=eps)


class GradRegInput(ClassificationInput):
    """``x_cls = x`` plus ``λ mean_i FD_i²``, ``FD_i = (CE(f(x_i + h d_i)) − CE(f(x_i))) / h`` (``gradreg.py``):
    the extra pass at ``x_fd = x + h d`` goes through the loss's forward with the others."""

    def batches(self, x, y, step):
        x_neg = self.negatives.sample()
        return LossBatches(x_cls=x, x_pos=None, x_neg=x_neg, x_fd=self.shifted_input(x, y))

    def shifted_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + h d``, ``d`` the steepest direction of CE at ``x`` (``train.gradreg_norm``), taken on the
        network in ``attack.bn_mode`` as PGD would be (running statistics by default)."""
        t = self.cfg.train
        with pass_mode(self.net, self.model, self.cfg.attack.bn_mode):
            g = loss_gradient(self.net, x, y)
        return (x + t.gradreg_step * steepest_direction(g, t.gradreg_norm)).detach()

    def add_penalty(self, loss, figures, logits_cls, extra_logits, y):
        """``loss + λ mean_i FD_i²``; the figures' ``loss`` grows by the penalty, and ``gradreg_penalty`` and
        ``grad_norm_fd`` (the mean FD, loss per [-1, 1] unit) join them."""
        t = self.cfg.train
        (logits_fd,) = extra_logits
        penalty, fd = gradreg_penalty(logits_cls, logits_fd, y, h=t.gradreg_step, strength=t.gradreg_strength)
        loss = loss + penalty
        pen, fd_mean = torch.stack([penalty.detach(), fd.mean()]).tolist()
        return loss, {**figures, "loss": figures["loss"] + pen, "gradreg_penalty": pen, "grad_norm_fd": fd_mean}


def classification_input(cfg: Config, net: nn.Module, model: nn.Module,
                         negatives: Negatives | NoNegatives) -> ClassificationInput:
    """The strategy ``cfg`` asks for: clean outside robust modes; in robust modes gradreg or PGD by
    ``train.robust_term``, PGD fused with the sampler when ``train.fuse_passes`` holds for robust-jem with
    BatchNorm in eval mode for both the attack and the sampler."""
    if not cfg.robust:
        kind = CleanInput
    elif cfg.train.robust_term == "gradreg":
        kind = GradRegInput
    elif (cfg.train.fuse_passes and cfg.uses_energy and cfg.attack.bn_mode == "eval"
          and cfg.train.sampler_bn_mode == "eval"):
        kind = FusedPGDInput
    else:
        kind = PGDInput
    return kind(cfg, net, model, negatives)


def attack_and_sample_fused(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_q: torch.Tensor,
    *,
    eps: float,
    attack_steps: int,
    attack_step_size: float,
    norm: str,
    random_start: bool,
    sampler_kind: str,
    sampler_steps: int,
    inner_steps: int,
    sampler_step_size: float,
    noise_std: float,
    outer_step_size: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on ``x`` and the sampler on ``x_q`` (marginal energy), sharing one forward/backward per step.

    Valid only when the network treats samples independently, i.e. with BatchNorm in **eval** mode for
    both the attack and the sampler (``attack.bn_mode = eval`` and ``train.sampler_bn_mode = eval``; the
    caller puts ``net`` in eval mode). Then for ``z = cat(x_adv, x_q)``

        ``∇_z [±Σ CE(f(x_adv), y) + s·Σ E(x_q)] = (∇_{x_adv} ±Σ CE, s·∇_{x_q} Σ E)``

    (``s = +1`` for SGLD, which descends ``∇E``; ``s = −1`` for PYLD, which ascends ``∂(−E)/∂x``), so one
    pass of the concatenated batch yields exactly the two gradients the separate loops would take, up
    to fp32 round-off of the larger batch. Step ``i`` fuses PGD step ``i`` with sampler (outer) step ``i``
    while both schedules last; the longer one then runs alone. The random draws happen in the order the
    separate loops make them (PGD's random start, then SGLD's noise per step), so a seeded run is the same
    run. With BatchNorm in train mode each batch is normalised by its own statistics and the two passes
    cannot share a batch: :class:`PGDInput` then runs the loops separately. Units as in ``attacks.pgd``
    and ``samplers.run_sampler``. Returns detached ``(x_adv, x_q)``.
    """
    attack, x0, x_adv, n_attack = pgd_start(x, eps=eps, steps=attack_steps, step_size=attack_step_size,
                                            norm=norm, random_start=random_start)
    sign = 1.0 if sampler_kind == "sgld" else -1.0
    x_q = x_q.detach().clone()
    n = len(x_adv)
    for i in range(max(n_attack, sampler_steps)):
        do_attack, do_sample = i < n_attack, i < sampler_steps
        inputs = ([x_adv.detach().requires_grad_(True)] if do_attack else []) + \
                 ([x_q.detach().requires_grad_(True)] if do_sample else [])
        with torch.enable_grad():
            logits = net(torch.cat(inputs) if len(inputs) == 2 else inputs[0])
            obj = 0.0
            if do_attack:
                obj = obj + pgd_objective(logits[:n] if do_sample else logits, y)
            if do_sample:
                obj = obj + sign * marginal_energy((logits[n:] if do_attack else logits).float()).sum()
            grads = torch.autograd.grad(obj, inputs)
        if do_attack:
            x_adv = attack.update(inputs[0], grads[0], x0)
        if do_sample:
            g = grads[-1]
            if sampler_kind == "sgld":
                x_q = sgld_update(inputs[-1], g, step_size=sampler_step_size, noise_std=noise_std)
            else:
                x_q = pyld_update(inputs[-1], g, step_size=sampler_step_size, inner_steps=inner_steps,
                                  outer_step_size=outer_step_size)
    return x_adv.detach(), x_q.detach()
