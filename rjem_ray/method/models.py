"""Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016) as used by JEM/JEM++.

The network maps NCHW images in [-1, 1] (any channel count, any spatial size of at least 8×8 after the
stem) to logits ``f(x)`` of shape ``[B, K]``. It is split as ``logits = head(stem(x))`` where ``stem`` is
the first convolution, a linear map: PYLD (``samplers.pyld``) relies on that split, because the gradient
of ``<stem(x), p>`` with respect to ``x`` is ``stemᵀ p`` and does not depend on ``x``.

Depth is ``6n + 4`` (n residual blocks per group, three groups of widths 16k, 32k, 64k for widen factor
k). Activations are LeakyReLU(0.2) as in JEM; ``norm`` is ``"batch"``, ``"group"`` or ``"none"`` (JEM
trains without normalisation; JEM++ with BatchNorm). ``"group"`` is GroupNorm with
:data:`GROUP_NORM_GROUPS` groups (fewer when the width is smaller): it normalises each sample by its own
statistics, so a network's output on one image never depends on the rest of the batch or on train/eval
mode. PGD, the Langevin sampler, the loss and evaluation then all see one and the same function, which
BatchNorm cannot give (batch statistics in training, running statistics in evaluation).

``"farkas"`` trains without normalisation through Farkas layers (Pooladian, Finlay & Oberman 2019,
"Farkas layers: don't shift the data, fix the geometry"): every convolution (stem, both convolutions of
each block, projection shortcuts) is a :class:`FarkasConv2d`, whose last output channel is
``z_C = −(1/k) Σ_{c<C} z_c`` with ``k = √(C − 1)``. At every pixel the weighted channel sum
``Σ_{c<C} z_c + k z_C`` is then 0; identity shortcuts and sums of such tensors keep it 0, so *every*
activation's input satisfies it and — a positive combination of negative numbers being negative, Farkas'
lemma in its simplest form — at least one of its channels is ≥ 0 (> 0 unless all are 0) at every pixel:
no layer can die entirely, whatever the weights and biases. ``1/k`` keeps the extra channel at the scale
of the others (a sum of C − 1 roughly independent channels grows like √(C − 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.settings import setting
from .energy import joint_energy, marginal_energy

NORMS = ("batch", "group", "none", "farkas")
GROUP_NORM_GROUPS = 8


def _six_n_plus_four(key: str, depth: int) -> str | None:
    if (depth - 4) % 6 != 0 or depth < 10:
        return f"{key}: {depth} is not allowed; it must be 6n+4 (10, 16, 22, 28, ...)"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.*`` section: the Wide ResNet that :func:`build_model` builds."""

    depth: int = setting(28, check=_six_n_plus_four)  # 6n + 4
    widen: int = setting(10, ge=1)
    # batch | group (GroupNorm: no batch or train/eval dependence) | none | farkas (no normalisation; Farkas
    # layers keep at least one unit of every activation's input >= 0 at every pixel: FarkasConv2d)
    norm: str = setting("batch", choices=NORMS)
    dropout: float = setting(0.0, ge=0.0, le=0.99)
    leak: float = setting(0.2, ge=0)  # LeakyReLU slope
    stem_stride: int = setting(1, choices=(1, 2))  # 2 halves the resolution after the first conv (cheap models)


class FarkasConv2d(nn.Conv2d):
    """A convolution with ``out_channels − 1`` learned filters and a last channel
    ``z_C = −Σ_{c<C} z_c / √(C − 1)`` (biases included), so ``Σ_{c<C} z_c + √(C − 1) z_C = 0`` at every pixel
    (module docstring). ``out_channels`` must be at least 2."""

    def __init__(self, in_channels: int, out_channels: int, *args, **kwargs):
        if out_channels < 2:
            raise ValueError(f"a Farkas layer needs at least 2 output channels, got {out_channels}")
        super().__init__(in_channels, out_channels - 1, *args, **kwargs)
        self.scale = math.sqrt(out_channels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return torch.cat([z, -z.sum(1, keepdim=True) / self.scale], 1)


def _conv(norm: str) -> type[nn.Conv2d]:
    return FarkasConv2d if norm == "farkas" else nn.Conv2d


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = GROUP_NORM_GROUPS
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    if kind in ("none", "farkas"):
        return nn.Identity()
    raise ValueError(f"model.norm must be one of {NORMS}, got {kind!r}")


class PreActBlock(nn.Module):
    """``y = shortcut(x) + conv(act(norm(conv(dropout(act(norm(x)))))))`` with the pre-activation order."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dropout: float, slope: float):
        super().__init__()
        self.bn1 = _norm(norm, c_in)
        conv = _conv(norm)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=True)
        self.bn2 = _norm(norm, c_out)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slope = slope
        self.shortcut = (
            conv(c_in, c_out, 1, stride=stride, bias=True) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(x), self.slope)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.dropout(F.leaky_relu(self.bn2(out), self.slope))
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen classifier; ``forward(x)`` returns logits ``[B, num_classes]``."""

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
        leak: float = 0.2,
        stem_stride: int = 1,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"model.depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.num_classes = num_classes
        self.slope = leak
        self.stem = _conv(norm)(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=True)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(PreActBlock(c_in, widths[group + 1], stride if i == 0 else 1, norm, dropout, leak))
                c_in = widths[group + 1]
        self.blocks = nn.Sequential(*layers)
        self.final_norm = _norm(norm, c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the stem's output ``h = stem(x)``."""
        out = self.blocks(h)
        out = F.leaky_relu(self.final_norm(out), self.slope)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Marginal energy ``E(x) = -logsumexp_y f(x)[y]``, shape ``[B]``."""
        return marginal_energy(self(x))

    def joint_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Joint energy ``E(x, y) = -f(x)[y]``, shape ``[B]``."""
        return joint_energy(self(x), y)


def build_model(model_cfg, info) -> WideResNet:
    """The configured WRN for a dataset (``info`` carries channels and number of classes)."""
    return WideResNet(
        depth=model_cfg.depth,
        widen=model_cfg.widen,
        num_classes=info.num_classes,
        in_channels=info.channels,
        norm=model_cfg.norm,
        dropout=model_cfg.dropout,
        leak=model_cfg.leak,
        stem_stride=model_cfg.stem_stride,
    )
