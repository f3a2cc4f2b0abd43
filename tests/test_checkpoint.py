import pytest
import torch

import rjem_ray
from rjem_ray.checkpoint import CheckpointError, atomic_torch_save, copy_checkpoint, load_state, save_checkpoint
from rjem_ray.config import Config, load_config
from rjem_ray.data import dataset_info
from rjem_ray.models import build_model


def _state(step=3):
    cfg = load_config("tune_configs/smoke.yaml")
    model = build_model(cfg.model, dataset_info(cfg.data.name))
    return model, {"model": model.state_dict(), "config": cfg.to_dict(), "step": step,
                   "buffer": {"buffer": torch.randn(4, 1, 28, 28)}}


def test_load_checkpoint_returns_eval_model_and_typed_config(tmp_path):
    model, state = _state()
    save_checkpoint(tmp_path / "ck", state)
    loaded, cfg = rjem_ray.load_checkpoint(tmp_path / "ck")
    assert isinstance(cfg, Config) and cfg.name == "smoke"
    assert not loaded.training
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    model.eval()
    assert torch.allclose(loaded(x), model(x))


def test_failed_write_keeps_the_previous_good_file(tmp_path, monkeypatch):
    _, state = _state(step=1)
    save_checkpoint(tmp_path / "ck", state)
    real_save = torch.save

    def crash_midway(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", {**state, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_state(tmp_path / "ck")["step"] == 1
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["state.pt"]  # no temp file left behind


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "garbage", "foreign-torch-file"])
def test_not_a_checkpoint_gives_a_clear_error(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "empty-dir":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif kind == "foreign-torch-file":
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as err:
        rjem_ray.load_checkpoint(path)
    assert str(path) in str(err.value) and "checkpoint" in str(err.value)


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "state.pt"
    torch.save({"format": "rjem-checkpoint-v1", "model": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable rjem checkpoint"):
        load_state(path)


def test_copy_checkpoint_copies_every_file(tmp_path):
    _, state = _state()
    save_checkpoint(tmp_path / "a", state)
    atomic_torch_save({"x": torch.ones(1)}, tmp_path / "a" / "rank-1.pt")
    copy_checkpoint(tmp_path / "a", tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["rank-1.pt", "state.pt"]
    assert load_state(tmp_path / "b")["step"] == 3
