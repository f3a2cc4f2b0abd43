"""What a user sees from a local `rjem train`: progress, evaluations and where results went, not Ray's noise;
which Ray settings ``ensure_ray`` applies locally and which it leaves to a cluster; the local Ray's defences."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RJEM = str(Path(sys.executable).with_name("rjem"))
PROGRESS = re.compile(r"\[rjem\] step \d+/\d+ ")

# ---------------------------------------------------------------------------------------------- settings (no Ray)

# rjem's fast values for a local Ray; a cluster keeps Ray's own (health-check poll 2 s, preemption watcher on).
LOCAL_ONLY = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture
def init_calls(monkeypatch) -> list[tuple[dict, dict]]:
    """``ray.init`` replaced by a recorder of (its keyword arguments, the environment when it was called); the
    variables ``ensure_ray`` may set start unset (conftest sets them for the suite) and come back afterwards."""
    import ray

    calls: list[tuple[dict, dict]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw, dict(os.environ))))
    for var in ("RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED", *LOCAL_ONLY):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_joining_a_cluster_leaves_ray_trains_health_checks_and_preemption_to_ray(init_calls, monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from rjem_ray.distributed.ray_setup import ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as `ray job submit` sets it for the driver
    ensure_ray()
    [(kwargs, env)] = init_calls
    assert kwargs["address"] == "127.0.0.1:6379"
    assert not set(LOCAL_ONLY) & set(env), {k: env[k] for k in LOCAL_ONLY if k in env}
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"  # this one holds everywhere
    # Ray Train hands the driver's RAY_TRAIN_* variables to its controller and workers: none of rjem's goes.
    assert not set(LOCAL_ONLY) & set(get_env_vars_to_propagate())


def test_a_local_ray_gets_the_fast_local_settings(init_calls):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from rjem_ray.distributed.ray_setup import ensure_ray

    ensure_ray()
    [(kwargs, env)] = init_calls
    assert kwargs["address"] == "local" and kwargs["_node_ip_address"] == "127.0.0.1"
    assert {k: env.get(k) for k in LOCAL_ONLY} == LOCAL_ONLY  # set before the local Ray starts
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert get_env_vars_to_propagate().items() >= LOCAL_ONLY.items()


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379"], ids=["local", "cluster"])
def test_values_the_user_set_win(init_calls, monkeypatch, address):
    from rjem_ray.distributed.ray_setup import ensure_ray

    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    mine = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
            "RAY_USAGE_STATS_ENABLED": "1"}
    for k, v in mine.items():
        monkeypatch.setenv(k, v)
    ensure_ray()
    [(_, env)] = init_calls
    assert {k: env[k] for k in mine} == mine


# ---------------------------------------------------------------------------------------------- a local `rjem train`


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


@pytest.mark.slow
def test_no_line_but_progress_repeats_more_than_twice(smoke_output):
    lines = [ln.strip() for ln in smoke_output.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    repeated = {ln: n for ln, n in collections.Counter(lines).items() if n > 2}
    assert not repeated, repeated
    assert "State API may be temporarily unavailable" not in smoke_output


@pytest.mark.slow
def test_the_output_is_progress_and_results(smoke_output):
    text = smoke_output
    assert len(PROGRESS.findall(text)) == 12
    assert "[rjem] done: checkpoint" in text and "[rjem] MLflow run" in text
    # Ray Train's per-report INFO lines (two per checkpoint) are below the level it now logs at.
    assert "Reporting training result" not in text and "Checkpoint successfully created" not in text
    other = [ln for ln in text.splitlines() if ln.strip() and not PROGRESS.search(ln) and "[rjem]" not in ln]
    assert len(other) <= 12, other


# ---------------------------------------------------------------------------------------------- authentication

HOLD = """
import json, os, sys
import ray
from rjem_ray.distributed.ray_setup import ensure_ray

ensure_ray()
ctx = ray.get_runtime_context()
print(json.dumps({"gcs": ctx.gcs_address, "dashboard": ray._private.worker.get_dashboard_url(), "pid": os.getpid()}), flush=True)
sys.stdin.read()  # hold the instance until the test closes stdin
"""


def _listening() -> dict[int, list[str]]:
    """Port -> local addresses of every TCP socket in LISTEN state on this machine."""
    out: dict[int, list[str]] = collections.defaultdict(list)
    for name in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state != "0A":
                continue
            addr, port = local.split(":")
            if len(addr) == 8:
                ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "::" if set(addr) == {"0"} else ("::1" if addr == "0" * 24 + "01000000" else addr)
            out[int(port, 16)].append(ip)
    return out


@pytest.fixture(scope="module")
def local_instance(tmp_path_factory):
    """A process holding a local Ray started by ``ensure_ray`` (as `rjem train` starts it)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray", numbered=True))
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, "the local Ray did not start"
        yield json.loads(line)
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)


@pytest.mark.slow
def test_the_dashboard_the_project_starts_listens_on_loopback_only(local_instance):
    url = local_instance["dashboard"]
    host, port = url.split("://")[-1].rsplit(":", 1)
    assert host == "127.0.0.1", url
    addresses = _listening()[int(port)]
    assert addresses and set(addresses) == {"127.0.0.1"}, addresses


@pytest.mark.slow
def test_an_unauthenticated_client_is_refused(local_instance):
    probe = "import ray, sys\ntry:\n    ray.init(address=sys.argv[1])\nexcept Exception as e:\n    print('REFUSED', type(e).__name__, str(e).splitlines()[0][:300] if str(e) else '')\nelse:\n    print('JOINED')\n"
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    results = {}
    for label, extra in (("disabled", {"RAY_AUTH_MODE": "disabled"}),
                         ("wrong-token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}),
                         ("token", {"RAY_AUTH_MODE": "token"})):
        done = subprocess.run([sys.executable, "-c", probe, local_instance["gcs"]], env={**base, **extra},
                              capture_output=True, text=True, timeout=180)
        results[label] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    assert results["disabled"].startswith("REFUSED") and results["wrong-token"].startswith("REFUSED"), results
    assert results["token"] == "JOINED", results  # the same user, with Ray's generated token, joins
