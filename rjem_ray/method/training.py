"""One JEM++ / Robust-JEM training step and the state around it, in plain PyTorch.

The step (METHOD.md, "Training"), for a labelled batch ``(x, y)`` in [-1, 1]:

1. augment ``x`` (reflect-pad + crop [+ flip] + Gaussian noise of std ``data.noise_std``);
2. robust modes: ``x_adv = PGD(x, y)`` (untargeted, ε-ball ∩ [-1, 1]) — the classification input; or,
   with ``train.robust_term: gradreg``, the clean ``x`` plus the finite-difference input-gradient
   penalty ``λ mean_i ((CE(x_i + h d_i) − CE(x_i)) / h)²`` (``rjem_ray/method/gradreg.py``; no PGD);
3. energy modes: lease B samples from the replay buffer (5 % re-initialised from the class-conditional
   Gaussian mixture), run SGLD/PYLD on ``E(x)``, write them back;
4. ``L = CE(f(x_cls), y) + w_px (mean E(x) − mean E(x_q)) + λ (E(x)² + E(x_q)²).mean()``.

Ray appears nowhere here: the Ray Train worker (``train_worker.py``) builds a :class:`Learner`, calls
:meth:`Learner.step` and reports. Distributed data parallelism enters only as an optional
``wrap`` (DDP) of :class:`JointForward` and through ``torch.distributed`` reductions of scalars.

Design choices that the reference code leaves implicit:

* PGD runs on the unwrapped model in eval mode (running statistics, which come from data only, and by
  default from the classification batch only: ``train.bn_running_stats``, :class:`JointForward`).
* The Langevin sampler and the loss's view of its samples ``x_q`` share one BatchNorm choice,
  ``train.sampler_bn_mode``, so the energy the loss raises is the one the sampler lowered:
  ``train`` (default) normalises the negative batch by its own statistics in both places; ``eval``
  uses the running statistics in both. Neither updates the running statistics. Measured on the demo
  config (400 steps, docs/RESULTS.md): ``eval`` let the loss drive E(x_q) far above E(x) (−1.3 vs +1.4,
  a contrast the short-run sampler never closes) and left PGD-20 at 0.10 and AutoAttack at 0.00; the
  batch-statistics view kept E(x) ≈ E(x_q) and reached AutoAttack 0.49, against 0.21 for main's mixed
  choice (eval-mode sampler, train-mode loss view).
* The three forward passes of the loss (``x_cls``, ``x``, ``x_q``) are made by one module,
  :class:`JointForward`, so DDP sees one forward and one backward per step while BatchNorm still
  normalises each batch by its own statistics (as the JEM++ reference does with separate calls).
* A step whose loss is non-finite or whose magnitude exceeds ``train.divergence_threshold`` never
  reaches the optimiser: :class:`DivergenceError` is raised and the caller rolls back or stops.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd, pgd_objective, pgd_start
from ..config import Config
from ..core.data import Augmenter, ImageStream, dataset_info
from .energy import marginal_energy
from .gmm import ClassConditionalGMM, as_init_fn
from .gradreg import gradreg_penalty, loss_gradient, steepest_direction
from .models import build_model
from .replay_buffer import LocalReplayBuffer, ReplayBuffer
from .scaling import crossed, plan
from .samplers import pyld_update, run_sampler, sgld_update
from .ddp import compiled_or_eager
from .speed import FastNet


def rng_state(device: torch.device, gen: torch.Generator) -> dict:
    """The RNG states a step draws from: the CPU generator, the augmentation generator ``gen`` and, on a
    CUDA device, that device's generator (PGD's random start and SGLD's noise draw there), ``cuda_rng``."""
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device, gen: torch.Generator) -> None:
    """Restore :func:`rng_state`; ``cuda_rng`` only on a CUDA device (a CPU resume of a GPU run ignores it)."""
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def cpu_copy(obj):
    """A deep copy of nested dicts/lists/tuples whose tensors are all copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class DivergenceError(RuntimeError):
    """The loss became non-finite or exploded; the optimiser step was not taken."""


@contextmanager
def running_stats_frozen(model: nn.Module):
    """BatchNorm in train mode normalises by batch statistics but leaves its running statistics alone.

    ``momentum = 0`` makes the update ``running ← (1 − 0)·running + 0·batch`` a no-op.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


@contextmanager
def batchnorm_eval(model: nn.Module):
    """BatchNorm layers normalise by their running statistics (eval mode); everything else untouched.

    Used for the loss's view of the negative samples when the sampler ran in eval mode, so that the
    energy the loss raises, ``E(x_q)``, is the very energy the sampler lowered. Running statistics are
    neither used from the batch nor updated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.running_mean, m.running_var) for m in bns]
    for m in bns:
        m.eval()
        # The pass normalises with copies: a backward through it (the loss's view of x_q) may need the
        # statistics it used (a compiled graph saves them), while the next train-mode passes update the
        # originals in place before that backward runs.
        if m.running_mean is not None:
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
    try:
        yield
    finally:
        for m, (mode, mean, var) in zip(bns, saved):
            m.train(mode)
            if mean is not None:
                m.running_mean, m.running_var = mean, var


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
        if neg_bn_mode not in ("eval", "train"):
            raise ValueError(f"neg_bn_mode must be 'eval' or 'train', got {neg_bn_mode!r}")
        self.model = model
        self.neg_bn_mode = neg_bn_mode
        self.pos_updates_running_stats = pos_updates_running_stats
        self.concat = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

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
    cannot share a batch: :class:`Learner` then runs the loops separately. Units as in ``attacks.pgd``
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


def lr_multiplier(step: int, cfg: Config) -> float:
    """Learning-rate factor at optimiser step ``step``: linear warm-up, then the configured schedule."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if o.schedule == "step":
        return o.gamma ** sum(step >= m * total for m in o.milestones)
    return 1.0


def attack_eps(step: int, cfg: Config) -> float:
    """Training ε at ``step``: linear warm-up from 0 over ``attack.eps_warmup_steps``, [-1, 1] units."""
    w = cfg.attack.eps_warmup_steps
    return cfg.attack.eps if not w else cfg.attack.eps * min(1.0, (step + 1) / w)


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


@dataclass
class Reducer:
    """Scalar reductions across DDP ranks; the identity on one process.

    Under nccl the scalars travel on ``device`` (this rank's GPU; None: the current CUDA device), never
    on whatever ``.cuda()`` would pick.
    """

    world_size: int = 1
    device: torch.device | None = None

    def _on_backend(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_backend() != "nccl":
            return t
        device = self.device if self.device is not None and self.device.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
        return t.to(device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = self._on_backend(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.cpu().tolist())}

    def max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = self._on_backend(torch.tensor([value], dtype=torch.float64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


class Learner:
    """Model, optimiser, schedule, data stream, replay buffer and RNG of one training worker."""

    def __init__(
        self,
        cfg: Config,
        images: torch.Tensor,
        labels: torch.Tensor,
        gmm: ClassConditionalGMM | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        buffer: ReplayBuffer | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.plan = plan(cfg, world_size)  # batch, learning rate, buffer and step increment for this worker count
        self.device = torch.device(device)
        self.info = dataset_info(cfg.data.name)
        torch.manual_seed(cfg.train.seed + 1000 * rank)
        model = build_model(cfg.model, self.info)
        if cfg.trainer.sync_batchnorm and world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        # Every pass (PGD, sampler, loss) goes through one FastNet: the speed settings apply to all of
        # them, and self.model (fp32 weights) is what the optimiser steps and the checkpoint holds.
        t = cfg.train
        self.net = FastNet(self.model, precision=t.precision, channels_last=t.channels_last, compile=t.compile,
                           device=self.device)
        self.joint = self._loss_module(wrap)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        self.lr_scale = 1.0  # lowered by each divergence rollback
        self.step_count = 0
        self.rollbacks = 0
        self.batch_per_worker = self.plan.batch_per_worker
        # every worker holds the whole split and reads its part of the run's one image sequence (data.py)
        self.stream = ImageStream(images, labels, self.batch_per_worker, rank=rank, world_size=world_size,
                                  seed=cfg.train.seed)
        self.augment = (
            Augmenter(cfg.data.pad, self.info.hflip, cfg.data.noise_std)
            if cfg.data.augment
            else Augmenter(0, False, cfg.data.noise_std)
        )
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 7 + rank)
        self.reducer = Reducer(world_size, self.device)
        self.buffer: ReplayBuffer | None = None
        if cfg.uses_energy:
            if buffer is None:
                if gmm is None:
                    raise ValueError("energy modes need the Gaussian-mixture initialisation (gmm)")
                buffer = LocalReplayBuffer(
                    self.plan.buffer_per_worker,
                    as_init_fn(gmm, cfg.buffer.noise_init),
                    cfg.buffer.reinit_freq,
                    seed=cfg.train.seed + 104729 * rank,
                )
            self.buffer = buffer
        self._apply_lr()

    # ------------------------------------------------------------------------------------------ step

    def _loss_module(self, wrap) -> nn.Module:
        """The loss's :class:`JointForward`, DDP-wrapped by ``wrap`` when given.

        With ``torch.compile`` on and DDP, the DDP module itself is compiled over an eager network (torch's
        advice for DDP: dynamo's DDPOptimizer then splits the graph at the gradient buckets' boundaries, so
        each bucket's all-reduce starts during the backward). Compiling the network inside DDP instead
        makes the backward one fused graph whose gradients all appear at its end: no overlap.
        """
        t = self.cfg.train
        net = self.net
        compile_ddp = wrap is not None and self.net.compiled
        if compile_ddp:
            net = FastNet(self.model, precision=t.precision, channels_last=t.channels_last, compile=False,
                          device=self.device)
        joint = JointForward(net, t.sampler_bn_mode, pos_updates_running_stats=t.bn_running_stats == "classification+positive")
        if wrap is None:
            return joint
        wrapped = wrap(joint)
        return compiled_or_eager(wrapped) if compile_ddp else wrapped

    @property
    def images_seen(self) -> int:
        """Training images consumed by all workers so far (reference steps × ``train.batch_size``)."""
        return self.step_count * self.cfg.train.batch_size

    def _apply_lr(self) -> None:
        lr = self.plan.lr * self.lr_scale * lr_multiplier(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def fused(self) -> bool:
        """Whether PGD and the sampler share their passes (``attack_and_sample_fused``): robust-jem with
        ``train.fuse_passes`` and BatchNorm in eval mode for both (``attack.bn_mode`` and
        ``train.sampler_bn_mode``)."""
        c = self.cfg
        return (c.train.fuse_passes and self.pgd_term and c.uses_energy and c.attack.bn_mode == "eval"
                and c.train.sampler_bn_mode == "eval")

    @property
    def pgd_term(self) -> bool:
        """Robust mode with PGD's adversarial examples as the classification input."""
        return self.cfg.robust and self.cfg.train.robust_term == "pgd"

    @property
    def gradreg_term(self) -> bool:
        """Robust mode with the finite-difference gradient penalty instead of PGD (``gradreg.py``)."""
        return self.cfg.robust and self.cfg.train.robust_term == "gradreg"

    def _gradreg_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + h d``, ``d`` the steepest direction of CE at ``x`` (``train.gradreg_norm``), taken on the
        network in ``attack.bn_mode`` as PGD would be (running statistics by default)."""
        t = self.cfg.train
        batch_stats = self.cfg.attack.bn_mode == "train"
        self.net.train(batch_stats)
        with running_stats_frozen(self.model) if batch_stats else contextlib.nullcontext():
            g = loss_gradient(self.net, x, y)
        self.net.train()
        return (x + t.gradreg_step * steepest_direction(g, t.gradreg_norm)).detach()

    def _attack_and_sample_fused(self, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float):
        a, s = self.cfg.attack, self.cfg.sampler
        lease = self.buffer.lease(self.batch_per_worker)
        self.net.train(False)
        x_adv, x_q = attack_and_sample_fused(
            self.net, x.clamp(-1, 1), y, torch.from_numpy(lease.x).to(self.device), eps=eps,
            attack_steps=a.steps, attack_step_size=step_size, norm=a.norm, random_start=a.random_start,
            sampler_kind=s.kind, sampler_steps=s.steps, inner_steps=s.inner_steps, sampler_step_size=s.step_size,
            noise_std=s.noise_std, outer_step_size=s.outer_step_size,
        )
        self.net.train()
        self.buffer.write_back(lease.slots, x_q.detach().cpu().numpy())
        return x_adv, x_q

    def _sample_negatives(self) -> torch.Tensor:
        lease = self.buffer.lease(self.batch_per_worker)
        x0 = torch.from_numpy(lease.x).to(self.device)
        s = self.cfg.sampler
        was_training = self.model.training
        batch_stats = self.cfg.train.sampler_bn_mode == "train"
        self.net.train(batch_stats)
        # Batch statistics (train mode) without updating the running ones: those describe data only,
        # and the loss's view of x_q (JointForward, same mode) then normalises exactly as the sampler did.
        with running_stats_frozen(self.model) if batch_stats else contextlib.nullcontext():
            x_q = run_sampler(
                self.net, x0, kind=s.kind, steps=s.steps, inner_steps=s.inner_steps,
                step_size=s.step_size, noise_std=s.noise_std, generator=None, outer_step_size=s.outer_step_size,
            )
        self.net.train(was_training)
        self.buffer.write_back(lease.slots, x_q.detach().cpu().numpy())
        return x_q

    def step(self) -> dict[str, float]:
        """One optimiser step; returns this rank's metrics. Raises :class:`DivergenceError`."""
        cfg = self.cfg
        self._apply_lr()
        x, y = next(self.stream)
        x, y = x.to(self.device), y.to(self.device)
        x = self.augment(x, generator=self.gen)
        self.net.train()
        x_cls = x
        eps = 0.0
        x_neg = None
        if self.pgd_term:
            eps = attack_eps(self.step_count, cfg)
            step_size = cfg.attack.step_size * eps / cfg.attack.eps if cfg.attack.eps else 0.0
        if self.fused:
            x_cls, x_neg = self._attack_and_sample_fused(x, y, eps, step_size)
        elif self.pgd_term:
            batch_stats = cfg.attack.bn_mode == "train"
            self.net.train(batch_stats)
            # train: attack the function the loss will train (batch statistics), running statistics frozen
            with running_stats_frozen(self.model) if batch_stats else contextlib.nullcontext():
                x_cls = pgd(
                    self.net, x.clamp(-1, 1), y, eps=eps, steps=cfg.attack.steps, step_size=step_size,
                    norm=cfg.attack.norm, random_start=cfg.attack.random_start,
                )
            self.net.train()
        if cfg.uses_energy and x_neg is None:
            x_neg = self._sample_negatives()
        x_pos = x if (cfg.uses_energy and self.pgd_term) else None
        extra = {}
        if self.gradreg_term:
            logits_cls, logits_pos, logits_neg, logits_fd = self.joint(x_cls, x_pos, x_neg, self._gradreg_input(x, y))
        else:
            logits_cls, logits_pos, logits_neg = self.joint(x_cls, x_pos, x_neg)
        loss, parts = jem_loss(logits_cls, y, logits_pos, logits_neg, cfg.train.energy_weight, cfg.train.energy_l2)
        if self.gradreg_term:
            penalty, fd = gradreg_penalty(logits_cls, logits_fd, y, h=cfg.train.gradreg_step,
                                          strength=cfg.train.gradreg_strength)
            loss = loss + penalty
            pen, fd_mean = torch.stack([penalty.detach(), fd.mean()]).tolist()
            parts["loss"] += pen
            extra = {"gradreg_penalty": pen, "grad_norm_fd": fd_mean}
        value = parts.pop("loss")
        worst = self.reducer.max(abs(value) if math.isfinite(value) else math.inf)
        if not math.isfinite(worst) or worst > cfg.train.divergence_threshold:
            self.optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(
                f"loss diverged at step {self.step_count}: |loss| = {worst:.3g} "
                f"(threshold train.divergence_threshold = {cfg.train.divergence_threshold:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += self.plan.step_increment
        return {"loss": value, **parts, **extra, "lr": self.lr, "eps": eps}

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self, include_buffer: bool = True) -> dict:
        """Everything needed to continue this worker's run exactly (``torch.load(weights_only=True)``-safe)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,  # reference steps (scaling.py): images_seen / train.batch_size
            "images_seen": self.images_seen,
            "world_size": self.world_size,
            "scaling": self.plan.scaling,
            "global_batch": self.plan.global_batch,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "rng": rng_state(self.device, self.gen),
            "stream": self.stream.state_dict(),
            "config": self.cfg.to_dict(),
        }
        if include_buffer and self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict, load_buffer: bool = True) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # images seen is what a resized run continues from (another batch size re-counts the steps)
        images = state.get("images_seen")
        self.step_count = int(images) // self.cfg.train.batch_size if images is not None else int(state["step"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        if "rng" in state:
            set_rng_state(state["rng"], self.device, self.gen)
        if "position" in state.get("stream", {}):
            self.stream.load_state_dict(state["stream"])
        self.stream.position = self.images_seen  # the run's one image sequence, read on from here
        if load_buffer and self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        self._apply_lr()

    def snapshot(self) -> dict:
        """A deep copy of the state with every tensor on the CPU, kept in memory for divergence rollback.

        On a GPU the model and optimiser tensors would otherwise stay on the device (a second copy of
        the weights and optimiser state in GPU memory for the whole run).
        """
        return cpu_copy(self.state_dict())

    def rollback(self, snapshot: dict, lr_factor: float) -> None:
        """Restore ``snapshot`` and lower the learning rate by ``lr_factor`` (counts one rollback)."""
        rollbacks = self.rollbacks + 1
        scale = self.lr_scale * lr_factor
        self.load_state_dict(snapshot)
        self.rollbacks, self.lr_scale = rollbacks, scale
        self._apply_lr()


# ---------------------------------------------------------------------------------------------- loop

Report = Callable[[dict, "dict | None"], None]


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def is_eval_step(step: int, cfg: Config, increment: int = 1) -> bool:
    """Whether ``run_loop`` evaluates at ``step``, reached by an optimiser step of ``increment`` reference
    steps: when the step crosses a multiple of ``train.eval_every`` (``scaling.crossed``), and at the end.

    Under Ray Train only these steps and checkpoints call ``ray.train.report``: rank 0 logs the other
    metrics to MLflow itself, and every report is a barrier that waits for the controller's next poll.
    """
    every = cfg.train.eval_every
    return bool(every) and (crossed(step - increment, step, every) or step >= cfg.train.steps)


def run_loop(
    learner: Learner,
    report: Report,
    *,
    log: Callable[[str], None] = print,
    log_metrics: Callable[[dict, int], None] | None = None,
    evaluate: Callable[[Learner], dict] | None = None,
) -> None:
    """Step ``learner`` to ``train.steps``, reporting and checkpointing, rolling back divergences.

    Every ``train.log_every`` steps the rank-averaged metrics go to ``report(metrics, None)`` (and to
    ``log_metrics`` and a progress line with the ETA); every ``train.checkpoint_every`` steps and at the
    end ``report(metrics, state)`` receives the full state to persist. Every rank must call this with the
    same schedule: ``report`` is a barrier under Ray Train. Every ``train.eval_every`` steps (and at the
    end) ``evaluate(learner)`` adds its figures (e.g. FID) to the reported metrics. A :class:`DivergenceError` restores the last
    checkpointed state held in memory and multiplies the learning rate by ``train.rollback_lr_factor``,
    at most ``train.max_rollbacks`` times; after that it is raised with the count.
    """
    cfg = learner.cfg
    steps = cfg.train.steps
    good = learner.snapshot() if cfg.train.max_rollbacks > 0 else None
    window: dict[str, float] = {}
    window_n = 0
    t_start, step_start = time.time(), learner.step_count
    p = learner.plan
    line = f"[rjem] training {cfg.train.mode} on {cfg.data.name}: {p.describe()}"
    if learner.buffer is not None:
        line += f", {p.describe_buffer()}" if len(learner.buffer) == p.buffer_per_worker else \
            f", replay buffer {len(learner.buffer)} slots on this worker (kept from the checkpoint)"
    log(f"{line}, steps {learner.step_count}->{steps} (reference steps of {cfg.train.batch_size} images)")
    while learner.step_count < steps:
        try:
            metrics = learner.step()
        except DivergenceError as exc:
            if good is not None and learner.rollbacks < cfg.train.max_rollbacks:
                learner.rollback(good, cfg.train.rollback_lr_factor)
                log(f"[rjem] {exc}; rolled back to step {learner.step_count} with learning-rate scale "
                    f"{learner.lr_scale:g} (rollback {learner.rollbacks}/{cfg.train.max_rollbacks})")
                if log_metrics:
                    log_metrics({"train/rollback": learner.rollbacks, "train/lr_scale": learner.lr_scale},
                                learner.step_count)
                window, window_n = {}, 0
                continue
            raise DivergenceError(
                f"{exc}; stopped after {learner.rollbacks} rollback(s) (train.max_rollbacks = "
                f"{cfg.train.max_rollbacks})"
            ) from None
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + v
        window_n += 1
        s, before = learner.step_count, learner.step_count - p.step_increment
        do_ckpt = crossed(before, s, cfg.train.checkpoint_every) or s >= steps
        do_eval = evaluate is not None and is_eval_step(s, cfg, p.step_increment)
        if not (crossed(before, s, cfg.train.log_every) or do_ckpt or do_eval):
            continue
        avg = learner.reducer.mean({k: v / window_n for k, v in window.items()})
        window, window_n = {}, 0
        rate = (s - step_start) / max(time.time() - t_start, 1e-9)
        avg.update(step=s, steps_per_s=rate, images_seen=learner.images_seen, rollbacks=learner.rollbacks)
        line = (f"[rjem] step {s}/{steps} ({100 * s / steps:.0f}%) loss {avg['loss']:.4f} "
                f"ce {avg['ce']:.4f} acc {avg['acc']:.3f}")
        if "e_pos" in avg:
            line += f" E(x) {avg['e_pos']:.2f} E(x_q) {avg['e_neg']:.2f}"
        log(f"{line} | {rate:.2f} step/s, ETA {format_eta((steps - s) / max(rate, 1e-9))}")
        if do_eval:
            figures = evaluate(learner)
            if figures:
                log("[rjem] eval at step %d: %s" % (s, ", ".join(f"{k} {v:.4g}" for k, v in figures.items())))
            avg.update(figures)
        if log_metrics:
            log_metrics({f"train/{k}": v for k, v in avg.items() if k != "step"}, s)
        if do_ckpt:
            report(avg, learner.state_dict())
            if good is not None:
                good = learner.snapshot()
        else:
            report(avg, None)
