"""Optimizers against reference implementations, step by step (SPEC §2-§4)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain import param_groups
from sparsetrain.errors import UsageError
from sparsetrain.optim import GRDA, XRDA, AdaBreg, LinBreg, ProxSGD
from sparsetrain.regularizers import GroupL12, L1, Nuclear, SparseGroup


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def _warm_up_torch_optim():
    """The first torch Optimizer construction imports torch._dynamo (~2 s): pay it in setup."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 4, generator=g)


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def quadratic_grads(w, steps, seed=0):
    """A fixed sequence of gradients for a single tensor (manual references)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=g, dtype=w.dtype) for _ in range(steps)]


# ------------------------------------------------------------------ LinBreg / AdaBreg identities
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("reg", [None, L1(0.0)])
def test_linbreg_lam0_delta1_equals_sgd(foreach, reg):
    m1, m2 = make_model(), make_model()
    o1 = LinBreg(m1.parameters(), lr=0.1, reg=reg, foreach=foreach)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    for i in range(5):
        train(m1, o1, 1, i)
        train(m2, o2, 1, i)
        assert same(weights(m1), weights(m2))


@pytest.mark.parametrize("foreach", [True, False])
def test_linbreg_momentum_equals_dampened_sgd_by_hand(foreach):
    w0 = torch.randn(6, 5, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    opt = LinBreg([w], lr=0.1, reg=L1(0.0), momentum=0.8, foreach=foreach)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # lr changes too
    ref, m = w0.clone(), torch.zeros_like(w0)
    for k, g in enumerate(quadratic_grads(w0, 8)):
        lr = opt.param_groups[0]["lr"]
        w.grad = g.clone()
        opt.step()
        sched.step()
        m = 0.8 * m + 0.2 * lr * g
        ref = ref - m
        assert torch.allclose(w.detach(), ref, atol=1e-12), k


@pytest.mark.parametrize("foreach", [True, False])
def test_adabreg_lam0_equals_adam(foreach):
    m1, m2 = make_model(), make_model()
    o1 = AdaBreg(param_groups(m1, L1(0.0)), lr=0.01, foreach=foreach)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.01, foreach=foreach)
    for i in range(6):
        train(m1, o1, 1, i)
        train(m2, o2, 1, i)
        assert same(weights(m1), weights(m2))  # same formula, same kernels: bit-identical


@pytest.mark.parametrize("cls,kw", [(LinBreg, {}), (AdaBreg, {})])
@pytest.mark.parametrize("reg", [L1(0.3), GroupL12(0.3, "kernels"), Nuclear(0.3), SparseGroup(0.1, 0.2)])
@pytest.mark.parametrize("delta", [1.0, 2.5])
def test_first_bregman_step_starts_from_w0(cls, kw, reg, delta):
    model = make_model()
    w0 = weights(model)
    opt = cls(param_groups(model, reg), lr=0.1, delta=delta, **kw)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: v₀ unchanged, w = prox_{δJ}(δ v₀) must be w₀
    for a, b in zip(weights(model), w0):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    v0 = opt.state[model[0].weight]["v"]
    assert torch.allclose(reg.prox(delta * v0, delta), w0[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_entries_stay_zero_until_v_exceeds_lam(foreach):
    lam, lr, c = 0.5, 0.1, 0.7
    w = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    opt = LinBreg([w], lr=lr, reg=L1(lam), foreach=foreach)
    for k in range(1, 12):
        w.grad = torch.tensor([[-c, 0.0, 0.0]])
        opt.step()
        v = opt.state[w]["v"][0, 0].item()
        assert v == pytest.approx(lr * c * k)
        if lr * c * k <= lam:
            assert w[0, 0].item() == 0.0, k
        else:
            assert w[0, 0].item() == pytest.approx(lr * c * k - lam), k
        assert w[0, 1].item() == 0.0  # never pushed: stays exactly 0


def test_linbreg_recovers_compressed_sensing():
    torch.manual_seed(0)
    n, m, k = 256, 100, 10
    A = torch.randn(m, n) / m ** 0.5
    x = torch.zeros(n)
    x[torch.randperm(n)[:k]] = torch.randn(k).sign() * (1 + torch.rand(k))
    y = A @ x
    model = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = LinBreg(model.parameters(), lr=0.5, reg=L1(1.0), delta=5.0)
    for _ in range(800):
        opt.zero_grad()
        F.mse_loss(model(A).squeeze(1), y).backward()
        opt.step()
    err = (model.weight.detach().squeeze() - x).norm() / x.norm()
    assert err < 1e-3


# ------------------------------------------------------------------ λ / δ changes
@pytest.mark.parametrize("cls", [LinBreg, AdaBreg])
@pytest.mark.parametrize("change", ["set_lam", "reg_attr", "delta", "explicit"])
def test_changing_lam_or_delta_reinitialises_v(cls, change):
    model = make_model()
    opt = cls(param_groups(model, L1(0.05)), lr=0.05)
    train(model, opt, 4)
    before = weights(model)
    if change == "set_lam":
        opt.set_lam(0.5)
    elif change == "reg_attr":
        opt.param_groups[0]["reg"].lam = 0.5
    elif change == "delta":
        opt.param_groups[0]["delta"] = 3.0
    else:
        opt.param_groups[0]["reg"].lam = 0.5
        opt.reinit_subgradient()
    for g in opt.param_groups:
        g["lr"] = 0.0  # a step that does not move v: with v rebuilt from w, w stays put
    train(model, opt, 1, start=4)
    for a, b in zip(weights(model), before):
        assert torch.allclose(a, b, atol=1e-6)


def test_without_reinit_weights_would_jump():
    """Sanity check of the test above: rebuilding v is what keeps w in place."""
    model = make_model()
    opt = LinBreg(param_groups(model, L1(0.05)), lr=0.05)
    train(model, opt, 4)
    before = weights(model)
    reg = opt.param_groups[0]["reg"]
    reg.lam = 0.5
    opt.param_groups[0][opt._KEY] = opt._key(opt.param_groups[0])  # pretend nothing changed
    for g in opt.param_groups:
        g["lr"] = 0.0
    train(model, opt, 1, start=4)
    assert not torch.allclose(weights(model)[0], before[0], atol=1e-3)


# ------------------------------------------------------------------ xRDA
def _xrda_single(w0, grads, **kw):
    w = w0.clone().requires_grad_(True)
    opt = XRDA([w], **kw)
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out, opt, w


@pytest.mark.parametrize("foreach", [True, False])
def test_xrda_alpha0_is_prox_sgd_with_ema_momentum(foreach):
    w0 = torch.randn(8, 6, dtype=torch.float64)
    grads = quadratic_grads(w0, 6)
    s, lam, tau, wd = 0.3, 0.4, 2.0, 0.01
    got, _, _ = _xrda_single(w0, grads, lr=s, lam=lam, tau=tau, alpha=0.0, reweight=False,
                             weight_decay=wd, foreach=foreach)
    beta = math.exp(-s / tau)
    w, v = w0.clone(), torch.zeros_like(w0)
    for g, out in zip(grads, got):
        v = beta * v + (1 - beta) * (g + wd * w)
        u = w - s * v
        w = u.sign() * (u.abs() - lam * s).clamp_min(0)
        assert torch.allclose(out, w, atol=1e-12)
    assert (w == 0).any()


@pytest.mark.parametrize("foreach", [True, False])
def test_xrda_alpha1_is_l1_rda_anchored_at_w0(foreach):
    w0 = torch.randn(8, 6, dtype=torch.float64)
    grads = quadratic_grads(w0, 6)
    s, lam, tau = 0.3, 0.2, 2.0
    got, _, _ = _xrda_single(w0, grads, lr=s, lam=lam, tau=tau, alpha=1.0, reweight=False, foreach=foreach)
    beta = math.exp(-s / tau)
    v, sum_sv = torch.zeros_like(w0), torch.zeros_like(w0)
    for k, (g, out) in enumerate(zip(grads, got), start=1):
        v = beta * v + (1 - beta) * g
        sum_sv = sum_sv + s * v
        z = w0 - sum_sv
        w = z.sign() * (z.abs() - lam * k * s).clamp_min(0)
        assert torch.allclose(out, w, atol=1e-12)


@pytest.mark.parametrize("mode,c_g", [("normal", 1.0), ("kernel", 3.0), ("channel", math.sqrt(2 * 9))])
def test_xrda_reweighting_factor(mode, c_g):
    w0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    w0[0] = 0  # a zero group / zero entries
    s, tau_b, M = 0.5, 3.0, 500.0
    _, opt, w = _xrda_single(w0, [torch.zeros_like(w0)], lr=s, lam=0.0, tau_b=tau_b, alpha=0.0,
                             max_factor=M, mode=mode)
    gamma = math.exp(-s / tau_b)
    dims = {"normal": (), "kernel": (2, 3), "channel": (1, 2, 3)}[mode]
    m = w0.abs().mean(dim=dims, keepdim=True) if dims else w0.abs()
    a = (1 - gamma) * m
    eps = a.max() / (M - 1)
    b = c_g * M * eps / (a + eps)
    T = opt.state[w]["T"]
    assert torch.allclose(T / s, b, rtol=1e-12)
    assert torch.allclose((T / s).max(), torch.tensor(c_g * M, dtype=T.dtype))  # zeros -> c_G·M
    assert torch.allclose((T / s).min(), torch.tensor(c_g, dtype=T.dtype))  # largest -> c_G


def test_xrda_max_factor_one_is_plain_l1():
    w0 = torch.randn(8, 6, dtype=torch.float64)
    grads = quadratic_grads(w0, 4)
    a, _, _ = _xrda_single(w0, grads, lr=0.3, lam=0.2, alpha=0.5, max_factor=1.0)
    b, _, _ = _xrda_single(w0, grads, lr=0.3, lam=0.2, alpha=0.5, reweight=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_xrda_structured_threshold_zeroes_whole_kernels():
    w0 = torch.randn(4, 2, 3, 3)
    w0[1, 0] *= 0.01  # a weak kernel
    got, _, _ = _xrda_single(w0, [torch.zeros_like(w0)] * 3, lr=1.0, lam=2e-3, alpha=0.0, mode="kernel")
    w = got[-1]
    alive = w.abs().sum(dim=(2, 3)) != 0
    assert not alive[1, 0] and alive.sum() >= 6
    # every kernel is either all zero or keeps all its nonzero entries' structure
    assert torch.equal((w != 0).any(dim=(2, 3)), alive)


def test_xrda_cosine_schedule_values():
    from sparsetrain.optim import xrda_schedule
    s, a = xrda_schedule(5, lr=2.0, schedule="cosine", total_steps=10)
    assert s == pytest.approx(1.0) and a == pytest.approx(0.5)
    s, a = xrda_schedule(10, lr=2.0, schedule="cosine", total_steps=10)
    assert s == pytest.approx(0.0, abs=1e-12) and a == pytest.approx(1.0)
    s, a = xrda_schedule(7, lr=1.0, schedule="step", milestones=[3, 6])
    assert s == 0.25 and a == 0.75


# ------------------------------------------------------------------ gRDA
@pytest.mark.parametrize("foreach", [True, False])
def test_grda_threshold_at_constant_lr(foreach):
    w0 = torch.randn(5, 4, dtype=torch.float64)
    grads = quadratic_grads(w0, 7)
    c, mu, lr = 0.05, 0.6, 0.2
    w = w0.clone().requires_grad_(True)
    opt = GRDA([w], lr=lr, c=c, mu=mu, foreach=foreach)
    acc = w0.clone()
    for n, g in enumerate(grads, start=1):
        w.grad = g
        opt.step()
        acc = acc - lr * g
        thr = c * lr ** (mu + 0.5) * n ** mu
        assert opt.state[w]["threshold"] == pytest.approx(thr, rel=1e-12)
        assert torch.allclose(w.detach(), acc.sign() * (acc.abs() - thr).clamp_min(0), atol=1e-12)


# ------------------------------------------------------------------ generic contract
def _factories():
    conv_or_lin = lambda name, mod, p: GroupL12(0.05, "kernels") if p.dim() == 4 else L1(0.01)  # noqa: E731
    return {
        "proxsgd": lambda m, fe=True: ProxSGD(param_groups(m, L1(0.01)), lr=0.05, momentum=0.9,
                                              weight_decay=1e-3, foreach=fe),
        "linbreg": lambda m, fe=True: LinBreg(param_groups(m, conv_or_lin), lr=0.1, momentum=0.5, foreach=fe),
        "linbreg-nuclear": lambda m, fe=True: LinBreg(param_groups(m, Nuclear(0.05)), lr=0.1, delta=2.0,
                                                      foreach=fe),
        "adabreg": lambda m, fe=True: AdaBreg(param_groups(m, SparseGroup(0.01, 0.02, "filters")), lr=0.01,
                                              delta=1.5, foreach=fe),
        "xrda": lambda m, fe=True: XRDA(param_groups(m, L1(1e-3)), lr=0.5, lam=1e-3, tau=2.0, tau_b=2.0,
                                        total_steps=8, mode="kernel", weight_decay=5e-4, foreach=fe),
        "xrda-normal-callable": lambda m, fe=True: XRDA(m.parameters(), lr=0.3, lam=1e-3, tau=2.0,
                                                        alpha=lambda k: k / (k + 1.0), foreach=fe),
        "xrda-step": lambda m, fe=True: XRDA(m.parameters(), lr=0.3, lam=1e-3, schedule="step",
                                             milestones=[2, 4], reweight=False, foreach=fe),
        "grda": lambda m, fe=True: GRDA(param_groups(m, L1(0.0)), lr=0.05, c=0.02, mu=0.6, foreach=fe),
    }


FACTORIES = _factories()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_is_bit_identical(name):
    make = FACTORIES[name]
    m1 = make_model()
    o1 = make(m1)
    train(m1, o1, 6)

    m2 = make_model()
    o2 = make(m2)
    train(m2, o2, 3)
    buf = io.BytesIO()
    torch.save(o2.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m3 = make_model(seed=123)
    m3.load_state_dict(m2.state_dict())
    o3 = make(m3)
    o3.load_state_dict(sd)
    train(m3, o3, 3, start=3)
    assert same(weights(m1), weights(m3))
    assert o3.get_lam() == o1.get_lam()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_foreach_and_single_tensor_paths_are_identical(name):
    m1, m2 = make_model(), make_model()
    o1, o2 = FACTORIES[name](m1, True), FACTORIES[name](m2, False)
    train(m1, o1, 5)
    train(m2, o2, 5)
    assert same(weights(m1), weights(m2))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_no_nan_on_zero_weights_and_zero_lam(name):
    model = make_model()
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = FACTORIES[name](model)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    opt.set_lam(0.0)
    train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_updates_closure_and_scheduler(name):
    model = make_model()
    opt = FACTORIES[name](model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        sched.step()
    assert torch.is_tensor(loss)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] / 8)


def test_regularized_weights_become_sparse_biases_do_not():
    model = make_model()
    opt = ProxSGD(param_groups(model, L1(2.0)), lr=0.1)
    train(model, opt, 3)
    assert (model[3].weight == 0).float().mean() > 0.5
    assert (model[3].bias != 0).all()


def test_lam_controller_interface():
    model = make_model()
    shared = L1(0.1)
    opt = LinBreg([{"params": [model[0].weight], "reg": shared}, {"params": [model[3].weight], "reg": shared},
                   {"params": [model[0].bias, model[3].bias], "reg": None}], lr=0.1)
    assert opt.get_lam() == [0.1, 0.1, None]
    opt.scale_lam(0.5)  # shared regularizer scaled once
    assert opt.get_lam() == [0.05, 0.05, None]
    opt.set_lam(0.3)
    assert opt.get_lam() == [0.3, 0.3, None]
    opt.set_lam([None, 0.2, 1.0])  # per group; unregularized groups are skipped
    assert opt.get_lam() == [0.2, 0.2, None]
    with pytest.raises(UsageError):
        opt.set_lam([0.1])
    with pytest.raises(UsageError):
        opt.set_lam(-1.0)

    x = XRDA(param_groups(model, L1(1.0)), lr=1.0, lam=1.0)
    assert x.get_lam() == [1.0, None]
    x.set_lam(2e-3)
    assert x.get_lam() == [2e-3, None] and x.param_groups[0]["lam"] == 2e-3
    g = GRDA(param_groups(model, L1(1.0)), lr=0.1, c=0.01, mu=0.6)
    g.scale_lam(2.0)
    assert g.get_lam() == [0.02, None]


def test_scale_lam_of_chosen_groups_refuses_unknown_indices():
    model = make_model()
    opt = LinBreg([{"params": [model[0].weight], "reg": L1(0.1)}, {"params": [model[3].weight], "reg": L1(0.2)}],
                  lr=0.1)
    opt.scale_lam(2.0, groups=[1])
    assert opt.get_lam() == [0.1, 0.4]
    for bad in ([2], [-1], ["0"]):   # an index no group has would change nothing, silently
        with pytest.raises(UsageError, match=r"^groups: .*allowed: .*0, 1"):
            opt.scale_lam(2.0, groups=bad)
    assert opt.get_lam() == [0.1, 0.4]


def test_add_param_group_and_default_reg():
    model = make_model()
    opt = LinBreg([model[0].weight], lr=0.1, reg=L1(0.1))
    opt.add_param_group({"params": [model[3].weight], "reg": GroupL12(0.1)})
    opt.add_param_group({"params": [model[0].bias, model[3].bias], "reg": None, "lr": 0.01})
    assert [type(g["reg"]).__name__ if g["reg"] else None for g in opt.param_groups] == ["L1", "GroupL12", None]
    train(model, opt, 2)
    assert all("v" in opt.state[p] for p in model.parameters())


def test_load_state_dict_keeps_live_regularizer_objects():
    model = make_model()
    reg = L1(0.1)
    opt = LinBreg(param_groups(model, reg), lr=0.1)
    train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["reg"] == {"name": "l1", "lam": 0.1}
    reg2 = L1(0.7)
    opt2 = LinBreg(param_groups(model, reg2), lr=0.1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["reg"] is reg2 and reg2.lam == 0.1


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, delta=0.0)])
def test_bad_hyperparameters_raise_usage_error(bad):
    with pytest.raises(UsageError):
        LinBreg(make_model().parameters(), **bad)


def test_xrda_bad_arguments():
    ps = make_model().parameters
    with pytest.raises(UsageError):
        XRDA(ps(), lr=1.0, lam=1e-3, schedule="cosine")  # no total_steps
    with pytest.raises(UsageError):
        XRDA(ps(), lr=1.0, lam=1e-3, mode="rows")
    with pytest.raises(UsageError):
        XRDA(ps(), lr=1.0, lam=1e-3, max_factor=0.5)


# ------------------------------------------------------------------ more hand references
def _soft(x, t):
    return x.sign() * (x.abs() - t).clamp_min(0)


@pytest.mark.parametrize("foreach", [True, False])
def test_linbreg_with_l1_and_delta_matches_hand_reference(foreach):
    w0 = _soft(torch.randn(6, 5, dtype=torch.float64), 0.5)
    grads = quadratic_grads(w0, 6)
    lam, delta, lr = 0.3, 2.0, 0.2
    w = w0.clone().requires_grad_(True)
    opt = LinBreg([w], lr=lr, reg=L1(lam), delta=delta, foreach=foreach)
    v = w0 / delta + lam * w0.sign()
    for g in grads:
        w.grad = g
        opt.step()
        v = v - lr * g
        assert torch.allclose(w.detach(), _soft(delta * v, delta * lam), atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_adabreg_with_l1_matches_hand_reference(foreach):
    w0 = _soft(torch.randn(6, 5, dtype=torch.float64), 0.5)
    grads = quadratic_grads(w0, 6)
    lam, delta, lr, b1, b2, eps = 0.1, 1.5, 0.05, 0.9, 0.999, 1e-8
    w = w0.clone().requires_grad_(True)
    opt = AdaBreg([w], lr=lr, reg=L1(lam), delta=delta, foreach=foreach)
    v, m, u = w0 / delta + lam * w0.sign(), torch.zeros_like(w0), torch.zeros_like(w0)
    for k, g in enumerate(grads, start=1):
        w.grad = g
        opt.step()
        m, u = b1 * m + (1 - b1) * g, b2 * u + (1 - b2) * g * g
        v = v - lr * (m / (1 - b1 ** k)) / ((u / (1 - b2 ** k)).sqrt() + eps)
        assert torch.allclose(w.detach(), _soft(delta * v, delta * lam), atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_proxsgd_matches_hand_reference_and_sgd(foreach):
    w0 = torch.randn(6, 5, dtype=torch.float64)
    grads = quadratic_grads(w0, 6)
    lam, lr, mu, wd = 0.2, 0.1, 0.9, 0.01
    w = w0.clone().requires_grad_(True)
    opt = ProxSGD([w], lr=lr, reg=L1(lam), momentum=mu, weight_decay=wd, foreach=foreach)
    ref, b = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        w.grad = g
        opt.step()
        b = mu * b + (g + wd * ref)  # torch.optim.SGD's heavy ball
        ref = _soft(ref - lr * b, lr * lam)
        assert torch.allclose(w.detach(), ref, atol=1e-12)
    # without a regularizer: torch.optim.SGD
    m1, m2 = make_model(), make_model()
    o1 = ProxSGD(m1.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=foreach)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(m1, o1, 5)
    train(m2, o2, 5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(m1), weights(m2)))


def test_unpenalised_groups_take_plain_steps():
    m1, m2 = make_model(), make_model()
    o1 = GRDA(param_groups(m1, L1(1.0)), lr=0.05, c=0.5, mu=0.6)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    train(m1, o1, 1)  # one step: same gradients on both models
    train(m2, o2, 1)
    assert torch.equal(m1[3].bias, m2[3].bias)  # bias: plain SGD
    assert not torch.equal(m1[3].weight, m2[3].weight)
