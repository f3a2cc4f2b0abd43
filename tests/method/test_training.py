import copy
import math

import pytest
import torch
import torch.nn.functional as F

from rjem_ray.config import load_config
from rjem_ray.core.data import load_split, to_model_space
from rjem_ray.method.energy import marginal_energy
from rjem_ray.method.gmm import fit_class_gmm
from rjem_ray.method.models import WideResNet
from rjem_ray.method.batchnorm import batchnorm_eval
from rjem_ray.method.learner import DivergenceError, Learner
from rjem_ray.method.loop import run_loop
from rjem_ray.method.loss import JointForward, jem_loss
from rjem_ray.method.schedules import attack_eps, lr_multiplier


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("mnist5k", "train")
    return x[::8], y[::8]  # the file is sorted by class: stride to keep all ten


@pytest.fixture(scope="module")
def gmm(digits):
    x, y = digits
    return fit_class_gmm(to_model_space(x), y, 10)


_EVAL_BN = ("attack.bn_mode=eval", "train.sampler_bn_mode=eval")


def make_learner(digits, gmm, *overrides):
    cfg = load_config("tune_configs/smoke.yaml", ["buffer.size=64", "train.batch_size=8", *overrides])
    return Learner(cfg, digits[0], digits[1], gmm)


def test_jem_loss_is_ce_plus_energy_contrast_plus_l2():
    torch.manual_seed(0)
    lc, lp, ln = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    loss, parts = jem_loss(lc, y, lp, ln, energy_weight=0.5, energy_l2=0.1)
    e_pos, e_neg = -lp.logsumexp(1), -ln.logsumexp(1)
    expected = F.cross_entropy(lc, y) + 0.5 * (e_pos.mean() - e_neg.mean()) + 0.1 * (e_pos**2 + e_neg**2).mean()
    assert torch.allclose(loss, expected)
    assert parts["e_pos"] == pytest.approx(e_pos.mean().item())
    # without a separate positive batch the classification batch is the positive one
    loss2, _ = jem_loss(lc, y, None, ln, 1.0, 0.0)
    assert torch.allclose(loss2, F.cross_entropy(lc, y) + (-lc.logsumexp(1)).mean() - e_neg.mean())
    # classifier modes: CE only
    loss3, parts3 = jem_loss(lc, y, None, None, 1.0, 0.1)
    assert torch.allclose(loss3, F.cross_entropy(lc, y)) and "e_neg" not in parts3


def test_schedules():
    cfg = load_config("tune_configs/smoke.yaml", ["train.steps=100", "optim.schedule=cosine", "optim.warmup_steps=10",
                                                  "attack.eps=0.6", "attack.eps_warmup_steps=20"])
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(99, cfg) < 0.01
    assert attack_eps(0, cfg) == pytest.approx(0.03) and attack_eps(19, cfg) == pytest.approx(0.6)
    assert attack_eps(50, cfg) == pytest.approx(0.6)


def test_a_step_updates_the_model_and_the_buffer(digits, gmm):
    learner = make_learner(digits, gmm)
    before = [p.detach().clone() for p in learner.model.parameters()]
    buf_before = learner.buffer.state_dict()["buffer"].clone()
    m = learner.step()
    assert learner.step_count == 1 and math.isfinite(m["loss"])
    assert {"ce", "acc", "e_pos", "e_neg", "lr", "eps"} <= set(m)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    changed = (learner.buffer.state_dict()["buffer"] != buf_before).flatten(1).any(1)
    assert int(changed.sum()) == 8  # exactly the leased batch was written back


def test_resumed_learner_continues_exactly(digits, gmm):
    a = make_learner(digits, gmm)
    for _ in range(2):
        a.step()
    state = a.snapshot()
    buffer_at_snapshot = a.buffer.state_dict()["buffer"].clone()
    ma = a.step()  # before b exists: building a Learner reseeds the global RNG
    b = make_learner(digits, gmm)
    b.load_state_dict(state)
    assert b.step_count == 2
    assert torch.equal(b.buffer.state_dict()["buffer"], buffer_at_snapshot)
    mb = b.step()
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert torch.allclose(a.buffer.state_dict()["buffer"], b.buffer.state_dict()["buffer"], atol=1e-6)


def test_divergence_never_reaches_the_optimiser(digits, gmm):
    learner = make_learner(digits, gmm, "train.divergence_threshold=1e-6")
    before = [p.detach().clone() for p in learner.model.parameters()]
    with pytest.raises(DivergenceError, match="train.divergence_threshold"):
        learner.step()
    assert learner.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


def test_run_loop_reports_checkpoints_and_rolls_back(digits, gmm):
    learner = make_learner(digits, gmm, "train.steps=6", "train.log_every=2", "train.checkpoint_every=3",
                           "train.max_rollbacks=2", "train.rollback_lr_factor=0.5", "train.mode=classifier")
    real_step = learner.step
    fail_at = {4: 1}  # the step after checkpoint 3 diverges once

    def flaky_step():
        if fail_at.get(learner.step_count):
            fail_at[learner.step_count] -= 1
            raise DivergenceError("boom")
        return real_step()

    learner.step = flaky_step
    reports = []
    run_loop(learner, lambda m, s: reports.append((m["step"], s is not None)), log=lambda s: None)
    assert learner.step_count == 6
    assert learner.rollbacks == 1 and learner.lr_scale == pytest.approx(0.5)
    # 2, 3 (checkpoint), 4; step 5 diverges -> back to 3; 4 again, 6 (checkpoint, end)
    assert reports == [(2, False), (3, True), (4, False), (4, False), (6, True)]


def test_run_loop_stops_after_max_rollbacks(digits, gmm):
    learner = make_learner(digits, gmm, "train.steps=4", "train.max_rollbacks=2", "train.mode=classifier")

    def always_diverges():
        raise DivergenceError("loss diverged")

    learner.step = always_diverges
    with pytest.raises(DivergenceError, match=r"stopped after 2 rollback\(s\)"):
        run_loop(learner, lambda m, s: None, log=lambda s: None)


def _wrn():
    torch.manual_seed(0)
    return WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch").train()


def test_negative_samples_do_not_move_batchnorm_running_statistics():
    x, x_neg = torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12) * 5 + 3
    model, data_only = _wrn(), _wrn()
    _, _, out_neg = JointForward(model)(x, None, x_neg)
    data_only(x)
    assert out_neg.shape == (8, 10)
    # running statistics are exactly those of the data pass alone ...
    assert all(torch.allclose(a, b) for a, b in zip(_bn_state(model), _bn_state(data_only)))
    # ... although a plain pass of the same samples would have moved them, and momentum is restored
    moved = _wrn()
    moved(x)
    moved(x_neg)
    assert not all(torch.allclose(a, b) for a, b in zip(_bn_state(moved), _bn_state(data_only)))
    assert all(b.momentum == 0.1 for b in model.modules() if isinstance(b, torch.nn.BatchNorm2d))


def test_running_statistics_follow_the_classification_batch_unless_asked(digits, gmm):
    """train.bn_running_stats: by default only x_cls (x_adv in robust-jem) updates the running statistics;
    the clean positive batch is normalised by its own statistics but leaves them alone."""
    x_cls, x_pos = torch.randn(8, 1, 12, 12) * 2 + 1, torch.randn(8, 1, 12, 12)
    default, both, cls_only, plain = _wrn(), _wrn(), _wrn(), _wrn()
    out_cls, out_pos, _ = JointForward(default)(x_cls, x_pos, None)
    JointForward(both, pos_updates_running_stats=True)(x_cls, x_pos, None)
    cls_only(x_cls)
    assert all(torch.allclose(a, b) for a, b in zip(_bn_state(default), _bn_state(cls_only)))
    assert not all(torch.allclose(a, b) for a, b in zip(_bn_state(both), _bn_state(cls_only)))
    # the positive batch is still seen on its own batch statistics (train mode), as a plain pass sees it
    assert torch.allclose(out_pos, plain(x_pos), atol=1e-5)
    assert all(b.momentum == 0.1 for b in default.modules() if isinstance(b, torch.nn.BatchNorm2d))
    # the key reaches the Learner, and a bad value is refused by name
    assert not make_learner(digits, gmm).joint.pos_updates_running_stats
    assert make_learner(digits, gmm, "train.bn_running_stats=classification+positive").joint.pos_updates_running_stats
    with pytest.raises(Exception, match="train.bn_running_stats"):
        make_learner(digits, gmm, "train.bn_running_stats=positive")


def _bn_state(model):
    # running_mean/var only: num_batches_tracked also counts frozen (momentum 0) passes, and is unused
    # by a BatchNorm with a momentum
    return [t.clone() for b in model.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)
            for t in (b.running_mean, b.running_var)]


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_loss_sees_the_negatives_with_the_energy_the_sampler_lowered(digits, gmm, bn_mode):
    """E(x_q) in the loss is the sampler's energy: running statistics (eval) or the batch's own (train)."""
    learner = make_learner(digits, gmm, f"train.sampler_bn_mode={bn_mode}")
    learner.step()  # running statistics away from their (0, 1) initialisation
    model = learner.model
    model.train()
    x_q = learner.negatives.sample()  # exactly as a step samples (eval-mode model when bn_mode=eval)
    x_cls, x_pos = to_model_space(digits[0][:8]), to_model_space(digits[0][8:16])
    with torch.no_grad():
        model.eval()
        e_eval = marginal_energy(model(x_q))  # the running statistics the eval-mode sampler used
        model.train()
        e_batch = marginal_energy(copy.deepcopy(model)(x_q))  # the negative batch's own statistics
        data_only = copy.deepcopy(model)
        data_only(x_cls)  # x_pos leaves the running statistics alone (train.bn_running_stats default)
        before = _bn_state(model)
        _, _, logits_neg = learner.joint(x_cls, x_pos, x_q)
    expected, other = (e_eval, e_batch) if bn_mode == "eval" else (e_batch, e_eval)
    assert (expected - other).abs().max() > 1e-2  # the two views differ, so a mode leak would show
    torch.testing.assert_close(marginal_energy(logits_neg), expected, atol=1e-5, rtol=0)
    after = _bn_state(model)
    # the negative pass moved no running statistic; the classification pass (x_cls) did
    assert all(torch.equal(a, b) for a, b in zip(after, _bn_state(data_only)))
    assert not all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_sampler_runs_in_the_configured_batchnorm_mode_with_its_outer_step(digits, gmm, bn_mode, monkeypatch):
    import rjem_ray.method.negatives as negatives

    seen = {}

    def fake_sampler(model, x, **kw):
        seen.update(kw, modes={m.training for m in model.modules()})
        return x.clone()

    monkeypatch.setattr(negatives, "run_sampler", fake_sampler)
    learner = make_learner(digits, gmm, f"train.sampler_bn_mode={bn_mode}", "sampler.outer_step_size=0.5",
                           "train.fuse_passes=false")  # the separate sampler loop (fusion: the test below)
    learner.step()
    assert seen["outer_step_size"] == 0.5
    assert seen["modes"] == {bn_mode == "train"}
    assert all(m.training for m in learner.model.modules())  # back in train mode afterwards


def test_batchnorm_eval_switches_only_batchnorm_and_restores_each_flag():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch", dropout=0.3).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns[0].eval()  # a mixed state must come back exactly as it was
    flags = {name: m.training for name, m in model.named_modules()}
    stats = _bn_state(model)
    x = torch.randn(4, 1, 12, 12)
    with batchnorm_eval(model):
        assert not any(b.training for b in bns)
        assert all(m.training == flags[n] for n, m in model.named_modules() if m not in bns)  # dropout etc. untouched
        model(x)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(model), stats))  # eval BatchNorm updated nothing
    with pytest.raises(RuntimeError, match="inside"):
        with batchnorm_eval(model):
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_checkpoint_round_trip_carries_the_cuda_generator_state(digits, gmm, tmp_path, monkeypatch):
    # On a CUDA device PGD's random start and SGLD's noise draw from that device's generator: its state
    # is saved beside the CPU one and restored on load. The CUDA calls are stood in for on this CPU box.
    from rjem_ray.method.checkpoint import load_state, save_checkpoint

    cuda_state = {"now": torch.arange(16, dtype=torch.uint8)}
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append((s.clone(), device)))
    learner = make_learner(digits, gmm)
    learner.device = torch.device("cuda", 0)  # only the RNG bookkeeping reads it here
    state = learner.state_dict()
    assert torch.equal(state["rng"]["cuda_rng"], cuda_state["now"])
    save_checkpoint(tmp_path / "ck", state)
    loaded = load_state(tmp_path / "ck")
    cuda_state["now"] = torch.zeros(16, dtype=torch.uint8)  # the generator moves on
    learner.load_state_dict(loaded)
    assert len(calls) == 1 and torch.equal(calls[0][0], torch.arange(16, dtype=torch.uint8))
    assert calls[0][1] == torch.device("cuda", 0)
    # the rollback snapshot carries it too
    assert "cuda_rng" in learner.snapshot()["rng"]
    # a CPU learner neither saves nor restores a CUDA state (a GPU checkpoint resumed on CPU ignores it)
    learner.device = torch.device("cpu")
    assert "cuda_rng" not in learner.state_dict()["rng"]
    learner.load_state_dict(loaded)
    assert len(calls) == 1


def test_rollback_snapshot_is_a_cpu_copy_detached_from_the_live_state(digits, gmm):
    from rjem_ray.method.learner import cpu_copy

    learner = make_learner(digits, gmm)
    learner.step()
    snap = learner.snapshot()

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    found = list(tensors(snap))
    assert found and all(t.device.type == "cpu" for t in found)
    w = next(iter(snap["model"].values()))
    live = next(iter(learner.model.state_dict().values()))
    assert w.data_ptr() != live.data_ptr()
    before = w.clone()
    learner.step()
    assert torch.equal(w, before)  # later steps do not reach into the snapshot
    # nested containers keep their types; the copies never alias their sources
    src = {"a": [torch.ones(2)], "b": (torch.zeros(1),), "n": 3}
    out = cpu_copy(src)
    assert out["n"] == 3 and torch.equal(out["a"][0], src["a"][0]) and out["a"][0].data_ptr() != src["a"][0].data_ptr()
    assert isinstance(out["b"], tuple)


def test_bf16_autocast_changes_a_step_by_little_and_keeps_the_iterates_fp32(digits, gmm):
    # Same seed, one step: the loss moves by bf16 round-off only, and every tensor the sampler and the
    # attack iterate on (their inputs, seen by a pre-hook on the network) stays float32.
    losses = {}
    seen: dict[str, set] = {}
    for precision in ("fp32", "bf16"):
        learner = make_learner(digits, gmm, f"train.precision={precision}")
        seen[precision] = set()
        hook = learner.model.register_forward_pre_hook(lambda m, args, p=precision: seen[p].add(args[0].dtype))
        losses[precision] = learner.step()["loss"]
        hook.remove()
        assert all(p.dtype == torch.float32 for p in learner.model.parameters())
        assert all(t.dtype == torch.float32 for s in learner.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point())
        assert learner.buffer.state_dict()["buffer"].dtype == torch.float32
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    assert abs(losses["bf16"] - losses["fp32"]) < 1e-2 * abs(losses["fp32"])
    assert seen["bf16"] == {torch.float32} and seen["fp32"] == {torch.float32}


def test_bf16_sampler_iterates_stay_fp32():
    from rjem_ray.method.samplers import pyld, sgld
    from rjem_ray.method.energy import energy_fn
    from rjem_ray.method.speed import FastNet

    torch.manual_seed(0)
    net = FastNet(WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch").eval(), precision="bf16")
    x = torch.rand(4, 1, 12, 12) * 2 - 1
    dtypes = []
    hook = net.net.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    assert net(x).dtype == torch.float32
    out_s = sgld(energy_fn(net), x, steps=3, step_size=1.0, noise_std=0.01)
    out_p = pyld(net, x, outer_steps=3, inner_steps=2, step_size=0.2)
    hook.remove()
    assert out_s.dtype == out_p.dtype == torch.float32
    assert dtypes == [torch.float32] * 7
    assert not torch.equal(out_p, x) and not torch.equal(out_s, x)


def test_precision_must_be_an_allowed_value():
    from rjem_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not allowed; choose one of auto, fp32, bf16"):
        load_config("tune_configs/smoke.yaml", ["train.precision=fp16"])


@pytest.mark.parametrize("kind, attack_steps, sampler_steps", [("pyld", 5, 3), ("sgld", 2, 6), ("pyld", 4, 4)])
def test_fused_attack_and_sampler_equal_the_separate_loops(kind, attack_steps, sampler_steps):
    from rjem_ray.method.attacks import pgd
    from rjem_ray.method.samplers import run_sampler
    from rjem_ray.method.inputs import attack_and_sample_fused

    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch", stem_stride=2)
    with torch.no_grad():  # running statistics far from the identity, so eval-mode BatchNorm matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(50.0)  # gradients well away from zero, so sign() sees no round-off ties
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    y = torch.arange(6) % 10
    x_q0 = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    kw = dict(eps=0.3, attack_steps=attack_steps, attack_step_size=0.1, norm="linf", random_start=True,
              sampler_kind=kind, sampler_steps=sampler_steps, inner_steps=2, sampler_step_size=0.5,
              noise_std=0.01 if kind == "sgld" else 0.0, outer_step_size=0.0)

    torch.manual_seed(7)
    x_adv_sep = pgd(model, x, y, eps=0.3, steps=attack_steps, step_size=0.1, norm="linf", random_start=True)
    x_q_sep = run_sampler(model, x_q0, kind=kind, steps=sampler_steps, inner_steps=2, step_size=0.5,
                          noise_std=kw["noise_std"])
    torch.manual_seed(7)
    x_adv_fused, x_q_fused = attack_and_sample_fused(model, x, y, x_q0, **kw)

    assert not torch.equal(x_adv_sep, x) and not torch.equal(x_q_sep, x_q0)
    assert torch.allclose(x_adv_fused, x_adv_sep, atol=1e-5, rtol=0)
    assert torch.allclose(x_q_fused, x_q_sep, atol=1e-5, rtol=0)
    # and the fused pass is one network evaluation per step of the longer schedule
    calls = []
    hook = model.stem.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    attack_and_sample_fused(model, x, y, x_q0, **kw)
    hook.remove()
    both = min(attack_steps, sampler_steps)
    assert calls == [12] * both + [6] * (max(attack_steps, sampler_steps) - both)


@pytest.mark.parametrize("overrides, kind", [
    (["train.mode=classifier"], "CleanInput"),
    (["train.mode=jempp", "train.robust_term=gradreg"], "CleanInput"),  # gradreg is a robust modes' term
    (["train.mode=robust-classifier", *_EVAL_BN], "PGDInput"),  # nothing to fuse with: no sampler
    (["train.mode=robust-jem"], "PGDInput"),  # the sampler in train mode (the default)
    (["train.mode=robust-jem", *_EVAL_BN], "FusedPGDInput"),
    (["train.mode=robust-jem", *_EVAL_BN, "train.fuse_passes=false"], "PGDInput"),
    (["train.mode=robust-jem", *_EVAL_BN, "train.robust_term=gradreg"], "GradRegInput"),
])
def test_the_classification_input_is_chosen_once_from_the_config(digits, gmm, overrides, kind):
    learner = make_learner(digits, gmm, *overrides)
    assert type(learner.cls_input).__name__ == kind
    assert learner.fused is (kind == "FusedPGDInput")
    assert type(learner.negatives).__name__ == ("Negatives" if learner.cfg.uses_energy else "NoNegatives")


def test_learner_fuses_only_with_eval_mode_batchnorm_and_the_step_is_unchanged(digits, gmm):
    modes = ["attack.bn_mode=eval", "train.sampler_bn_mode=eval", "attack.eps_warmup_steps=0"]
    assert not make_learner(digits, gmm, "train.sampler_bn_mode=eval", "attack.bn_mode=train").fused
    assert not make_learner(digits, gmm, "attack.bn_mode=eval").fused  # sampler in train mode (the default)
    runs = {}
    for fuse in (True, False):
        # each learner steps right after it is built: building one reseeds the global RNG both draw from
        learner = make_learner(digits, gmm, *modes, f"train.fuse_passes={str(fuse).lower()}")
        assert learner.fused is fuse
        runs[fuse] = ([learner.step()["loss"] for _ in range(2)], learner)
    (lf, fused), (ls, separate) = runs[True], runs[False]
    assert lf == pytest.approx(ls, rel=1e-5, abs=1e-6)
    assert torch.allclose(fused.buffer.state_dict()["buffer"], separate.buffer.state_dict()["buffer"], atol=1e-5)
    for a, b in zip(fused.model.parameters(), separate.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("loop", ["pgd-linf", "pgd-l2", "sgld", "pyld", "fused"])
def test_inner_loops_never_read_a_tensor_back_to_the_host(loop, monkeypatch):
    # A host read (.item(), .tolist(), bool/float/int of a tensor, .numpy()) inside PGD or a Langevin loop
    # stalls a GPU once per step and breaks graph capture; every such read raises here.
    from rjem_ray.method.attacks import pgd
    from rjem_ray.method.samplers import pyld, sgld
    from rjem_ray.method.energy import energy_fn
    from rjem_ray.method.inputs import attack_and_sample_fused

    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch", stem_stride=2).eval()
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4)

    def refuse(*args, **kw):
        raise AssertionError("host synchronisation inside an inner loop")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    if loop.startswith("pgd"):
        out = pgd(model, x, y, eps=0.3, steps=3, step_size=0.1, norm=loop[4:])
    elif loop == "sgld":
        out = sgld(energy_fn(model), x, steps=3, step_size=1.0, noise_std=0.01)
    elif loop == "pyld":
        out = pyld(model, x, outer_steps=3, inner_steps=2, step_size=0.2, outer_step_size=0.5)
    else:
        out, _ = attack_and_sample_fused(
            model, x, y, x.flip(0), eps=0.3, attack_steps=3, attack_step_size=0.1, norm="linf", random_start=True,
            sampler_kind="sgld", sampler_steps=4, inner_steps=1, sampler_step_size=1.0, noise_std=0.01)
    monkeypatch.undo()
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.parametrize("mode", ["robust-classifier", "robust-jem"])
def test_gradreg_term_replaces_pgd_with_the_finite_difference_penalty(digits, gmm, mode, monkeypatch):
    import rjem_ray.method.inputs as inputs

    def no_pgd(*a, **k):
        raise AssertionError("gradreg must not run PGD")

    monkeypatch.setattr(inputs, "pgd", no_pgd)
    monkeypatch.setattr(inputs, "attack_and_sample_fused", no_pgd)
    learner = make_learner(digits, gmm, f"train.mode={mode}", "train.robust_term=gradreg",
                           "train.gradreg_strength=2.0", "train.gradreg_step=0.05", "attack.bn_mode=eval",
                           "train.sampler_bn_mode=eval", "train.energy_l2=0", "train.energy_weight=1")
    assert not learner.fused
    before = [p.detach().clone() for p in learner.model.parameters()]
    m = learner.step()
    assert m["gradreg_penalty"] > 0 and m["grad_norm_fd"] != 0 and m["eps"] == 0.0
    energy = m["e_pos"] - m["e_neg"] if mode == "robust-jem" else 0.0
    # the reported loss is CE + penalty (+ the energy terms)
    assert m["loss"] == pytest.approx(m["ce"] + m["gradreg_penalty"] + energy, abs=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


def test_gradreg_keys_are_validated():
    from rjem_ray.config import ConfigError

    for bad, frag in (("train.robust_term=trades", "train.robust_term: 'trades' is not allowed; choose one of pgd"),
                      ("train.gradreg_step=0", "train.gradreg_step: 0.0 is out of range; it must be > 0"),
                      ("train.gradreg_norm=l1", "train.gradreg_norm: 'l1' is not allowed")):
        with pytest.raises(ConfigError, match=frag.replace("(", r"\(")):
            load_config("tune_configs/smoke.yaml", [bad])


@pytest.mark.parametrize("norm", ["group", "none"])
def test_without_batchnorm_the_loss_batches_go_through_one_forward_with_the_same_logits_and_gradients(norm):
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm=norm).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    joint = JointForward(model)
    assert joint.concat
    xs = [torch.randn(4, 1, 12, 12) for _ in range(4)]
    out = joint(*xs)
    assert calls == [16]  # one call on the concatenated batch
    loss = sum((o * (k + 1)).sum() for k, o in enumerate(out))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    separate = [model(x) for x in xs]
    for a, b in zip(out, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(separate)), list(model.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    assert not JointForward(_wrn()).concat  # BatchNorm: each batch keeps its own statistics
    a, b, c = JointForward(model)(xs[0], None, xs[2])  # absent batches stay None
    assert b is None and a.shape == c.shape == (4, 10)
