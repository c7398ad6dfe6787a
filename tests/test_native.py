"""sparsetrain.native: the compiled kernels agree with the torch paths they replace, and everything
falls back to torch when the library cannot be built."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from sparsetrain import native
from sparsetrain.export.sparse_modules import SparseLinear, sparsify
from sparsetrain.optim import XRDA
from sparsetrain.params import param_groups
from sparsetrain.regularizers import L1

needs_native = pytest.mark.skipif(native.lib() is None, reason=native.status())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=False), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


def _xrda_weights(use_native: bool, steps: int = 12, **kw) -> list[torch.Tensor]:
    net = _net()
    opt = XRDA(param_groups(net, L1(lam := kw.pop("lam", 1.0))), lr=0.5, lam=lam, total_steps=20, **kw)
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 10, (16,))
    with contextlib.nullcontext() if use_native else native.disabled():
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return [p.detach().clone() for p in net.parameters()]


@needs_native
@pytest.mark.parametrize("kw", [{}, {"reweight": False}, {"weight_decay": 1e-3}, {"alpha": 0.0}, {"alpha": 1.0},
                                {"mode": "kernel"}, {"mode": "channel", "alpha": 0.0},
                                {"mode": "kernel", "reweight": False}, {"max_factor": 3.0, "lam": 1e-2}])
def test_fused_xrda_matches_torch_ops(kw):
    fused, ref = _xrda_weights(True, **dict(kw)), _xrda_weights(False, **dict(kw))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.equal(a == 0, b == 0) or (a != b).sum() <= 1       # the same sparsity pattern
    assert any((w == 0).any() for w in fused)                           # the threshold did act


@needs_native
def test_fused_xrda_keeps_nan():
    """A NaN gradient must surface in the weights (the trainer stops on it), not be thresholded away."""
    p = nn.Parameter(torch.ones(8))
    opt = XRDA([p], lr=0.1, lam=1e-3)
    p.grad = torch.full((8,), float("nan"))
    opt.step()
    assert torch.isnan(p).all()


@needs_native
@pytest.mark.parametrize("n", [1, 3, 16, 17, 64, 80, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_kernel_matches_dense(n, bias):
    torch.manual_seed(n)
    w = torch.randn(37, 50) * (torch.rand(37, 50) < 0.1)
    w[5] = 0                                                        # an empty row
    lin = nn.Linear(50, 37, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    sp = SparseLinear.from_dense(lin)
    sp.kernel = "native"
    x = torch.randn(n, 50)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_csr_kernel_splits_rows_over_threads(monkeypatch):
    monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 64)
    torch.manual_seed(0)
    w = torch.randn(300, 200) * (torch.rand(300, 200) < 0.05)
    sp = SparseLinear(200, 300, w, None)
    sp.kernel = "native"
    x = torch.randn(64, 200)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert len(native.split(300, 10**6, sp.crow)) == 3
        y = sp._matmul_t(x.t().contiguous())
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, w @ x.t(), rtol=1e-5, atol=1e-5)


def test_split_balances_nonzeros():
    crow = torch.tensor([0, 100, 100, 100, 100, 200], dtype=torch.int32)   # rows 0 and 4 hold everything
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pts = native.split(5, 10**9, crow)
    finally:
        torch.set_num_threads(old)
    assert pts[0] == 0 and pts[-1] == 5 and len(pts) == 3 and 1 <= pts[1] <= 4


def test_without_a_compiler_everything_falls_back(monkeypatch, tmp_path):
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "why", "")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.lib() is None
    assert "torch fallback" in native.status()
    assert not native.usable(torch.zeros(3))
    # the optimizer and the sparse layers still work, on their torch paths
    ref = _xrda_weights(False, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(_xrda_weights(True, steps=3), ref))
    lin = nn.Linear(20, 10)
    sp = SparseLinear.from_dense(lin)
    sp.kernel = "native"
    x = torch.randn(4, 20)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    assert "native" not in [r["kernel"] for r in sparsify(nn.Sequential(nn.Linear(20, 10)), 8)]


def test_build_failure_names_the_compiler(monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'error: no thanks' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "why", "")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(bad))
    assert native.lib() is None
    assert str(bad) in native.status() and "no thanks" in native.status()
    assert not list((tmp_path / "cache").glob("*.so*"))                # no half-written library left


def test_disabled_via_environment(monkeypatch):
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "why", "")
    monkeypatch.setenv("SPARSETRAIN_NATIVE", "0")
    assert native.lib() is None and "SPARSETRAIN_NATIVE=0" in native.status()


@needs_native
def test_one_pass_step_is_bitwise_the_two_pass_step_and_survives_outside_changes():
    """The max(a) prediction makes the step one pass with bit-identical results; a weight changed
    outside the optimizer breaks the prediction, which the step detects and repairs."""
    def run(fresh_hints: bool, poke: bool, use_native: bool = True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
        opt = XRDA(param_groups(net, L1(3e-4)), lr=0.5, lam=3e-4, total_steps=30)
        x, y = torch.randn(32, 30), torch.randint(0, 5, (32,))
        for k in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if fresh_hints:
                opt.__dict__.pop("_max_a_hints", None)          # forces the two-pass step
            with contextlib.nullcontext() if use_native else native.disabled():
                opt.step()
            if poke and k == 5:
                with torch.no_grad():
                    net[0].weight[0, 0] = 3.0                   # a new largest |w|: the prediction is wrong
        return [p.detach().clone() for p in net.parameters()]
    one, two = run(False, False), run(True, False)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    poked, ref = run(False, True), run(True, True, use_native=False)
    for a, b in zip(poked, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
