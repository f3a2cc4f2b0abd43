"""Start a local Ray, or join the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it)."""

from __future__ import annotations

import os
import socket

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): rjem_ray/cli.py's parser (the
# tune package) and every `rjem` command import train_driver, which imports this module, and `import ray.train`
# takes ~1.2 s; it loads when a run or a sweep starts.
# Set (unless already set) before every ray.init: no usage statistics, locally or on a cluster.
_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
# Set (unless already set) only when this process starts its own local Ray, never when it joins a cluster
# through RAY_ADDRESS: a cluster keeps Ray's own health-check poll and preemption watcher.
_LOCAL_DEFAULTS = {
    # Ray Train's preemption watcher polls Ray for draining nodes (a cloud node preempted or scaled down)
    # and tells the workers; a local Ray never drains its one node, and without the watcher a trainer tears
    # down ~6 s sooner.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's controller collects each worker's report once per poll (2 s by default): a report
    # sent sooner waits for it, which stalled short local steps by up to 2 s (scripts/bench_overhead.py).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def ensure_ray(min_cpus: float = 1, object_store_mb: int | None = None) -> None:
    """Initialise Ray once per process.

    With ``RAY_ADDRESS`` set (a cluster, or ``ray job submit``), join it, leaving Ray Train's health checks
    and preemption handling at Ray's defaults. Otherwise start a local instance bound to 127.0.0.1 with at
    least ``min_cpus`` logical CPUs (Tune needs one more than the trainer's workers), its dashboard on
    127.0.0.1, a bounded object store and the faster local settings of ``_LOCAL_DEFAULTS``. A variable
    already set in the environment wins in both cases.
    """
    import ray  # lazy: Ray, see top

    if ray.is_initialized():
        return
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    for key, value in _LOCAL_DEFAULTS.items():  # before ray.init: the local raylet and workers inherit them
        os.environ.setdefault(key, value)
    num_cpus = max(os.cpu_count() or 1, int(-(-min_cpus // 1)))
    dashboard_port = free_port()
    store = (object_store_mb or 512) * 2**20
    ray.init(
        address="local",  # a new instance: never attach to another user's `ray start` cluster
        num_cpus=num_cpus,
        # Ray Train's PlacementGroupCleaner asks the State API, every poll, whether the controller lives.
        # The State API is served by the dashboard (without one: "State API may be temporarily unavailable"
        # at every poll, 226 lines in `make demo`) and is found through RAY_API_SERVER_ADDRESS, else by
        # scanning the machine for Ray instances, which fails where there are several. So: our own
        # dashboard on loopback, and its address in every process of this job.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
        object_store_memory=store,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_logging_config():
    """Ray Train's own log level: WARNING (its per-report INFO lines drown the progress), INFO with RJEM_DEBUG."""
    import ray.train  # lazy: Ray, see top

    return ray.train.LoggingConfig(log_level="INFO" if os.environ.get("RJEM_DEBUG") else "WARNING")


def scaling_config(cfg, use_gpu: bool):
    """Ray Train's ``ScalingConfig`` for ``cfg``: ``trainer.num_workers`` workers of ``trainer.cpus_per_worker``
    CPUs (and one GPU each with ``use_gpu``, of ``trainer.accelerator_type`` when set), packed onto as few
    nodes as possible; elastic ``(trainer.min_workers, trainer.num_workers)`` when ``trainer.min_workers`` > 0."""
    import ray.train  # lazy: Ray, see top

    t = cfg.trainer
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    num_workers = (t.min_workers, t.num_workers) if 0 < t.min_workers < t.num_workers else t.num_workers
    return ray.train.ScalingConfig(
        num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy="PACK",
        accelerator_type=t.accelerator_type if use_gpu else None,
    )


def cluster_has_gpus() -> bool:
    import ray  # lazy: Ray, see top

    return ray.cluster_resources().get("GPU", 0) > 0
