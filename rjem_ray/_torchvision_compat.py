"""Make ``import torchvision`` work where torchvision's compiled library cannot load, and only there.

A torchvision that matches torch (every CUDA install, or a matching CPU build) defines its ops
(``torchvision::nms``, ``qnms``, ``roi_align``, ...) in C++ when its ``_C`` extension loads. Defining any
of them from Python before that makes the process abort ("Tried to register an operator ... multiple
times"), so on such an install this module defines nothing.

Where ``_C`` cannot load -- the registry's torchvision wheel is a CUDA build, and beside a CPU-only torch
its ``_C`` fails to load -- torchvision's Python meta registrations still refer to the ``nms`` and ``qnms``
schemas (``torchvision/_meta_registrations.py`` registers fake kernels for those two unconditionally,
everything else only when ``_C`` loaded), so ``import torchvision`` raises ``RuntimeError: operator
torchvision::nms does not exist``. There, and only there, this module defines those two schemas, which
lets torchvision (and torch-fidelity, which imports it) load; its C++ ops stay unavailable, which this
project never uses.

To tell the two apart without importing torchvision (which is what may fail), it locates the package
with ``importlib.util.find_spec``, finds ``_C`` the way torchvision's ``extension.py`` does (a
``FileFinder`` over ``importlib.machinery.EXTENSION_SUFFIXES`` in the package directory) and loads it with
``torch.ops.load_library``, the call torchvision itself makes -- so torchvision's own later load of the
same file is a no-op. Nothing is defined when that load succeeds, when torchvision is not installed, or
when the schemas already exist.

This module runs in every process that imports the package (Ray workers included), because
``rjem_ray/__init__.py`` calls it before anything else; modules that import torchvision call it again
first. It needs only torch.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_OPS = ("nms", "qnms")  # what torchvision/_meta_registrations.py registers against without _C

_libraries: list[torch.library.Library] = []  # a Python definition lives as long as its Library object
_extension_loaded: bool | None = None  # outcome of loading torchvision's _C; None: not tried yet


def _has_schema(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        return True
    except RuntimeError:
        return False


def _torchvision_dir() -> str | None:
    """torchvision's package directory, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def _extension_path(package_dir: str) -> str | None:
    """Path of torchvision's ``_C`` extension, found as its ``_get_extension_path`` does; None if absent."""
    loader_details = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    ext_spec = importlib.machinery.FileFinder(package_dir, loader_details).find_spec("_C")
    return None if ext_spec is None else ext_spec.origin


def _torchvision_extension_loads() -> bool:
    """Load torchvision's ``_C`` (once per process); True when it loaded or there is nothing to load."""
    global _extension_loaded
    if _extension_loaded is None:
        package_dir = _torchvision_dir()
        if package_dir is None:
            return True  # not installed (yet): nothing to make importable; ask again next call
        path = _extension_path(package_dir)
        if path is None:
            _extension_loaded = False  # torchvision without _C: its Python side still needs the schemas
        else:
            try:
                torch.ops.load_library(path)
                _extension_loaded = True
            except (OSError, ImportError, RuntimeError):
                _extension_loaded = False
    return _extension_loaded


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` when torchvision's ``_C`` cannot load and nothing defines them.

    Idempotent and cheap; called at package import and again right before every torchvision import,
    because a Python definition can be dropped in a long-lived driver process (seen after a Ray Train fit).
    """
    if all(_has_schema(op) for op in _OPS):
        return  # torchvision's _C, or an earlier call, defined them
    if _torchvision_extension_loads():
        return  # a matching torchvision defines its ops in C++; a Python definition would abort it
    for op in _OPS:
        if _has_schema(op):
            continue
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define(f"{op}{_SCHEMA}")
        _libraries.append(lib)
