"""A small classifier of real offline digits that tests of attacks and robustness reports share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rjem_ray.core.data import load_split, to_model_space


def digits_14(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mnist5k ``split`` average-pooled to 14×14 (still in [-1, 1]) and its labels."""
    imgs, labels = load_split("mnist5k", split)
    return F.avg_pool2d(to_model_space(imgs), 2), labels


def digit_subset(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of :func:`digits_14` ``split`` drawn without replacement with seed 0 (the file is class-sorted,
    so a prefix would hold one or two classes) and their labels."""
    x, y = digits_14(split)
    sub = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return x[sub], y[sub]


def train_digit_mlp() -> nn.Module:
    """An MLP on 14×14 digits (~0.92 test accuracy), trained for 15 epochs with seed 0; eval mode."""
    x, y = digits_14("train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(196, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(15):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            b = perm[i : i + 128]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
