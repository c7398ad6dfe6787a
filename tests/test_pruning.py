"""Pruning baselines: exact magnitude pruning, masks (weights, grads, optimizer state), GMP's
schedule, RigL's constant layer densities, IMP's rewinding, and a CLI run per method."""
import io
import json

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sparsetrain.cli import main
from sparsetrain.methods import BuildContext, get_method
from sparsetrain.params import prunable_weights
from sparsetrain.pruning import (Mask, allocate_counts, cosine_decay, gmp_sparsity, layer_densities,
                                 layerwise_magnitude_masks, magnitude_masks)
from sparsetrain.trainer import TrainConfig
from conftest import crash_and_resume

# The first optimizer a process builds imports torch._dynamo (seconds): pay it at collection,
# not inside the first test.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))


def batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def build(method, model, epochs=1, spe=4, lr=0.1, weight_decay=0.0, **opts):
    cfg = TrainConfig(method=method, epochs=epochs, lr=lr, weight_decay=weight_decay, progress=False)
    m = get_method(method)
    ctx = BuildContext(cfg, m.resolve(opts), spe, torch.device("cpu"), (1, 4, 4))
    return m.build(model, ctx)


def run_steps(strategy, model, steps, callback=None):
    """The trainer's inner loop, on synthetic batches."""
    for step in steps:
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        pen = strategy.penalty()
        loss = loss if pen is None else loss + pen
        strategy.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        strategy.after_backward(step)
        if callback:
            callback(step, "after_backward")
        strategy.optimizer.step()
        strategy.after_step(step)


class FakeTrainer:
    def __init__(self, step):
        self.step, self.scheduler = step, None

    def evaluate(self):
        return 0.0, 0.5


def zeros(model):
    return sum(int((w == 0).sum()) for _, w in prunable_weights(model))


# ------------------------------------------------------------------------------ magnitude pruning
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 0.98, 0.999])
def test_global_magnitude_prune_hits_the_exact_count_with_ties(sparsity):
    model = tiny_model()
    with torch.no_grad():                          # many ties: 5 distinct magnitudes only
        for _, w in prunable_weights(model):
            w.copy_(torch.randint(-2, 3, w.shape).float())
    weights = dict(prunable_weights(model))
    n = sum(w.numel() for w in weights.values())
    masks = magnitude_masks(weights, sparsity, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * n)
    assert all(torch.equal(masks[k], v) for k, v in magnitude_masks(weights, sparsity).items())   # deterministic
    kept = torch.cat([w[m].abs() for (k, w), m in zip(weights.items(), masks.values())])
    pruned = torch.cat([w[~m].abs() for (k, w), m in zip(weights.items(), masks.values())])
    if len(kept) and len(pruned):
        assert kept.min() >= pruned.max()


def test_ties_are_broken_deterministically_first_entries_first():
    w = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = magnitude_masks(w, 0.5, "global")       # 5 of 10 equal weights pruned: the first 5
    assert (~masks["a"]).flatten().tolist() == [True] * 5 + [False]
    assert masks["b"].all()


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_layerwise_prune_exact_per_layer_and_in_total(distribution):
    model = tiny_model()
    weights = dict(prunable_weights(model))
    n = sum(w.numel() for w in weights.values())
    masks = magnitude_masks(weights, 0.7, distribution)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * n)
    if distribution == "uniform":
        for k, m in masks.items():                  # each layer within one weight of 70 %
            assert abs(int((~m).sum()) - 0.7 * m.numel()) < 1
        for k, m in masks.items():                  # per-layer: the smallest magnitudes of that layer
            w = weights[k]
            if (~m).any():
                assert w[m].abs().min() >= w[~m].abs().max()
    per_layer = {k: s for k, s in zip(weights, (0.5, 0.25, 0.9))}
    masks = layerwise_magnitude_masks(weights, per_layer)
    for k, m in masks.items():
        assert int((~m).sum()) == round(per_layer[k] * m.numel())


def test_erk_densities_and_allocation():
    shapes = {"a": torch.Size([300, 784]), "b": torch.Size([100, 300]), "c": torch.Size([10, 100])}
    d = layer_densities(shapes, 0.98, "erk")
    total = sum(s.numel() for s in shapes.values())
    assert abs(sum(d[k] * shapes[k].numel() for k in shapes) - 0.02 * total) < 1
    assert d["a"] < d["b"] < d["c"] <= 1
    dense = layer_densities(shapes, 0.5, "erk")     # c would exceed density 1: kept dense
    assert dense["c"] == 1.0
    assert allocate_counts([10, 10, 10], [0.55, 0.55, 0.5], 16) == [6, 5, 5]


def test_pruning_keeps_already_pruned_entries_pruned():
    model = tiny_model()
    weights = dict(prunable_weights(model))
    first = magnitude_masks(weights, 0.5)
    with torch.no_grad():                           # pruned weights become large: still pruned
        for k, w in weights.items():
            w[~first[k]] = 10.0
    second = magnitude_masks(weights, 0.8, current=first)
    for k in weights:
        assert not (second[k] & ~first[k]).any()


# ------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruned_entries_and_optimizer_state_stay_zero_through_training_and_checkpoint(opt_name, tmp_path):
    def make(model):
        if opt_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)

    model = tiny_model()
    opt = make(model)
    mask = Mask(model)
    for step in range(3):                            # dense steps: state is nonzero everywhere
        x, y = batch(step)
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    mask.update(magnitude_masks(mask.params, 0.8), opt)

    def check(model, opt, mask):
        for k, p in mask.params.items():
            off = ~mask.masks[k]
            assert (p[off] == 0).all()
            if p.grad is not None:
                assert (p.grad[off] == 0).all()
            state = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
            assert state and all((v[off] == 0).all() for v in state)

    def train(model, opt, mask, steps):
        for step in steps:
            x, y = batch(step)
            opt.zero_grad(); F.cross_entropy(model(x), y).backward()
            mask.mask_grads(); opt.step(); mask.apply()
            check(model, opt, mask)

    train(model, opt, mask, range(3, 8))
    assert zeros(model) >= round(0.8 * mask.numel())
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mask": mask.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    model2 = tiny_model(seed=5)
    opt2 = make(model2)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    mask2 = Mask(model2)
    mask2.load_state_dict(ck["mask"])
    assert all(torch.equal(mask.masks[k], mask2.masks[k]) for k in mask.masks)
    check(model2, opt2, mask2)
    train(model2, opt2, mask2, range(8, 12))
    train(model, opt, mask, range(8, 12))
    for (_, a), (_, b) in zip(prunable_weights(model), prunable_weights(model2)):
        assert torch.equal(a, b)                      # resumed == uninterrupted


# ------------------------------------------------------------------------------ gmp
def test_gmp_schedule_milestones():
    s_f, s_i, t0, t1 = 0.9, 0.1, 100, 500
    assert gmp_sparsity(0, s_f, t0, t1, s_i) == s_i
    assert gmp_sparsity(t0, s_f, t0, t1, s_i) == pytest.approx(s_i)
    assert gmp_sparsity(300, s_f, t0, t1, s_i) == pytest.approx(s_f + (s_i - s_f) / 8)
    assert gmp_sparsity(200, s_f, t0, t1, s_i) == pytest.approx(s_f + (s_i - s_f) * 0.75 ** 3)
    assert gmp_sparsity(t1, s_f, t0, t1, s_i) == s_f
    assert gmp_sparsity(10 ** 6, s_f, t0, t1, s_i) == s_f
    vals = [gmp_sparsity(t, s_f, t0, t1, s_i) for t in range(0, 600, 7)]
    assert vals == sorted(vals)


def test_gmp_strategy_prunes_monotonically_to_the_target():
    model = tiny_model()
    strat = build("gmp", model, epochs=2, spe=10, sparsity=0.8, prune_start=0.1, prune_end=0.6, prune_every=2)
    seen = []
    n = sum(w.numel() for _, w in prunable_weights(model))
    for step in range(20):
        run_steps(strat, model, [step])
        s = strat.mask.sparsity() if strat.mask is not None else 0.0
        assert zeros(model) >= round(s * n)
        seen.append(s)
        if step >= 2:
            target = gmp_sparsity(step - (step - 2) % 2, 0.8, 2, 12)
            assert s == pytest.approx(round(target * n) / n) or step >= 12
    assert seen == sorted(seen) and seen[-1] == pytest.approx(round(0.8 * n) / n)
    assert seen[12] == seen[-1]


# ------------------------------------------------------------------------------ rigl
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_rigl_keeps_every_layer_density_constant(distribution):
    model = tiny_model()
    strat = build("rigl", model, epochs=3, spe=10, sparsity=0.7, distribution=distribution, update_every=2,
                  drop_fraction=0.5)
    counts = {k: int(m.sum()) for k, m in strat.mask.masks.items()}
    assert sum(m.numel() for m in strat.mask.masks.values()) - sum(counts.values()) == \
        round(0.7 * strat.mask.numel())
    before = {k: m.clone() for k, m in strat.mask.masks.items()}
    events = []

    def cb(step, where):
        masks = strat.mask.masks
        assert {k: int(m.sum()) for k, m in masks.items()} == counts
        if strat.updates > len(events):              # an update just happened: new weights at 0
            events.append(step)
            for k, p in strat.mask.params.items():
                new = masks[k] & ~prev[k]
                assert (p[new] == 0).all()
                buf = strat.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    assert (buf[new] == 0).all() and (buf[~masks[k]] == 0).all()
        prev.update({k: m.clone() for k, m in masks.items()})

    prev = {k: m.clone() for k, m in before.items()}
    run_steps(strat, model, range(30), cb)
    assert events == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]    # every 2 steps until 75 % of 30
    assert any(not torch.equal(before[k], strat.mask.masks[k]) for k in before)
    for k, p in strat.mask.params.items():
        assert (p[~strat.mask.masks[k]] == 0).all()
    assert cosine_decay(0, 100, 0.3) == pytest.approx(0.3) and cosine_decay(50, 100, 0.3) == pytest.approx(0.15)


# ------------------------------------------------------------------------------ imp
def test_imp_rewinds_surviving_weights_to_the_saved_step_and_resets_state():
    model = tiny_model()
    strat = build("imp", model, epochs=1, spe=4, sparsity=0.75, levels=3, rewind_step=2)
    assert strat.total_epochs(1) == 3
    snapshots = {}
    for step in range(4):
        run_steps(strat, model, [step])
        if step == 1:
            snapshots = {k: v.clone() for k, v in model.state_dict().items()}
    assert strat.rewind is not None and all(torch.equal(strat.rewind[k], snapshots[k]) for k in snapshots)
    strat.end_epoch(0, FakeTrainer(4))
    expected = 1 - 0.25 ** 0.5                        # level 1 of 2 prunes
    n = strat.mask.numel()
    assert strat.mask.sparsity() == pytest.approx(round(expected * n) / n)
    for k, v in model.state_dict().items():
        if k in strat.mask.masks:
            m = strat.mask.masks[k]
            assert torch.equal(v[m], snapshots[k][m]) and (v[~m] == 0).all()
        else:
            assert torch.equal(v, snapshots[k])     # biases rewound too
    assert len(strat.optimizer.state) == 0
    assert all(g["lr"] == pytest.approx(0.1) for g in strat.optimizer.param_groups)   # schedule restarted
    for step in range(4, 8):
        run_steps(strat, model, [step])
    strat.end_epoch(1, FakeTrainer(8))
    assert strat.mask.sparsity() == pytest.approx(round(0.75 * n) / n)
    strat.end_epoch(2, FakeTrainer(12))               # the last level: no further prune
    assert strat.level == 2 and strat.mask.sparsity() == pytest.approx(round(0.75 * n) / n)


# ------------------------------------------------------------------------------ CLI
SMOKE = ["--train-subset", "512", "--test-subset", "256", "--epochs", "2", "--no-progress"]


@pytest.mark.parametrize("method,extra", [("magnitude", []), ("gmp", ["--prune-every", "2"]),
                                          ("imp", ["--levels", "2"]), ("rigl", ["--update-every", "2"]),
                                          ("rigl", ["--distribution", "uniform"])])
def test_cli_smoke_summary_sparsity_matches_target(method, extra, idx_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--method", method, "--sparsity", "0.9", "--data-dir", str(idx_dir), "--out", str(out),
               *SMOKE, *extra])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0 <= s["test_accuracy"] <= 1
    if method == "imp":
        assert s["total_epochs"] == 4 and s["epochs"] == 4 and len(s["levels"]) == 2
    torch.load(out / "checkpoint.pt", weights_only=True)


def test_imp_resume_after_a_crash_matches_an_uninterrupted_run(idx_dir, tmp_path, monkeypatch):
    from sparsetrain.methods.pruning import IMP
    args = ["train", "--method", "imp", "--sparsity", "0.9", "--levels", "2", "--data-dir", str(idx_dir),
            "--train-subset", "256", "--test-subset", "128", "--epochs", "2", "--no-progress"]
    # epoch 3 of 4 (2 steps each): in level 2
    ref, res = crash_and_resume(monkeypatch, tmp_path, args, IMP, crash_step=5)
    assert res["test_loss"] == ref["test_loss"] and res["levels"] == ref["levels"]
