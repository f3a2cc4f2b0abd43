"""Checkpoints: one directory holding ``state.pt`` (and, for final checkpoints, ``gmm.pt``).

``state.pt`` holds the model, optimiser, scheduler, step, RNG states, replay-buffer state and the config
as a plain dict, so ``torch.load(..., weights_only=True)`` can read it: nothing executable is unpickled.
Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, which is atomic on POSIX: a crash mid-write leaves the previous good file, never half a
file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.errors import first_line
from ..core.files import atomic_torch_save

STATE_FILE = "state.pt"
GMM_FILE = "gmm.pt"
BUFFER_FILE = "buffer-{rank}.pt"  # worker RANK's replay-buffer part (a LocalReplayBuffer state)
FORMAT = "rjem-checkpoint-v1"


class CheckpointError(ValueError):
    """The path is not a readable rjem checkpoint; the message names the path and what was expected."""


def save_checkpoint(directory: str | Path, state: dict[str, Any], gmm_state: dict | None = None) -> Path:
    """Write ``state`` (must contain ``model``, ``config``, ``step``) into ``directory/state.pt``."""
    missing = {"model", "config", "step"} - set(state)
    if missing:
        raise ValueError(f"checkpoint state lacks {sorted(missing)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if gmm_state is not None:
        atomic_torch_save(gmm_state, directory / GMM_FILE)
    atomic_torch_save({"format": FORMAT, **state}, directory / STATE_FILE)
    return directory


def state_file_of(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: expected a directory holding {STATE_FILE} "
            f"(as written by `rjem train` under OUT/checkpoint) or the {STATE_FILE} file itself"
        )
    return p


def read_torch_file(p: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a corrupt, truncated or foreign file is a :class:`CheckpointError`."""
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{str(p)!r} is not a readable rjem checkpoint: {type(exc).__name__}: "
                              f"{first_line(exc)}") from None


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint's state dict (``weights_only=True``) and check it is one of ours."""
    p = state_file_of(path)
    state = read_torch_file(p, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not an rjem checkpoint (format tag {FORMAT!r} missing)")
    return state


def load_gmm_state(path: str | Path) -> dict | None:
    """The Gaussian-mixture state stored beside a final checkpoint, or None."""
    p = Path(path)
    gmm_path = (p if p.is_dir() else p.parent) / GMM_FILE
    if not gmm_path.is_file():
        return None
    state = read_torch_file(gmm_path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(gmm_path)!r} is not a Gaussian-mixture state (expected a dict, got "
                              f"{type(state).__name__})")
    return state


def _rank_of(f: Path) -> int:
    return int(f.stem.split("-", 1)[1])


def buffer_parts(path: str | Path) -> list[dict]:
    """The replay-buffer parts a checkpoint holds, one ``LocalReplayBuffer`` state per saved worker in rank
    order (``replay_buffer.regroup`` lays them out for another worker count); ``[]`` when it holds none.

    Read from ``buffer-<rank>.pt``; a checkpoint written before those files existed keeps rank 0's part in
    ``state.pt`` and the others' in ``rank-<K>.pt``, or one shared snapshot's shard states in ``state.pt``.
    """
    directory = state_file_of(path).parent
    files = sorted(directory.glob("buffer-*.pt"), key=_rank_of)
    if files:
        return [read_torch_file(f) for f in files]
    buf = load_state(directory).get("buffer")
    if not isinstance(buf, dict):
        return []
    if "shards" in buf:
        return list(buf["shards"])
    if "buffer" not in buf:
        return []
    ranks = sorted(directory.glob("rank-*.pt"), key=_rank_of)
    parts = (read_torch_file(f).get("buffer") for f in ranks)
    return [buf] + [b for b in parts if isinstance(b, dict) and "buffer" in b]


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy checkpoint directory ``src`` to ``dst`` file by file, each file replaced atomically; rank and buffer
    files ``src`` lacks are then removed from ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # state.pt last: a reader that finds the new state.pt also finds the files it refers to
    names = sorted((f.name for f in src.iterdir() if f.is_file()), key=lambda n: n == STATE_FILE)
    for name in names:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dst)
        os.close(fd)
        try:
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    # per-worker files of an earlier checkpoint that ran on more workers would read as this one's (a resized
    # run); removed only after the new state.pt is in place
    for stale in [f for pattern in ("rank-*.pt", "buffer-*.pt") for f in dst.glob(pattern) if f.name not in names]:
        stale.unlink()
    return dst
