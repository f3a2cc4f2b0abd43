import pytest
import torch

import rjem_ray
from rjem_ray.core.files import atomic_torch_save
from rjem_ray.method.checkpoint import CheckpointError, copy_checkpoint, load_state, save_checkpoint
from rjem_ray.config import Config, load_config
from rjem_ray.core.data import dataset_info
from rjem_ray.method.models import build_model


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


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """A checkpoint directory as `rjem train` leaves it with two workers: state.pt, gmm.pt and rank-1.pt."""
    from rjem_ray.method.gmm import fit_class_gmm

    d = tmp_path_factory.mktemp("full") / "checkpoint"
    _, state = _state()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1, torch.arange(40) % 10
    save_checkpoint(d, state, gmm_state=fit_class_gmm(x, y, 10, rank=2).state_dict())
    atomic_torch_save({"rng": {"torch": torch.get_rng_state()}, "stream": {"epoch": 0, "pos": 0}}, d / "rank-1.pt")
    return d


def _damage(src, dst, name: str, how: str):
    copy_checkpoint(src, dst)
    f = dst / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else
                  bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(1)).tolist()))
    return f


def _argv(command: str, ckpt, tmp_path, cache_dir) -> list[str]:
    if command == "sample":
        return ["sample", str(ckpt), "--mode", "pgd", "--n", "2", "--out", str(tmp_path / "s.png")]
    if command == "eval":
        return ["eval", str(ckpt), "--metrics", "accuracy", "--json", str(tmp_path / "m.json"),
                "--set", "tracking.enabled=false"]
    return ["train", "tune_configs/smoke.yaml", "--out", str(tmp_path / "run"), "--resume", str(ckpt),
            "--set", "tracking.enabled=false", "--set", f"cache_dir={cache_dir}"]


@pytest.mark.parametrize("command", ["sample", "eval", "train"])
@pytest.mark.parametrize("how", ["truncated", "random"])
@pytest.mark.parametrize("name", ["state.pt", "gmm.pt", "rank-1.pt"])
def test_a_damaged_file_is_one_line_and_exit_2(full_checkpoint, tmp_path, cache_dir, capsys, command, how, name):
    from rjem_ray.cli import main

    bad = _damage(full_checkpoint, tmp_path / "ck", name, how)
    assert main(_argv(command, tmp_path / "ck", tmp_path, cache_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rjem {command}: error: ") and str(bad) in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "m.json").exists()  # nothing half-written


def test_the_intact_checkpoint_passes_the_same_commands(full_checkpoint, tmp_path, cache_dir):
    """The damage above is what fails: the same directory, intact, samples and evaluates."""
    from rjem_ray.method.restore import verify_checkpoint
    from rjem_ray.cli import main

    assert verify_checkpoint(full_checkpoint)["step"] == 3
    assert main(_argv("sample", full_checkpoint, tmp_path, cache_dir)) == 0 and (tmp_path / "s.png").is_file()
    assert main(_argv("eval", full_checkpoint, tmp_path, cache_dir)) == 0 and (tmp_path / "m.json").is_file()


@pytest.mark.parametrize("command", ["sample", "eval", "train"])
def test_an_unwritable_output_fails_before_any_work(full_checkpoint, tmp_path, cache_dir, capsys, monkeypatch, command):
    from rjem_ray import cli

    (tmp_path / "file").write_text("a file, not a directory")
    argv = _argv(command, full_checkpoint, tmp_path / "file" / "sub", cache_dir)
    if command == "train":
        argv = [a for a in argv if a not in ("--resume", str(full_checkpoint))]
    for heavy in ("rjem_ray.evaluation.generate.generate", "rjem_ray.evaluation.evaluate.evaluate_checkpoint",
                  "rjem_ray.distributed.train_driver.run_training", "rjem_ray.method.restore.load_model"):
        monkeypatch.setattr(heavy, lambda *a, **k: pytest.fail("work started before the output was checked"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written" in err[0] and str(tmp_path / "file") in err[0], err
