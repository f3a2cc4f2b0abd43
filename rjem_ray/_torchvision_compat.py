"""Make ``import torchvision`` work beside a CPU-only torch.

The registry's torchvision wheel is a CUDA build. Its ``_C`` extension fails to load next to CPU torch,
and its Python meta registrations then refer to ``torchvision::nms``/``qnms`` schemas that were never
defined, so the import raises ``RuntimeError: operator torchvision::nms does not exist``. Defining those
two schemas first lets torchvision (and torch-fidelity, which imports it) load; its C++ ops stay
unavailable, which this project never uses. This module runs in every process that imports the package
(Ray workers included), because ``rjem_ray/__init__.py`` imports it before anything else.
"""

from __future__ import annotations

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _has_schema(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> None:
    """Define the two op schemas torchvision registers against, when nothing defines them now.

    Idempotent and cheap; called at package import and again right before every torchvision import,
    because a definition can be dropped in a long-lived driver process (seen after a Ray Train fit).
    """
    for op in ("nms", "qnms"):
        if _has_schema(op):
            continue  # a working torchvision (CUDA torch, or a matching CPU build) or an earlier call defined it
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define(f"{op}{_SCHEMA}")
        _libraries.append(lib)  # the definition lives as long as the Library object


_libraries: list[torch.library.Library] = []
