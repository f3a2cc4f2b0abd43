"""Device choice: the GPU a process was given, never one it merely sees (rjem_ray/core/devices.py)."""

import pytest
import torch

from rjem_ray.core.devices import choose_device, default_device, resolve_device


@pytest.mark.parametrize("kw, expected", [
    (dict(cuda_available=False, in_ray=False), "cpu"),
    (dict(cuda_available=False, in_ray=True, ray_gpu_ids=["0"], visible_devices="0"), "cpu"),
    (dict(cuda_available=True, in_ray=False), "cuda:0"),
    (dict(cuda_available=True, in_ray=False, visible_devices="3"), "cuda:0"),
    # Ray gave this process no GPU but left CUDA_VISIBLE_DEVICES alone: it sees the node's GPUs, uses none
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=[], visible_devices=None), "cpu"),
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=[], visible_devices="0,1,2,3"), "cpu"),
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs: the first of them is cuda:0
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=["5"], visible_devices="5"), "cuda:0"),
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=["6", "5"], visible_devices="5,6"), "cuda:0"),
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id's position among the visible devices
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=["2"], visible_devices="0,1,2,3"), "cuda:2"),
    (dict(cuda_available=True, in_ray=True, ray_gpu_ids=[3], visible_devices=None), "cuda:3"),
])
def test_choose_device(kw, expected):
    assert choose_device(**kw) == expected


def test_default_device_in_a_plain_process_follows_cuda_availability(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # not a Ray process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda", 0)


def test_default_device_in_ray_without_an_assigned_gpu_is_the_cpu(monkeypatch):
    import sys
    import types

    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: [])
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert default_device() == torch.device("cpu")
    fake_ray.get_gpu_ids = lambda: ["1"]
    assert default_device() == torch.device("cuda", 1)


def test_resolve_device_names_the_allowed_values(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("nonsense!")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="cuda:0..cuda:1"):
        resolve_device("cuda:2")
