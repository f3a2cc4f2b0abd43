"""Which device a process computes on: the GPU it was given, never merely a GPU it can see.

Ray 2.60 sets ``CUDA_VISIBLE_DEVICES`` to the assigned GPUs for a task or actor that asked for some, and
leaves it alone for one that asked for none: such a process still sees every GPU of its node, so
``torch.cuda.is_available()`` says nothing about what it was given. The rule here:

* inside Ray (``ray`` imported and initialised in this process): the first GPU Ray assigned to it
  (``ray.get_gpu_ids()``), as an index into the devices this process sees; no assignment → CPU;
* a plain process: ``cuda:0`` when CUDA is available, else CPU.

Ray is never imported here: a process that has not imported it is not a Ray worker.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

__all__ = ["choose_device", "default_device", "resolve_device"]


def choose_device(
    *,
    cuda_available: bool,
    in_ray: bool,
    ray_gpu_ids: Sequence[int | str] = (),
    visible_devices: str | None = None,
) -> str:
    """The device string for a process, from the facts that decide it (a pure function).

    ``ray_gpu_ids``: the GPU ids Ray assigned (``ray.get_gpu_ids()``), physical ids of the node.
    ``visible_devices``: this process's ``CUDA_VISIBLE_DEVICES`` (None when unset). CUDA numbers the
    visible devices 0, 1, …, so an assigned id maps to its position in that list (Ray sets the list to
    exactly the assigned ids, making it ``cuda:0``); without the variable the id is the index itself.
    """
    if not cuda_available:
        return "cpu"
    if not in_ray:
        return "cuda:0"
    if not ray_gpu_ids:
        return "cpu"
    first = str(sorted(ray_gpu_ids, key=lambda i: (len(str(i)), str(i)))[0])
    if visible_devices is not None and visible_devices.strip():
        visible = [v.strip() for v in visible_devices.split(",") if v.strip()]
        return f"cuda:{visible.index(first)}" if first in visible else "cpu"
    return f"cuda:{int(first)}" if first.isdigit() else "cpu"


def _ray_facts() -> tuple[bool, list]:
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return False, []
    try:
        return True, list(ray.get_gpu_ids())
    except Exception:  # a driver, or a Ray without the call: nothing was assigned to this process
        return True, []


def default_device() -> torch.device:
    """The device this process was given (see the module docstring)."""
    in_ray, ids = _ray_facts()
    return torch.device(choose_device(
        cuda_available=torch.cuda.is_available(), in_ray=in_ray, ray_gpu_ids=ids,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    ))


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` as a device (``None`` or ``"auto"``: :func:`default_device`); a clear error otherwise.

    Allowed: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (N below the number of visible GPUs).
    """
    if requested is None or str(requested) == "auto":
        return default_device()
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {requested!r} is not a device; choose auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {requested!r}: this process sees no CUDA device; choose auto or cpu")
        if dev.index is None:
            dev = torch.device("cuda", 0)
        if dev.index >= n:
            raise ValueError(f"--device {requested!r}: this process sees {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev
