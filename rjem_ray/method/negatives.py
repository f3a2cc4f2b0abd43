"""The negative samples ``x_q`` of the energy term: persistent chains leased from the replay buffer, moved by
the Langevin sampler, written back.

For one step of an energy mode (METHOD.md, "Training"): lease B slots of the replay buffer (each re-initialised
with probability ``buffer.reinit_freq`` from the class-conditional Gaussian mixture, or from uniform noise for a
``buffer.noise_init`` fraction of those; ``replay_buffer.py``, ``gmm.as_init_fn``), run
SGLD or PYLD on the marginal energy ``E(x) = −logsumexp_y f(x)[y]`` from their contents (``samplers.py``;
``sampler.*`` keys, [-1, 1] units), write the results back to the same slots. The sampler's passes see
BatchNorm in ``train.sampler_bn_mode`` (``batchnorm.pass_mode``), the mode the loss's view of ``x_q`` uses too
(``loss.JointForward``), and never move the running statistics.

Classifier modes have no energy term: :class:`NoNegatives` stands in, so the step reads the same in every mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .batchnorm import pass_mode
from .replay_buffer import Lease, ReplayBuffer
from .samplers import run_sampler

if TYPE_CHECKING:
    from .samplers import SamplerConfig

__all__ = ["Negatives", "NoNegatives"]


class Negatives:
    """``x_q``: ``batch`` chains of ``buffer`` (looked up at each call, so a wrapped buffer is honoured) moved by
    the sampler ``sampler`` (the config's ``sampler`` section) on ``net`` in ``bn_mode`` (``train.sampler_bn_mode``).

    ``model`` is the module inside ``net`` whose BatchNorm layers and train/eval flag the pass mode acts on.
    """

    def __init__(self, net: nn.Module, model: nn.Module, buffer: ReplayBuffer, batch: int, device: torch.device,
                 sampler: SamplerConfig, bn_mode: str):
        self.net, self.model, self.buffer = net, model, buffer
        self.batch, self.device = batch, device
        self.sampler, self.bn_mode = sampler, bn_mode

    def lease(self) -> tuple[Lease, torch.Tensor]:
        """The leased slots and their contents on the device (float32 ``[B, C, H, W]`` in [-1, 1])."""
        lease = self.buffer.lease(self.batch)
        return lease, torch.from_numpy(lease.x).to(self.device)

    def write_back(self, lease: Lease, x_q: torch.Tensor) -> None:
        """Store the moved chains ``x_q`` in the slots of ``lease``."""
        self.buffer.write_back(lease.slots, x_q.detach().cpu().numpy())

    def sample(self) -> torch.Tensor:
        """Lease, run the sampler, write back; returns ``x_q`` (detached)."""
        lease, x0 = self.lease()
        s = self.sampler
        # Batch statistics (train mode) without updating the running ones: those describe data only,
        # and the loss's view of x_q (JointForward, same mode) then normalises exactly as the sampler did.
        with pass_mode(self.net, self.model, self.bn_mode):
            x_q = run_sampler(
                self.net, x0, kind=s.kind, steps=s.steps, inner_steps=s.inner_steps,
                step_size=s.step_size, noise_std=s.noise_std, generator=None, outer_step_size=s.outer_step_size,
            )
        self.write_back(lease, x_q)
        return x_q


class NoNegatives:
    """Classifier modes: no energy term, so no negatives (``x_q`` is ``None``) and no replay buffer."""

    def sample(self) -> None:
        return None
