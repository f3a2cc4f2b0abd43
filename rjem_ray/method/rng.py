"""The random-number generators one training step draws from, saved with a checkpoint and restored on resume.

* the CPU generator (``torch.get_rng_state``): PGD's random start, SGLD's noise and dropout on a CPU device;
* the augmentation generator ``gen`` (random crops, flips and the Gaussian noise of ``data.noise_std``);
* on a CUDA device, that device's generator (PGD's random start and SGLD's noise draw there), ``cuda_rng``.

The replay buffer draws from its own numpy generator, saved in its own state (``replay_buffer.py``).
"""

from __future__ import annotations

import torch

__all__ = ["rng_state", "set_rng_state"]


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
