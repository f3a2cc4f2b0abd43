"""What a user sees from a local `rjem train`: progress, evaluations and where results went, not Ray's noise."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RJEM = str(Path(sys.executable).with_name("rjem"))
PROGRESS = re.compile(r"\[rjem\] step \d+/\d+ ")


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory, cache_dir) -> str:
    """stdout + stderr of one `rjem train` of the smoke config in its own process (its own local Ray)."""
    tmp = tmp_path_factory.mktemp("quiet")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RJEM_DEBUG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [RJEM, "train", "tune_configs/smoke.yaml", "--out", str(tmp / "run"), "--set", f"cache_dir={cache_dir}",
            "--set", "train.steps=12", "--set", "train.log_every=1",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", "--set", f"tracking.artifact_location={tmp}/art"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-5000:]
    return text


def test_no_line_but_progress_repeats_more_than_twice(smoke_output):
    lines = [ln.strip() for ln in smoke_output.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    repeated = {ln: n for ln, n in collections.Counter(lines).items() if n > 2}
    assert not repeated, repeated
    assert "State API may be temporarily unavailable" not in smoke_output


def test_the_output_is_progress_and_results(smoke_output):
    text = smoke_output
    assert len(PROGRESS.findall(text)) == 12
    assert "[rjem] done: checkpoint" in text and "[rjem] MLflow run" in text
    # Ray Train's per-report INFO lines (two per checkpoint) are below the level it now logs at.
    assert "Reporting training result" not in text and "Checkpoint successfully created" not in text
    other = [ln for ln in text.splitlines() if ln.strip() and not PROGRESS.search(ln) and "[rjem]" not in ln]
    assert len(other) <= 12, other
