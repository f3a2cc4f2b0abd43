"""One JEM++ / Robust-JEM training step and the state around it, in plain PyTorch.

The step (METHOD.md, "Training"), for a labelled batch ``(x, y)`` in [-1, 1], is straight-line code over the
objects that hold each idea:

1. augment ``x`` (reflect-pad + crop [+ flip] + Gaussian noise of std ``data.noise_std``; ``core/data.py``);
2. the classification input and the other batches of the loss (``inputs.py``, one strategy chosen from the
   config): the clean ``x``; robust modes ``x_adv = PGD(x, y)`` (untargeted, ε-ball ∩ [-1, 1]), or, with
   ``train.robust_term: gradreg``, the clean ``x`` plus the finite-difference input-gradient penalty
   ``λ mean_i ((CE(x_i + h d_i) − CE(x_i)) / h)²`` (``gradreg.py``; no PGD);
3. energy modes: lease B samples from the replay buffer (5 % re-initialised from the class-conditional
   Gaussian mixture), run SGLD/PYLD on ``E(x)``, write them back (``negatives.py``; made by the strategy of
   step 2, which fuses them with PGD's passes when BatchNorm allows);
4. ``L = CE(f(x_cls), y) + w_px (mean E(x) − mean E(x_q)) + λ (E(x)² + E(x_q)²).mean()`` (``loss.py``),
   plus the input's penalty (gradreg);
5. the divergence check, then one optimiser step.

Ray appears nowhere here: the Ray Train worker (``train_worker.py``) builds a :class:`Learner`, calls
:meth:`Learner.step` and reports (``loop.run_loop``). Distributed data parallelism enters only as an optional
``wrap`` (DDP) of :class:`~rjem_ray.method.loss.JointForward` and through ``torch.distributed`` reductions of
scalars (``reducer.py``).

A step whose loss is non-finite or whose magnitude exceeds ``train.divergence_threshold`` never reaches the
optimiser: :class:`DivergenceError` is raised and the caller rolls back or stops.

The configuration of the step and its loop, the ``train.*`` and ``optim.*`` sections (:class:`TrainConfig`,
:class:`OptimConfig`, with :data:`MODES`), is declared here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..core.data import Augmenter, ImageStream, dataset_info
from ..core.settings import setting
from .ddp import compiled_or_eager
from .gmm import ClassConditionalGMM, as_init_fn
from .gradreg import NORMS as GRADREG_NORMS
from .inputs import classification_input
from .loss import JointForward, jem_loss
from .models import build_model
from .negatives import Negatives, NoNegatives
from .reducer import Reducer
from .replay_buffer import LocalReplayBuffer, ReplayBuffer
from .rng import rng_state, set_rng_state
from .scaling import LR_SCALINGS, plan
from .schedules import lr_multiplier
from .speed import PRECISIONS, SWITCHES, FastNet

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["MODES", "OptimConfig", "TrainConfig", "DivergenceError", "Learner", "build_optimizer", "cpu_copy"]


MODES = ("classifier", "robust-classifier", "jempp", "robust-jem")  # train.mode


@dataclass(frozen=True)
class OptimConfig:
    """The ``optim.*`` section: the optimiser (:func:`build_optimizer`) and its learning-rate schedule
    (``schedules.py``)."""

    name: str = setting("sgd", choices=("sgd", "adam"))
    lr: float = setting(0.1, gt=0)  # weak scaling: for one worker's batch, times the lr rule; strong: global batch
    # weak scaling's learning-rate rule for N workers: linear (× N) | sqrt (× √N) | none | auto (linear for
    # sgd, sqrt for adam); rjem_ray/method/scaling.py
    lr_scaling: str = setting("auto", choices=LR_SCALINGS)
    momentum: float = setting(0.9, ge=0.0, le=1.0)
    weight_decay: float = setting(5e-4, ge=0)
    schedule: str = setting("cosine", choices=("constant", "cosine", "step"))
    warmup_steps: int = setting(0, ge=0)  # linear learning-rate warm-up, reference steps (scaling.py)
    milestones: list[float] = setting([0.5, 0.75], ge=0.0, le=1.0)  # fractions of train.steps (step schedule)
    gamma: float = setting(0.2, ge=0.0, le=1.0)  # step-schedule decay factor


@dataclass(frozen=True)
class TrainConfig:
    """The ``train.*`` section: the training step (:class:`Learner`) and the loop's cadence (``loop.py``)."""

    mode: str = setting("robust-jem", choices=MODES)
    # reference steps of batch_size images (weak scaling: N per optimiser step on N workers)
    steps: int = setting(1000, ge=1)
    batch_size: int = setting(64, ge=1)  # weak scaling: per worker; strong: global, split evenly across workers
    energy_weight: float = setting(1.0, ge=0)  # w_px
    energy_l2: float = setting(0.0, ge=0)  # weight of (E(x_pos)^2 + E(x_q)^2).mean()
    divergence_threshold: float = setting(1e8, gt=0)  # |loss| above this (or non-finite) counts as divergence
    max_rollbacks: int = setting(3, ge=0)  # divergences rolled back to the last good checkpoint before the run stops
    rollback_lr_factor: float = setting(0.5, ge=0.0, le=1.0)  # learning rate multiplier applied at each rollback
    # BatchNorm statistics of the sampler's passes AND of the loss's view of x_q (one choice for both, so
    # the loss raises the energy the sampler lowered; running statistics never updated by x_q):
    # train (default) = the negative batch's own statistics; eval = running statistics. See method/batchnorm.py.
    sampler_bn_mode: str = setting("train", choices=("train", "eval"))
    # which training passes update BatchNorm's running statistics (what evaluation, PGD in eval mode and
    # generation normalise with): classification (default) = only the classification batch x_cls (x_adv in
    # robust modes) | classification+positive = x_cls and the clean positive batch x_pos of robust-jem (the
    # earlier behaviour: running statistics then average two distributions; docs/RESULTS.md). method/loss.py
    bn_running_stats: str = setting("classification", choices=("classification", "classification+positive"))
    # autocast of the network's passes (rjem_ray/method/speed.py): auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16;
    # weights, optimiser state, images and Langevin iterates stay fp32 in every case
    precision: str = setting("auto", choices=PRECISIONS)
    # NHWC memory layout / torch.compile of the network used by every pass: auto (on for CUDA) | true | false
    channels_last: str = setting("auto", choices=SWITCHES, bools=True)
    compile: str = setting("auto", choices=SWITCHES, bools=True)
    # PGD and sampler steps share one forward/backward of the concatenated batch; applies only with
    # attack.bn_mode = eval and sampler_bn_mode = eval (samples then independent; method/batchnorm.py)
    fuse_passes: bool = True
    # robust modes' classification term: pgd (CE at PGD's x_adv, the attack.* keys) | gradreg (CE at the
    # clean x + gradreg_strength * mean ||grad_x CE||_*^2 by finite differences, no PGD; rjem_ray/method/gradreg.py)
    robust_term: str = setting("pgd", choices=("pgd", "gradreg"))
    # lambda, in ([-1, 1] unit)^2 so that the penalty is a loss (1.0 stalled the demo)
    gradreg_strength: float = setting(0.01, ge=0)
    # finite-difference step h, [-1, 1] units (L-inf: per pixel; L2: per image)
    gradreg_step: float = setting(0.01, gt=0)
    # attack norm defended against; penalises its dual gradient norm (linf: L1, l2: L2)
    gradreg_norm: str = setting("linf", choices=GRADREG_NORMS)
    log_every: int = setting(20, ge=1)
    checkpoint_every: int = setting(200, ge=1)
    eval_every: int = setting(0, ge=0)  # evaluate eval_metrics on rank 0 every N steps and report them (0: never)
    # metrics evaluated every eval_every steps; the names are checked by EvalConfig (evaluation/registry.py)
    eval_metrics: list[str] = field(default_factory=lambda: ["fid"])
    seed: int = 0


class DivergenceError(RuntimeError):
    """The loss became non-finite or exploded; the optimiser step was not taken."""


def cpu_copy(obj):
    """A deep copy of nested dicts/lists/tuples whose tensors are all copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """``optim.name``: SGD with ``optim.momentum``, or Adam; ``optim.lr`` and ``optim.weight_decay`` (the
    learning rate is set again before every step: ``Learner._apply_lr``)."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


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
        self.negatives: Negatives | NoNegatives = NoNegatives()
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
            self.negatives = Negatives(self.net, self.model, buffer, self.batch_per_worker, self.device,
                                       cfg.sampler, t.sampler_bn_mode)
        # clean, PGD, PGD fused with the sampler, or gradreg: chosen once, here (inputs.py)
        self.cls_input = classification_input(cfg, self.net, self.model, self.negatives)
        self._apply_lr()

    # ------------------------------------------------------------------------------------------ step

    def _loss_module(self, wrap) -> nn.Module:
        """The loss's :class:`~rjem_ray.method.loss.JointForward`, DDP-wrapped by ``wrap`` when given.

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
        """Whether PGD and the sampler share their passes (``inputs.FusedPGDInput``): robust-jem with
        ``train.fuse_passes`` and BatchNorm in eval mode for both (``attack.bn_mode`` and
        ``train.sampler_bn_mode``)."""
        return self.cls_input.fused

    def step(self) -> dict[str, float]:
        """One optimiser step; returns this rank's metrics. Raises :class:`DivergenceError`."""
        cfg = self.cfg
        self._apply_lr()
        x, y = next(self.stream)
        x, y = x.to(self.device), y.to(self.device)
        x = self.augment(x, generator=self.gen)
        self.net.train()
        batches = self.cls_input.batches(x, y, self.step_count)
        logits_cls, logits_pos, logits_neg, *extra_logits = self.joint(*batches.passes)
        loss, figures = jem_loss(logits_cls, y, logits_pos, logits_neg, cfg.train.energy_weight, cfg.train.energy_l2)
        loss, figures = self.cls_input.add_penalty(loss, figures, logits_cls, extra_logits, y)
        value = figures.pop("loss")
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
        return {"loss": value, **figures, "lr": self.lr, "eps": batches.eps}

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
