"""Image grids: tensors in [-1, 1] to PNG files (PIL; torchvision's image decoders are unavailable here)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._torchvision_compat import ensure_torchvision_importable


def to_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile ``x`` ``[N, C, H, W]`` in [-1, 1] into one uint8 image ``[H', W', C]`` (C is 1 or 3)."""
    ensure_torchvision_importable()
    from torchvision.utils import make_grid  # lazy: after the shim call above (_torchvision_compat)

    n = x.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = make_grid(img, nrow=nrow, padding=pad, pad_value=255)  # always 3 channels
    return grid.permute(1, 2, 0).contiguous()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image  # lazy: Pillow (~60 ms), only to write the file; `rjem --help` imports this module

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_grid(x, nrow).numpy()).save(path)
    return path
