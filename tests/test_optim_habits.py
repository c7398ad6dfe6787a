"""torch.optim habits on every sparsetrain optimizer: weight_decay, maximize, and the stated
momentum conventions."""
import pytest
import torch

from sparsetrain.optim import GRDA, XRDA, AdaBreg, LinBreg, ProxSGD
from sparsetrain.regularizers import L1

FACTORIES = {
    "linbreg": lambda ps, **kw: LinBreg(ps, lr=0.1, reg=L1(0.01), momentum=0.5, **kw),
    "adabreg": lambda ps, **kw: AdaBreg(ps, lr=0.01, reg=L1(0.01), **kw),
    "proxsgd": lambda ps, **kw: ProxSGD(ps, lr=0.1, reg=L1(0.01), momentum=0.5, **kw),
    "grda": lambda ps, **kw: GRDA(ps, lr=0.1, c=0.01, mu=0.51, **kw),
    "xrda": lambda ps, **kw: XRDA(ps, lr=0.5, lam=1e-4, **kw),
}


def run(name, steps=5, sign=1.0, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 10))
    target = torch.randn(20, 10)
    opt = FACTORIES[name]([w], **kw)
    for _ in range(steps):
        opt.zero_grad()
        (sign * ((w - target) ** 2).sum()).backward()
        grad = w.grad.clone()
        opt.step()
        assert torch.equal(w.grad, grad)                 # the user's gradient is left alone
    return w.detach()


@pytest.mark.parametrize("name", FACTORIES)
def test_maximize_of_minus_f_equals_minimize_f(name):
    assert torch.allclose(run(name, sign=-1.0, maximize=True), run(name), atol=1e-6)


@pytest.mark.parametrize("name", FACTORIES)
def test_weight_decay_is_accepted_and_acts(name):
    plain, decayed = run(name), run(name, weight_decay=0.5)
    assert not torch.allclose(plain, decayed)
    assert decayed.abs().sum() < plain.abs().sum()
    with pytest.raises(ValueError, match="weight_decay"):
        FACTORIES[name]([torch.nn.Parameter(torch.ones(2))], weight_decay=-1.0)


@pytest.mark.parametrize("name", FACTORIES)
def test_every_param_group_checks_weight_decay_and_maximize(name):
    """A group's own weight_decay / maximize is checked as the defaults are: a negative decay (a
    growth term) or a maximize of 'no' (truthy: it ascended) were taken silently."""
    opt = FACTORIES[name]([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="^weight_decay: must be >= 0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": -1.0})
    with pytest.raises(ValueError, match="^maximize: must be True or False, got 'no'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "maximize": "no"})
    with pytest.raises(ValueError, match="^maximize: must be True or False"):
        FACTORIES[name]([torch.nn.Parameter(torch.ones(2))], maximize=1)


def _pair(make_ours, make_torch, steps=6):
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(8, 5))
    b = torch.nn.Parameter(a.detach().clone())
    target = torch.randn(8, 5)
    oa, ob = make_ours([a]), make_torch([b])
    for _ in range(steps):
        for p, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    return a.detach(), b.detach()


def test_adabreg_weight_decay_is_adamw_at_lambda_zero():
    a, b = _pair(lambda ps: AdaBreg(ps, lr=0.05, weight_decay=0.3),
                 lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.3))
    assert torch.allclose(a, b, atol=1e-6)


def test_linbreg_weight_decay_is_sgd_at_lambda_zero():
    a, b = _pair(lambda ps: LinBreg(ps, lr=0.05, weight_decay=0.3),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.3))
    assert torch.allclose(a, b, atol=1e-6)


def test_linbreg_dampened_momentum_is_sgd_momentum_at_lr_times_one_minus_beta():
    """The docstring's convention: LinBreg(lr, β) steps like SGD(lr·(1−β), momentum=β)."""
    a, b = _pair(lambda ps: LinBreg(ps, lr=0.05, momentum=0.9),
                 lambda ps: torch.optim.SGD(ps, lr=0.05 * (1 - 0.9), momentum=0.9), steps=10)
    assert torch.allclose(a, b, atol=1e-5)


def test_adabreg_decoupled_decay_shrinks_nonzero_weights_only():
    w = torch.nn.Parameter(torch.tensor([0.0, 2.0, -3.0]))
    opt = AdaBreg([w], lr=0.1, reg=L1(0.5), weight_decay=1.0)
    w.grad = torch.zeros(3)
    opt.step()
    assert w[0] == 0 and torch.allclose(w[1:], torch.tensor([2.0, -3.0]) * 0.9, atol=1e-6)
