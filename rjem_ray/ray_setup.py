"""Start a local Ray, or join the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it)."""

from __future__ import annotations

import os

_QUIET_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # cloud-only; saves ~6 s of trainer teardown
    # Ray Train's controller collects each worker's report once per poll (2 s by default): a report
    # sent sooner waits for it, which stalled short steps by up to 2 s (scripts/bench_overhead.py).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def ensure_ray(min_cpus: float = 1, object_store_mb: int | None = None) -> None:
    """Initialise Ray once per process.

    With ``RAY_ADDRESS`` set (a cluster, or ``ray job submit``), join it. Otherwise start a local
    instance bound to 127.0.0.1 with at least ``min_cpus`` logical CPUs (Tune needs one more than the
    trainer's workers), no dashboard and a bounded object store.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in _QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    num_cpus = max(os.cpu_count() or 1, int(-(-min_cpus // 1)))
    store = (object_store_mb or 512) * 2**20
    ray.init(
        address="local",  # a new instance: never attach to another user's `ray start` cluster
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=store,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
