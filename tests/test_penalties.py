"""HALO: the optimal scale and profile penalty, the variants, the guard, and the method end to end."""
import json
import math

import pytest
import torch
from torch import nn

from sparsetrain.cli import main
from sparsetrain.penalties import HALO, halo_optimal_scale, halo_profile_penalty, mcp_penalty, profile_constant
from conftest import crash_and_resume

# The first optimizer a process builds imports torch._dynamo (seconds): pay it at collection,
# not inside the first test.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def minimise_scales(halo, steps=50):
    opt = torch.optim.LBFGS(list(halo.parameters()), lr=1, max_iter=steps, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = halo()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return halo().item()


def test_optimal_scale_and_profile_penalty():
    w = torch.tensor([0.5, -2.0, 0.01, 3e-3, -0.7], dtype=torch.float64)
    xi, psi = 0.3, 0.7
    halo = HALO([w], xi, psi, min_scale=1e-6)
    value = minimise_scales(halo)
    lam = halo.scales[0].detach()
    expected = (2 * xi * w.abs() / psi) ** (1 / 3)
    assert torch.allclose(lam.abs(), expected, rtol=1e-5)
    assert torch.allclose(halo_optimal_scale(w, xi, psi), expected)
    profile = 3 * 2 ** (-2 / 3) * xi ** (1 / 3) * psi ** (2 / 3) * w.abs() ** (1 / 3)
    assert value == pytest.approx(profile.sum().item(), rel=1e-9)
    assert torch.allclose(halo_profile_penalty(w, xi, psi), profile)
    assert profile_constant(xi, psi) == pytest.approx(3 * 2 ** (-2 / 3) * xi ** (1 / 3) * psi ** (2 / 3))


def test_profile_penalty_on_a_grid():
    w, xi, psi = 0.37, 2e-3, 5e-2
    grid = torch.linspace(1e-3, 1.0, 200001, dtype=torch.float64)
    f = xi * w / grid ** 2 + psi * grid
    i = int(f.argmin())
    assert grid[i].item() == pytest.approx(halo_optimal_scale(w, xi, psi), rel=1e-4)
    assert f[i].item() == pytest.approx(halo_profile_penalty(w, xi, psi), rel=1e-8)


def test_penalty_value_gradient_budget_and_squared_variant():
    lin = nn.Linear(3, 2, bias=True).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.25, -4.0]]))
    halo = HALO(lin, xi=0.1, psi=0.01, P=2.0)
    assert [n for n in halo.names] == ["weight"]                 # biases are not penalised
    with torch.no_grad():
        halo.scales[0].copy_(torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0]]))
    lam = halo.scales[0].detach()
    w = lin.weight.detach()
    expected = 0.1 * (w.abs() / lam ** 2).sum() + 0.01 * abs(lam.abs().sum() - 2.0)
    p = halo()
    assert p.item() == pytest.approx(expected.item())
    p.backward()
    assert torch.allclose(lin.weight.grad, 0.1 * torch.sign(w) / lam ** 2)
    assert torch.allclose(halo.scales[0].grad, -2 * 0.1 * w.abs() / lam.abs() ** 3 * lam.sign() + 0.01 * lam.sign())
    sq = HALO(lin, xi=0.1, psi=0.01, P=2.0, squared=True)
    assert sq().item() == pytest.approx(0.1 * w.abs().sum().item() + 0.01 * (6 - 2.0) ** 2)


def test_scales_are_guarded_away_from_zero():
    w = torch.tensor([0.3, -0.2], requires_grad=True)
    halo = HALO([w], xi=1.0, psi=1.0, min_scale=1e-2)
    with torch.no_grad():
        halo.scales[0].zero_()
    p = halo()
    p.backward()
    assert math.isfinite(p.item()) and p.item() == pytest.approx(0.5 / 1e-4)
    assert torch.isfinite(w.grad).all() and torch.isfinite(halo.scales[0].grad).all()


def test_variants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ws = [model[0].weight, model[2].weight]
    l1 = sum(w.abs().sum() for w in ws)
    lasso = HALO(model, xi=0.1, psi=0.2, variant="lasso")
    assert len(list(lasso.parameters())) == 0
    assert lasso().item() == pytest.approx(0.1 * l1.item())
    shared = HALO(model, xi=0.1, psi=0.2, variant="shared")
    assert [p.numel() for p in shared.parameters()] == [1]
    assert shared().item() == pytest.approx(0.1 * l1.item() + 0.2 * 18)
    full = HALO(model, xi=0.1, psi=0.2)
    assert sum(p.numel() for p in full.parameters()) == 18
    assert full().item() == pytest.approx(0.1 * l1.item() + 0.2 * 18)       # scales start at 1
    mcp = HALO(model, xi=0.5, psi=2.0, variant="mcp")
    a = torch.tensor([0.0, 0.3, 1.0, 1.5])                                   # γλ = 1
    assert mcp_penalty(a, 0.5, 2.0).item() == pytest.approx(0 + (0.15 - 0.09 / 4) + 0.25 + 0.25)
    assert mcp().item() == pytest.approx(sum(mcp_penalty(w.detach(), 0.5, 2.0) for w in ws).item())
    with pytest.raises(ValueError):
        HALO(model, xi=0.1, psi=0.2, variant="bogus")


def test_authors_shared_baseline_minimises_to_its_closed_form():
    """shared-sq: ξ Σ|w|/λ² + ψλ², minimised at λ* = (ξS/ψ)^{1/4} to 2√(ξψS), S = Σ|w|."""
    w = torch.tensor([0.5, -2.0, 0.01, -0.7], dtype=torch.float64)
    xi, psi = 0.3, 0.7
    halo = HALO([w], xi, psi, variant="shared-sq", min_scale=1e-6)
    assert [p.numel() for p in halo.parameters()] == [1]
    assert halo().item() == pytest.approx(xi * w.abs().sum().item() + psi)        # λ starts at 1
    value = minimise_scales(halo)
    S = w.abs().sum().item()
    assert abs(halo.scales[0].item()) == pytest.approx((xi * S / psi) ** 0.25, rel=1e-6)
    assert value == pytest.approx(2 * math.sqrt(xi * psi * S), rel=1e-9)


def test_conv_penalised_set_is_conv_weights_and_biases_and_no_linear():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3, bias=False), nn.Flatten(),
                          nn.Linear(8, 3))
    halo = HALO(model, xi=0.1, psi=0.2, penalize="conv")
    assert halo.names == ["0.weight", "0.bias", "2.weight"]
    assert [tuple(s.shape) for s in halo.scales] == [(2, 1, 3, 3), (2,), (2, 2, 3, 3)]
    l1 = sum(p.abs().sum() for p in (model[0].weight, model[0].bias, model[2].weight))
    assert halo().item() == pytest.approx(0.1 * l1.item() + 0.2 * (18 + 2 + 36))
    halo().backward()
    assert model[4].weight.grad is None and model[0].bias.grad is not None
    assert HALO(model, xi=0.1, psi=0.2).names == ["0.weight", "2.weight", "4.weight"]
    with pytest.raises(ValueError, match="no Conv layer"):
        HALO(nn.Sequential(nn.Linear(3, 2)), xi=0.1, psi=0.2, penalize="conv")


def test_halo_penalize_conv_on_a_linear_model_is_a_usage_error(idx_dir, tmp_path, capsys):
    rc = main(["train", "--method", "halo", "--model", "lenet300", "--halo-penalize", "conv",
               "--data-dir", str(idx_dir), "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress"])
    assert rc == 2
    assert "--halo-penalize" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--finetune-epochs", "1"], ["--halo-variant", "mcp"],
                                   ["--halo-variant", "shared-sq", "--model", "lenet5", "--halo-penalize", "conv"]])
def test_halo_cli_smoke_prunes_to_the_target(extra, idx_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--method", "halo", "--sparsity", "0.9", "--data-dir", str(idx_dir), "--out", str(out),
               "--train-subset", "512", "--test-subset", "256", "--epochs", "2", "--no-progress", *extra])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0 <= s["accuracy_before_prune"] <= 1 and 0 <= s["accuracy_after_prune"] <= 1
    assert s["epochs"] == (3 if extra[:1] == ["--finetune-epochs"] else 2)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    if not extra:
        assert any(k.startswith("scales.") for k in ck["strategy"]["halo"])


def test_halo_resume_after_a_crash_matches_an_uninterrupted_run(idx_dir, tmp_path, monkeypatch):
    from sparsetrain.methods.halo import HALOStrategy
    args = ["train", "--method", "halo", "--sparsity", "0.9", "--finetune-epochs", "1", "--data-dir", str(idx_dir),
            "--train-subset", "256", "--test-subset", "128", "--epochs", "2", "--no-progress"]
    # epoch 2 of 2 (2 steps each), before the prune
    ref, res = crash_and_resume(monkeypatch, tmp_path, args, HALOStrategy, crash_step=3)
    assert res["test_loss"] == ref["test_loss"] and res["scale_mean"] == ref["scale_mean"]
    assert res["accuracy_before_prune"] == ref["accuracy_before_prune"]


@pytest.mark.parametrize("squared", [False, True])
def test_fused_halo_penalty_matches_the_per_layer_ops(squared):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Linear(10, 10))
    halo = HALO(model, xi=0.3, psi=0.02, P=5.0, squared=squared, min_scale=0.2)
    with torch.no_grad():
        for lam in halo.scales:                 # signs, values below and above min_scale
            lam.copy_(torch.randn_like(lam))
    params = [*halo.weights, *halo.scales]
    fused = halo()
    g_fused = torch.autograd.grad(fused, params)
    ref = halo.reference()
    g_ref = torch.autograd.grad(ref, params)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prune", ["gradual", "final"])
def test_halo_finetune_lr_applies_under_plateau(prune, idx_dir, tmp_path):
    """--finetune-lr restarts the lr at the fine-tuning phase whichever --halo-prune reached the target."""
    out = tmp_path / "run"
    rc = main(["train", "--method", "halo", "--sparsity", "0.9", "--data-dir", str(idx_dir), "--out", str(out),
               "--train-subset", "256", "--test-subset", "128", "--epochs", "2", "--no-progress",
               "--schedule", "plateau", "--lr", "0.1", "--finetune-epochs", "1", "--finetune-lr", "0.25",
               "--halo-prune", prune])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["lr"] == pytest.approx(0.1 * 0.25)


@pytest.mark.parametrize("argv, flag", [
    (["--halo-prune", "final", "--prune-start", "0.1"], "--prune-start"),
    (["--halo-prune", "final", "--prune-every", "10"], "--prune-every"),
    (["--finetune-lr", "0.5"], "--finetune-lr"),
    (["--halo-variant", "lasso", "--scale-lr", "0.5"], "--scale-lr"),
    (["--halo-variant", "mcp", "--min-scale", "0.01"], "--min-scale"),
])
def test_halo_options_the_run_would_ignore_are_usage_errors(argv, flag, idx_dir, tmp_path, capsys):
    rc = main(["train", "--method", "halo", "--data-dir", str(idx_dir), "--out", str(tmp_path / "r"),
               "--epochs", "1", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"sparsetrain: error: {flag}:") and "allowed:" in err and "\n" not in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
