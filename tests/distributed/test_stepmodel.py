"""The step-time model (``rjem_ray/distributed/stepmodel.py``) and the pure parts of ``scripts/scaling_model.py``:
arithmetic only, no torch work, no processes."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from rjem_ray.distributed import stepmodel as sm

ROOT = Path(__file__).resolve().parents[2]

# A paper-like worker: 60 ms fixed + 8 ms per image, 73 MB of bf16 gradients, 8 GPUs per node.
NVLINK = sm.Link(225e9, 5e-6)
EFA = sm.Link(37.5e9, 15e-6)
CLUSTER = sm.Cluster(8, NVLINK, EFA)
SYSTEM = sm.System("test", CLUSTER, overlap=0.8, buffer_link=sm.Link(1e9, 5e-4), storage=sm.Storage(5e8, 1e9))
WORK = sm.Workload(compute=sm.Compute(0.06, 0.008), batch=64, grad_bytes=73e6, last_bucket_share=0.1,
                   overlap_window=0.03, sync_bytes=(8, 72e3), buffer_image_bytes=12288, model_state_bytes=3e8,
                   buffer_slots=10000, checkpoint_every=2000)


def _scaling_model():
    spec = importlib.util.spec_from_file_location("scaling_model_under_test", ROOT / "scripts" / "scaling_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------- all-reduce


def test_ring_allreduce_is_free_on_one_worker_and_follows_the_ring_formula():
    link = sm.Link(1e9, 1e-5)
    assert sm.ring_allreduce_time(1e8, 1, link) == 0.0
    assert sm.allreduce_time(1e8, 1, CLUSTER) == 0.0
    n, nbytes = 4, 4e6
    assert sm.ring_allreduce_time(nbytes, n, link) == pytest.approx(2 * 3 / 4 * nbytes / 1e9 + 2 * 3 * 1e-5)
    with pytest.raises(ValueError):
        sm.ring_allreduce_time(1.0, 0, link)


def test_allreduce_inside_a_node_is_the_nvlink_ring_and_across_nodes_adds_the_network_ring():
    nbytes = 73e6
    for n in (2, 4, 8):
        assert sm.allreduce_time(nbytes, n, CLUSTER) == sm.ring_allreduce_time(nbytes, n, NVLINK)
    t16 = sm.allreduce_time(nbytes, 16, CLUSTER)  # 2 nodes
    assert t16 == pytest.approx(sm.ring_allreduce_time(nbytes, 8, NVLINK) + 2 * 1 / 2 * nbytes / EFA.bandwidth
                                + 2 * 1 * EFA.latency)
    # many nodes: the network part tends to 2 · bytes / node bandwidth, the latency part grows linearly
    t_many = sm.allreduce_time(nbytes, 8 * 1000, CLUSTER)
    assert t_many > 2 * nbytes / EFA.bandwidth
    assert t_many < 2 * nbytes / EFA.bandwidth + sm.ring_allreduce_time(nbytes, 8, NVLINK) + 2 * 999 * EFA.latency + 1e-12
    with pytest.raises(ValueError):
        sm.allreduce_time(nbytes, 9, sm.Cluster(8, NVLINK, None))


def test_allreduce_time_never_falls_as_workers_are_added():
    times = [sm.allreduce_time(73e6, n, CLUSTER) for n in range(1, 200)]
    assert all(b >= a - 1e-15 for a, b in zip(times, times[1:]))


def test_bf16_compression_halves_the_bandwidth_term_only():
    none = sm.with_compression(WORK, 146e6, "none")
    bf16 = sm.with_compression(WORK, 146e6, "bf16")
    assert bf16.grad_bytes == none.grad_bytes / 2
    link = sm.Link(1e9, 1e-4)
    n = 4
    lat = 2 * (n - 1) * link.latency
    assert sm.ring_allreduce_time(bf16.grad_bytes, n, link) - lat == pytest.approx(
        (sm.ring_allreduce_time(none.grad_bytes, n, link) - lat) / 2)


def test_last_bucket_share_follows_ddps_bucket_sizes():
    assert sm.last_bucket_share(300e3) == 1.0  # everything in the first (1 MiB) bucket
    cap, first = sm.DDP_BUCKET_CAP, sm.DDP_FIRST_BUCKET
    total = first + 2 * cap + 0.5 * cap
    assert sm.last_bucket_share(total) == pytest.approx(0.5 * cap / total)
    exact = first + 3 * cap  # the rest fills whole buckets: the last is a full one
    assert sm.last_bucket_share(exact) == pytest.approx(cap / exact)
    assert 0 < sm.last_bucket_share(4 * 36.5e6) < 25 * 2**20 / (4 * 36.5e6)


# ------------------------------------------------------------------------------------------- overlap


@pytest.mark.parametrize("t_ar, last, window, overlap", [
    (0.01, 0.1, 1.0, 0.8), (0.01, 0.1, 0.001, 0.8), (0.5, 1.0, 1.0, 1.0), (0.02, 0.0, 0.05, 1.0), (0.0, 0.3, 1.0, 0.8),
])
def test_overlap_hides_at_most_the_earlier_buckets_and_the_usable_window(t_ar, last, window, overlap):
    hidden, exposed = sm.exposed_allreduce(t_ar, last, window, overlap)
    assert 0.0 <= hidden <= t_ar * (1 - last) + 1e-15
    assert hidden <= overlap * window + 1e-15
    assert exposed == pytest.approx(t_ar - hidden)
    assert exposed >= t_ar * last - 1e-15


def test_overlap_never_makes_a_step_faster_than_its_compute():
    for overlap in (0.0, 0.5, 1.0):
        for window in (0.0, 0.03, 0.5, 1.0):
            wl = replace(WORK, overlap_window=window, last_bucket_share=0.0)
            sysm = replace(SYSTEM, overlap=overlap)
            for n in (1, 2, 8, 16, 64):
                for mode in ("weak", "strong"):
                    st = sm.step_time(wl, sysm, n, mode)
                    assert st.total >= st.compute
                    assert 0 <= st.allreduce_hidden <= st.allreduce


def test_more_overlap_never_slows_a_step():
    totals = [sm.step_time(WORK, replace(SYSTEM, overlap=o), 64, "weak").total for o in (0.0, 0.25, 0.5, 1.0)]
    assert all(b <= a + 1e-15 for a, b in zip(totals, totals[1:]))


# ----------------------------------------------------------------------------------------- scaling


def test_weak_efficiency_is_one_on_one_worker_and_falls_monotonically():
    effs = [sm.efficiency(WORK, SYSTEM, n, "weak") for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert effs[0] == pytest.approx(1.0)
    assert all(0 < e <= 1 for e in effs)
    assert all(b <= a + 1e-12 for a, b in zip(effs, effs[1:]))


def test_weak_scaling_keeps_the_per_worker_batch_and_compute():
    for n in (1, 8, 64):
        st = sm.step_time(WORK, SYSTEM, n, "weak")
        assert st.batch_per_worker == WORK.batch
        assert st.compute == pytest.approx(WORK.compute.time(WORK.batch))
        assert st.step_increment == n


def test_strong_scaling_splits_the_global_batch():
    for n in (1, 2, 8, 16, 64):
        st = sm.step_time(WORK, SYSTEM, n, "strong")
        assert st.batch_per_worker == pytest.approx(WORK.batch / n)
        assert st.compute == pytest.approx(0.06 + 0.008 * WORK.batch / n)
        assert st.step_increment == 1
    effs = [sm.efficiency(WORK, SYSTEM, n, "strong") for n in (1, 2, 4, 8, 16, 32, 64)]
    assert effs[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(effs, effs[1:]))
    # the per-worker fixed cost bounds the speed-up: t(1) / t(N) < (fixed + per_image·B) / fixed
    assert sm.step_time(WORK, SYSTEM, 1, "strong").total / sm.step_time(WORK, SYSTEM, 64, "strong").total < (
        0.06 + 0.008 * 64) / 0.06


def test_strong_scaling_is_perfect_without_fixed_cost_or_communication():
    bare = sm.Workload(compute=sm.Compute(0.0, 0.01), batch=64, grad_bytes=0.0)
    free = sm.System("ideal", sm.Cluster(64, sm.Link(float("inf"), 0.0)))
    for n in (1, 2, 4, 8, 16, 32, 64):
        assert sm.efficiency(bare, free, n, "strong") == pytest.approx(1.0)
        assert sm.efficiency(bare, free, n, "weak") == pytest.approx(1.0)


def test_the_slowdown_of_shared_cores_multiplies_the_compute_only():
    a = sm.step_time(WORK, SYSTEM, 4, "weak", slowdown=1.0)
    b = sm.step_time(WORK, SYSTEM, 4, "weak", slowdown=2.0)
    assert b.compute == pytest.approx(2 * a.compute)
    assert b.allreduce == a.allreduce and b.sync == a.sync and b.checkpoint == a.checkpoint


def test_checkpoint_cost_per_step_grows_with_weak_scaling_and_not_with_strong():
    weak = [sm.step_time(WORK, SYSTEM, n, "weak").checkpoint for n in (1, 8, 64)]
    strong = [sm.step_time(WORK, SYSTEM, n, "strong").checkpoint for n in (1, 8, 64)]
    assert weak[0] < weak[1] < weak[2]
    # one checkpoint of model + all slots at the slower of client and aggregate bandwidth, every 2000/N steps
    per_ckpt_64 = max((3e8 + 12288 * 10000 * 8) / 5e8, (3e8 + 12288 * 10000 * 64) / 1e9)
    assert weak[2] == pytest.approx(per_ckpt_64 * 64 / 2000)
    assert max(strong) / min(strong) < 1.5
    assert sm.step_time(replace(WORK, checkpoint_every=0), SYSTEM, 64, "weak").checkpoint == 0.0


def test_buffer_traffic_is_two_calls_and_the_images_both_ways():
    st = sm.step_time(WORK, SYSTEM, 8, "weak")
    assert st.buffer == pytest.approx(2 * 5e-4 + 2 * 64 * 12288 / 1e9)
    assert sm.step_time(WORK, replace(SYSTEM, buffer_link=None), 8, "weak").buffer == 0.0


def test_run_length_and_the_fewest_workers_for_a_deadline():
    steps = 117000
    t1 = sm.run_seconds(WORK, SYSTEM, 1, "weak", steps)
    assert t1 == pytest.approx(steps * sm.step_time(WORK, SYSTEM, 1, "weak").total)
    assert sm.run_seconds(WORK, SYSTEM, 8, "weak", steps) == pytest.approx(
        math.ceil(steps / 8) * sm.step_time(WORK, SYSTEM, 8, "weak").total)
    cands = [1, 2, 4, 8, 16, 32, 64]
    n = sm.workers_for_deadline(WORK, SYSTEM, "weak", steps, t1 / 3, cands)
    assert n == 4  # 2 workers take about t1/2, 4 about t1/4
    assert sm.workers_for_deadline(WORK, SYSTEM, "weak", steps, 10 * t1, cands) == 1
    assert sm.workers_for_deadline(WORK, SYSTEM, "strong", steps, 1.0, cands) is None


def test_gpu_compute_is_paced_by_the_longer_of_device_and_host():
    c = sm.gpu_compute(flops_per_image=600e9, peak_flops=300e12, sustained=0.25, ops_per_step=10000,
                       op_overhead_s=5e-6, half_batch=8, optimizer_bytes=1.5e9, memory_bandwidth=1.5e12)
    assert c.per_image_s == pytest.approx(600e9 / 75e12)  # 8 ms
    assert c.host_s == pytest.approx(0.05) and c.fixed_s == pytest.approx(1e-3)
    assert c.time(64) == pytest.approx(1e-3 + 0.008 * 72)  # device-bound: the host runs ahead
    assert c.time(1) == pytest.approx(1e-3 + 0.072)  # 9 half-occupancy images' worth still beats the host
    host_bound = sm.gpu_compute(flops_per_image=1e9, peak_flops=300e12, sustained=0.25, ops_per_step=10000,
                                op_overhead_s=5e-6)
    assert host_bound.time(1) == pytest.approx(0.05)
    # a pass never gets cheaper per image as the batch shrinks
    assert all(c.time(b) / b >= c.time(2 * b) / (2 * b) for b in (1, 2, 4, 8, 16, 32))
    with pytest.raises(ValueError):
        sm.gpu_compute(flops_per_image=1, peak_flops=1, sustained=0.0, ops_per_step=0, op_overhead_s=0)
    with pytest.raises(ValueError):
        sm.Compute(1.0, 1.0).time(0)


def test_fits_recover_a_line_and_a_ring():
    assert sm.fit_line([16, 64], [3.0, 9.0]) == pytest.approx((1.0, 0.125))
    link = sm.Link(2e9, 40e-6)
    sizes = [4, 65536, 1 << 20, 4 << 20]
    measured = [sm.ring_allreduce_time(s, 2, link) for s in sizes]
    fit = sm.fit_ring(sizes, measured, 2)
    assert fit.bandwidth == pytest.approx(2e9, rel=1e-6)
    assert fit.latency == pytest.approx(40e-6, rel=1e-6)
    with pytest.raises(ValueError):
        sm.fit_line([1, 1], [2, 3])


# ------------------------------------------------------------------------------ scripts/scaling_model


def test_the_step_formula_counts_pgd_sampler_and_loss_passes():
    m = _scaling_model()
    cfg = SimpleNamespace(robust=True, uses_energy=True, attack=SimpleNamespace(steps=15),
                          sampler=SimpleNamespace(steps=10), train=SimpleNamespace(robust_term="pgd"))
    net = {"forward_flops_per_image": 10.0, "ops": {"input_grad": 250, "full": 357}, "has_batchnorm": True}
    shape = m.step_shape(cfg, net)
    assert shape["flop_multiplier"] == 59  # 2·(15 + 10) + 3·3: the cifar10.yaml step
    assert shape["ops_per_step"] == 25 * 250 + 3 * 357
    assert shape["overlap_window"] == pytest.approx(6 / 59 / 3)  # BatchNorm: the last of three backward calls
    classifier = SimpleNamespace(robust=False, uses_energy=False, attack=SimpleNamespace(steps=15),
                                 sampler=SimpleNamespace(steps=10), train=SimpleNamespace(robust_term="pgd"))
    assert m.step_shape(classifier, dict(net, has_batchnorm=False))["flop_multiplier"] == 3


def test_the_ddp_node_type_comes_from_the_cluster_file(tmp_path):
    m = _scaling_model()
    f = tmp_path / "cluster.yaml"
    f.write_text("""
available_node_types:
  head: {resources: {CPU: 0}, node_config: {InstanceType: m5.2xlarge}}
  small: {resources: {CPU: 8, GPU: 1, "accelerator_type:A10G": 1}, node_config: {InstanceType: g5.2xlarge}}
  big: {resources: {CPU: 192, GPU: 8, "accelerator_type:H100": 1}, node_config: {InstanceType: p5.48xlarge}}
""")
    assert m.ddp_node_type(f, None)[0] == "p5.48xlarge"  # the most GPUs per node
    assert m.ddp_node_type(f, "A10G")[0] == "g5.2xlarge"  # the accelerator asked for
    assert m.ddp_node_type(f, "A100")[0] == "p5.48xlarge"  # no such node: the most GPUs per node
    assert m.ddp_node_type(tmp_path / "missing.yaml", None)[0] == m.DEFAULT_NODE_TYPE
    (tmp_path / "cpu.yaml").write_text("available_node_types: {head: {node_config: {InstanceType: m5.2xlarge}}}")
    assert m.ddp_node_type(tmp_path / "cpu.yaml", None)[0] == m.DEFAULT_NODE_TYPE
