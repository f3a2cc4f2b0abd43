"""Tiny datasets written in the exact standard on-disk formats, for tests of anything that loads data.

Each writer returns ``(train_x, train_y, test_x, test_y)``: the images it wrote as ``uint8``
``[N, 3, 32, 32]`` (NCHW, as ``rjem_ray.core.data.load_split`` must return them) and the labels as
``int64 [N]`` in ``[0, num_classes)``. Pixels are random but the three channels differ by construction
(channel c of every image lies in ``[85 c, 85 c + 84]``), so a channel-order mistake is visible.

The CIFAR batches are pickles with ``str`` keys, as the real Python 2 files read under
``pickle.load(f, encoding="latin1")``, which is how ``torchvision.datasets.CIFAR10`` opens them.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.integers(0, 85, size=(n, 3, 32, 32), dtype=np.uint8)
    x += (np.arange(3, dtype=np.uint8) * 85)[None, :, None, None]
    return x


def _labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    # Cycle through all classes (so every class appears), in a shuffled order.
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the real files are Python 2 cPickle, protocol 2


def _cifar_batch(x: np.ndarray, label_items: dict, batch_label: str) -> dict:
    n = x.shape[0]
    d = {"batch_label": batch_label}
    d.update(label_items)
    d["data"] = x.reshape(n, 3072)  # row-major CHW: 1024 R, then 1024 G, then 1024 B
    d["filenames"] = [f"fake_{i:05d}.png" for i in range(n)]
    return d


def write_cifar10(root, n_train_per_batch: int = 6, n_test: int = 10, seed: int = 0):
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Returns ``(train_x, train_y, test_x, test_y)``; train is the 5 batches concatenated in order.
    """
    rng = np.random.default_rng(seed)
    d = os.path.join(os.fspath(root), "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, n_train_per_batch), _labels(rng, n_train_per_batch, 10)
        _dump(
            os.path.join(d, f"data_batch_{i}"),
            _cifar_batch(x, {"labels": [int(v) for v in y]}, f"training batch {i} of 5"),
        )
        xs.append(x)
        ys.append(y)
    tx, ty = _images(rng, n_test), _labels(rng, n_test, 10)
    _dump(os.path.join(d, "test_batch"), _cifar_batch(tx, {"labels": [int(v) for v in ty]}, "testing batch 1 of 1"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(
        os.path.join(d, "batches.meta"),
        {"num_cases_per_batch": n_train_per_batch, "label_names": names, "num_vis": 3072},
    )
    return (
        torch.from_numpy(np.concatenate(xs)),
        torch.from_numpy(np.concatenate(ys)),
        torch.from_numpy(tx),
        torch.from_numpy(ty),
    )


def write_cifar100(root, n_train: int = 30, n_test: int = 10, seed: int = 0):
    """Write ``root/cifar-100-python/{train, test, meta}`` (fine and coarse labels).

    Returns ``(train_x, train_fine_y, test_x, test_fine_y)``. Coarse labels are ``fine // 5`` (not
    the real mapping; they exist only so a loader that read them instead of fine labels fails).
    """
    rng = np.random.default_rng(seed)
    d = os.path.join(os.fspath(root), "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n), _labels(rng, n, 100)
        labels = {"fine_labels": [int(v) for v in y], "coarse_labels": [int(v) // 5 for v in y]}
        _dump(os.path.join(d, split), _cifar_batch(x, labels, split))
        out += [torch.from_numpy(x), torch.from_numpy(y)]
    _dump(
        os.path.join(d, "meta"),
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return tuple(out)


def write_svhn(root, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """Write ``root/{train,test}_32x32.mat`` (MATLAB v5: ``X`` uint8 ``[32, 32, 3, N]``, ``y`` ``[N, 1]`` in 1..10).

    Digit 0 is stored as label 10, as in the real files. Returns ``(train_x, train_y, test_x, test_y)``
    with NCHW images and labels in 0..9.
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n), _labels(rng, n, 10)
        X = np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # NCHW -> HWCN
        y_file = np.where(y == 0, 10, y).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": X, "y": y_file}, format="5")
        out += [torch.from_numpy(x), torch.from_numpy(y)]
    return tuple(out)
