"""The fused Triton optimizer steps equal the torch reference (fp32, to 1e-6).

On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest) with
``SPARSETRAIN_FUSED=force``; on a CUDA machine the same tests also run on the GPU (marker ``cuda``).
Tensors are tiny: the interpreter is slow."""
import os

import pytest
import torch

from sparsetrain.optim import AdaBreg, LinBreg, ProxSGD, XRDA, fused_cuda
from sparsetrain.regularizers import L1, GroupL12

pytestmark = pytest.mark.skipif(not fused_cuda.available(), reason="triton is not installed")

SHAPES = [(7,), (6, 5), (4, 3, 3, 3), (2, 3, 1, 1), (fused_cuda.BLOCK + 9,)]
INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton's interpreter is off (a GPU machine): the cuda variants run instead")
DEVICES = [pytest.param("cpu", marks=INTERPRETED), pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


ALIGNED_SHAPES = [(8,), (4, 12), (8, 4, 3, 3), (fused_cuda.BLOCK + 12,)]   # sizes multiples of 4


def _params(device, seed=0, channels_last=False, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).mul_(0.1).to(device) for s in shapes]
    if channels_last:
        ps = [p.to(memory_format=torch.channels_last) if p.dim() == 4 else p for p in ps]
    return [p.requires_grad_() for p in ps]


def _run(make, device, fused: bool, monkeypatch, steps=3, poke=None, channels_last=False, shapes=SHAPES):
    monkeypatch.setenv(fused_cuda.ENV, "force" if fused else "off")
    ps = _params(device, channels_last=channels_last, shapes=shapes)
    opt = make(ps)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        for p in ps:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
        opt.step()
        if poke is not None and k == 0:
            poke(ps)
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in ps]
    return [p.detach().clone() for p in ps], state, opt


def _check(make, device, monkeypatch, **kw):
    (w0, s0, _), (w1, s1, opt) = (_run(make, device, f, monkeypatch, **kw) for f in (False, True))
    assert opt._fused_cache(), "the fused path was not taken"
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for st0, st1 in zip(s0, s1):
        assert st0.keys() == st1.keys()
        for key in st0:
            torch.testing.assert_close(st1[key], st0[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,wd,reg", [(0.0, 0.0, None), (0.9, 5e-4, L1(0.3))])
def test_proxsgd(device, momentum, wd, reg, monkeypatch):
    _check(lambda ps: ProxSGD(ps, lr=0.1, reg=reg, momentum=momentum, weight_decay=wd), device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,delta,reg", [(0.0, 1.0, L1(0.05)), (0.9, 2.0, L1(0.05)), (0.5, 1.0, None)])
def test_linbreg(device, momentum, delta, reg, monkeypatch):
    _check(lambda ps: LinBreg(ps, lr=0.1, reg=reg, delta=delta, momentum=momentum), device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda ps: LinBreg(ps, lr=0.1, reg=L1(0.05), momentum=0.9, weight_decay=5e-4),
    lambda ps: AdaBreg(ps, lr=0.01, reg=L1(0.05), delta=1.5, weight_decay=0.1),
], ids=["linbreg", "adabreg"])
def test_bregman_weight_decay(device, make, monkeypatch):
    """Weight decay is applied before the launch (coupled: to the gradients; AdaBreg: to v)."""
    _check(make, device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda ps: ProxSGD(ps, lr=0.1, reg=L1(0.3), momentum=0.9, weight_decay=5e-4, maximize=True),
    lambda ps: LinBreg(ps, lr=0.1, reg=L1(0.05), momentum=0.9, weight_decay=5e-4, maximize=True),
    lambda ps: AdaBreg(ps, lr=0.01, reg=L1(0.05), maximize=True),
    lambda ps: XRDA(ps, lr=0.5, lam=1e-3, maximize=True),
], ids=["proxsgd", "linbreg", "adabreg", "xrda"])
def test_maximize_takes_the_fused_path(device, make, monkeypatch):
    """``maximize`` is applied to the gradients by the base before the update, so the kernels
    implement it as they are (no fallback to the torch path)."""
    _check(make, device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_linbreg_momentum_rescaled_when_lr_changes(device, monkeypatch):
    def make(ps):
        opt = LinBreg(ps, lr=0.1, reg=L1(0.05), momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        orig = opt.step

        def step():
            orig()
            sched.step()
        opt.step = step
        return opt
    _check(make, device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reg", [L1(0.05), None])
def test_adabreg(device, reg, monkeypatch):
    _check(lambda ps: AdaBreg(ps, lr=0.01, reg=reg, delta=1.5), device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["normal", "kernel", "channel"])
@pytest.mark.parametrize("reweight", [True, False])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_xrda(device, mode, reweight, schedule, monkeypatch):
    _check(lambda ps: XRDA(ps, lr=0.5, lam=1e-3, mode=mode, reweight=reweight, schedule=schedule,
                           total_steps=4 if schedule == "cosine" else None, weight_decay=5e-4, max_factor=50),
           device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda ps: ProxSGD(ps, lr=0.1, reg=L1(0.3), momentum=0.9, weight_decay=5e-4),
    lambda ps: LinBreg(ps, lr=0.1, reg=L1(0.05), momentum=0.9),
    lambda ps: AdaBreg(ps, lr=0.01, reg=L1(0.05)),
    lambda ps: XRDA(ps, lr=0.5, lam=1e-3, total_steps=4),
    lambda ps: XRDA(ps, lr=0.5, lam=1e-3, reweight=False),
], ids=["proxsgd", "linbreg", "adabreg", "xrda", "xrda-plain"])
def test_aligned_tensors_take_the_vector_path(device, make, monkeypatch):
    """16-byte aligned tensors whose sizes are multiples of 4 compile with alignment hints."""
    _check(make, device, monkeypatch, shapes=ALIGNED_SHAPES)
    assert fused_cuda._HINTS["ok"], "the kernels with alignment hints did not compile"


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_weights(device, monkeypatch):
    """Conv weights in channels_last (the trainer's layout on a GPU) take the elementwise kernels."""
    _check(lambda ps: XRDA(ps, lr=0.5, lam=1e-3), device, monkeypatch, channels_last=True)
    _check(lambda ps: XRDA(ps, lr=0.5, lam=1e-3, mode="channel"), device, monkeypatch, channels_last=True)
    _check(lambda ps: LinBreg(ps, lr=0.1, reg=L1(0.05), momentum=0.9), device, monkeypatch, channels_last=True)


@pytest.mark.parametrize("device", DEVICES)
def test_xrda_fixed_alpha_and_unpenalised_group(device, monkeypatch):
    def make(ps):
        return XRDA([{"params": ps[:3], "alpha": 0.3}, {"params": ps[3:], "penalize": False}], lr=0.5, lam=1e-3)
    _check(make, device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_xrda_prediction_repaired_after_outside_change(device, monkeypatch):
    """Weights zeroed between steps (a pruning mask): the predicted max(a) misses, the device-side
    repair makes the step exact anyway."""
    def poke(ps):
        with torch.no_grad():
            for p in ps:
                p.view(-1)[: p.numel() // 2] = 0.0
                p.view(-1)[-1] = 3.0
    _check(lambda ps: XRDA(ps, lr=0.5, lam=1e-3, total_steps=5), device, monkeypatch, steps=4, poke=poke)


def test_dispatch_whitelist():
    """Only settings a kernel implements take the fused path; anything else falls back."""
    p = torch.zeros(3)
    group = {"params": [p], "lr": 0.1, "reg": L1(0.1), "momentum": 0.9, "weight_decay": 0.0, "foreach": None,
             "initial_lr": 0.1}
    import os
    old = os.environ.get(fused_cuda.ENV)
    os.environ[fused_cuda.ENV] = "force"
    try:
        assert fused_cuda.applicable([[p]], group, fused_cuda.PROXSGD_KNOWN)
        assert fused_cuda.applicable([[p]], {**group, "maximize": False}, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[p]], {**group, "maximize": True}, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[p]], {**group, "reg": GroupL12(0.1)}, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[p.double()]], group, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[torch.zeros(3, 2).t()]], group, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[p]], {**group, "lr": 0.0}, fused_cuda.BREGMAN_KNOWN)
        w = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)
        assert fused_cuda.applicable([[w], [torch.zeros_like(w)]], group, fused_cuda.PROXSGD_KNOWN)
        assert not fused_cuda.applicable([[w], [torch.zeros(4, 3, 2, 2)]], group, fused_cuda.PROXSGD_KNOWN)
        os.environ[fused_cuda.ENV] = "auto"   # CPU tensors: only when forced
        assert not fused_cuda.applicable([[p]], group, fused_cuda.PROXSGD_KNOWN)
    finally:
        if old is None:
            os.environ.pop(fused_cuda.ENV)
        else:
            os.environ[fused_cuda.ENV] = old


@pytest.mark.parametrize("device", DEVICES)
def test_xrda_prediction_hits_in_a_steady_run(device, monkeypatch):
    """After the first step the predicted max(a_k) is exact: the repair launch does nothing."""
    _, _, opt = _run(lambda ps: XRDA(ps, lr=0.5, lam=1e-3), device, True, monkeypatch, steps=3)
    (sub,) = [v for k, v in opt._fused_cache().items() if isinstance(k, tuple) and k[0] == "reweight"]
    slot = sub["ring"][(sub["k"] - 1) % 3]          # the last step's: predicted, true, _, repaired
    assert not slot[3].any() and torch.equal(slot[0], slot[1]) and bool((slot[1] > 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_xrda_reweighting_switched_off_midway(device, monkeypatch):
    """Plain ℓ1 after a reweighted phase keeps per-entry thresholds: the torch path takes over."""
    def make(ps):
        opt = XRDA(ps, lr=0.5, lam=1e-3)
        orig, calls = opt.step, []

        def step():
            calls.append(1)
            if len(calls) == 3:
                opt.param_groups[0]["reweight"] = False
            orig()
        opt.step = step
        return opt
    _check(make, device, monkeypatch, steps=4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_kernels_without_hints_when_the_hints_do_not_compile(monkeypatch):
    """A Triton that rejects the alignment hints: one warning, then the plain kernels, same result."""
    real = fused_cuda._proxsgd_kernel

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta["ALIGNED"]:
                    raise RuntimeError("CompilationError: multiple_of")
                return real[grid](*args, **meta)
            return launch
    monkeypatch.setattr(fused_cuda, "_proxsgd_kernel", Refuses())
    monkeypatch.setitem(fused_cuda._HINTS, "ok", True)
    with pytest.warns(UserWarning, match="without alignment hints"):
        _check(lambda ps: ProxSGD(ps, lr=0.1, reg=L1(0.3), momentum=0.9), "cpu", monkeypatch, shapes=ALIGNED_SHAPES)
    assert not fused_cuda._HINTS["ok"]
