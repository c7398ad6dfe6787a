"""Penalties added to the loss: HALO, the hierarchical adaptive lasso (Seto, Wells, Zhang), and
its baselines from the same paper (SPEC §5).

HALO owns one trainable scale ``λ_j`` per penalised weight (init 1) and returns

    ξ Σ_j |w_j| / λ_j²  +  ψ · |Σ_j |λ_j| − P|          (``squared=True``: ψ (Σ_j |λ_j| − P)²)

to be added to the loss; its scales are trained jointly with the weights (put them in their own
param group: ``HALO.parameters()``). Minimising over ``λ_j`` (P = 0) gives
``λ_j* = (2ξ|w_j|/ψ)^{1/3}`` and the profile penalty ``3·2^{-2/3} ξ^{1/3} ψ^{2/3} |w_j|^{1/3}``:
small weights get small scales and therefore a strong ℓ1 pull, large weights a weak one.
``1/λ²`` is guarded by clamping ``|λ|`` to at least ``min_scale``.

Variants (``variant=``):
  ``halo``    one scale per weight (the method);
  ``shared``  one trainable scale shared by all weights: ``ξ Σ|w|/λ² + ψ|n|λ| − P|`` (n weights,
              i.e. HALO with all ``λ_j`` tied);
  ``shared-sq`` the authors' shared baseline: one trainable scale with the prior ``ψλ²``,
              ``ξ Σ|w|/λ² + ψλ²``; minimising over λ gives ``λ* = (ξΣ|w|/ψ)^{1/4}`` and the
              profile penalty ``2√(ξψ Σ|w|)``;
  ``lasso``   scales frozen at 1: plain ``ξ Σ|w|``;
  ``mcp``     the minimax concave penalty with ``λ = ξ`` and concavity ``γ = ψ`` (as in the
              authors' code): ``ξ|w| − w²/(2ψ)`` for ``|w| ≤ ψξ``, ``ψξ²/2`` beyond. No scales.
**Penalised set** (``penalize=``, for a model): ``"weights"`` (default) the weights of every
Linear and Conv layer, the tensors sparsity is measured over; ``"conv"`` the weights *and biases*
of the Conv layers and no Linear layer, as the authors' CIFAR code penalises.
HALO produces no exact zeros; the method (``sparsetrain train --method halo``) ends with a
global magnitude prune of the penalised weights to the requested sparsity.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .params import prunable_weights, sparse_layers

VARIANTS = ("halo", "lasso", "shared", "shared-sq", "mcp")
PENALIZED = ("weights", "conv")

__all__ = ["HALO", "VARIANTS", "PENALIZED", "penalized_params", "halo_optimal_scale", "halo_profile_penalty", "mcp_penalty"]


def halo_optimal_scale(w, xi: float, psi: float):
    """``λ* = (2ξ|w|/ψ)^{1/3}``, the scale minimising ``ξ|w|/λ² + ψ|λ|``."""
    return (2.0 * xi * abs(w) / psi) ** (1.0 / 3.0) if not torch.is_tensor(w) else \
        (2.0 * xi * w.abs() / psi) ** (1.0 / 3.0)


def halo_profile_penalty(w, xi: float, psi: float):
    """``min_λ ξ|w|/λ² + ψ|λ| = 3·2^{-2/3} ξ^{1/3} ψ^{2/3} |w|^{1/3}``."""
    c = 3.0 * 2.0 ** (-2.0 / 3.0) * xi ** (1.0 / 3.0) * psi ** (2.0 / 3.0)
    return c * (w.abs() if torch.is_tensor(w) else abs(w)) ** (1.0 / 3.0)


def mcp_penalty(w: torch.Tensor, lam: float, gamma: float) -> torch.Tensor:
    """Σ MCP(w): ``λ|w| − w²/(2γ)`` for ``|w| ≤ γλ``, ``γλ²/2`` beyond."""
    a = w.abs()
    inner = lam * a - a * a / (2.0 * gamma)
    return torch.where(a <= gamma * lam, inner, torch.full_like(a, gamma * lam * lam / 2.0)).sum()


def penalized_params(model: nn.Module, penalize: str = "weights") -> list[tuple[str, nn.Parameter]]:
    """(name, tensor) of what HALO penalises in ``model`` (module docstring: penalised set)."""
    if penalize == "weights":
        return prunable_weights(model)
    if penalize != "conv":
        raise ValueError(f"unknown HALO penalised set {penalize!r}; allowed: {', '.join(PENALIZED)}")
    out = []
    for name, layer in sparse_layers(model):
        if isinstance(layer, nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        out += [(prefix + p_name, p) for p_name, p in (("weight", layer.weight), ("bias", layer.bias))
                if p is not None]
    if not out:
        raise ValueError("HALO penalize='conv': the model has no Conv layer; allowed: penalize='weights'")
    return out


class HALO(nn.Module):
    """The HALO penalty over ``model_or_params`` (a model: its Linear/Conv weights, or what
    ``penalize`` names; or an iterable of tensors / ``(name, tensor)`` pairs). Call it
    (``halo()``) for the penalty tensor."""

    def __init__(self, model_or_params: nn.Module | Iterable, xi: float, psi: float, P: float = 0.0,
                 squared: bool = False, variant: str = "halo", min_scale: float = 1e-3, init: float = 1.0,
                 penalize: str = "weights"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown HALO variant {variant!r}; allowed: {', '.join(VARIANTS)}")
        if not (xi >= 0 and psi > 0 and min_scale > 0):
            raise ValueError(f"HALO needs xi >= 0, psi > 0, min_scale > 0 (got {xi}, {psi}, {min_scale})")
        if isinstance(model_or_params, nn.Module):
            named = penalized_params(model_or_params, penalize)
        else:
            items = list(model_or_params)
            named = [it if isinstance(it, tuple) else (f"param{i}", it) for i, it in enumerate(items)]
        self.names = [n for n, _ in named]
        self._weights = [w for _, w in named]          # not registered: the model owns them
        self.xi, self.psi, self.P, self.squared = float(xi), float(psi), float(P), bool(squared)
        self.variant, self.min_scale = variant, float(min_scale)
        self.numel = sum(w.numel() for w in self._weights)
        if variant == "halo":
            self.scales = nn.ParameterList(
                nn.Parameter(torch.full_like(w.detach(), init)) for w in self._weights)
        elif variant in ("shared", "shared-sq"):
            w0 = self._weights[0]
            self.scales = nn.ParameterList([nn.Parameter(torch.full((), init, dtype=w0.dtype, device=w0.device))])
        else:                                          # lasso (frozen at 1) and mcp: nothing to train
            self.scales = nn.ParameterList()

    @property
    def weights(self) -> list[torch.Tensor]:
        return list(self._weights)

    def _inv_sq(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.abs().clamp_min(self.min_scale).pow(-2)

    def _budget(self, total: torch.Tensor) -> torch.Tensor:
        r = total - self.P
        return self.psi * (r * r if self.squared else r.abs())

    def forward(self) -> torch.Tensor:
        ws = self._weights
        if self.variant == "lasso":
            return self.xi * sum(w.abs().sum() for w in ws)
        if self.variant == "mcp":
            return sum(mcp_penalty(w, self.xi, self.psi) for w in ws)
        if self.variant == "shared-sq":
            lam = self.scales[0]
            return self.xi * self._inv_sq(lam) * sum(w.abs().sum() for w in ws) + self.psi * lam * lam
        if self.variant == "shared":
            lam = self.scales[0]
            data = self.xi * self._inv_sq(lam) * sum(w.abs().sum() for w in ws)
            return data + self._budget(self.numel * lam.abs())
        return _HALOPenalty.apply(self, *ws, *self.scales)

    def reference(self) -> torch.Tensor:
        """The ``halo`` variant's penalty as plain autograd ops, one set per layer (what the fused
        :class:`_HALOPenalty` computes with multi-tensor kernels; kept for the tests)."""
        data = sum((w.abs() * self._inv_sq(lam)).sum() for w, lam in zip(self._weights, self.scales))
        total = sum(lam.abs().sum() for lam in self.scales)
        return self.xi * data + self._budget(total)

    @torch.no_grad()
    def scale_stats(self) -> dict[str, float]:
        """Mean / min / max |λ| (plain numbers for logs)."""
        if len(self.scales) == 0:
            return {}
        flat = torch.cat([lam.detach().abs().flatten() for lam in self.scales])
        return {"scale_mean": flat.mean().item(), "scale_min": flat.min().item(), "scale_max": flat.max().item()}

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, xi={self.xi:g}, psi={self.psi:g}, P={self.P:g}, "
                f"squared={self.squared}, weights={self.numel}")


class _HALOPenalty(torch.autograd.Function):
    r"""ξ Σ |w|·q(λ) + ψ·B(Σ|λ| − P) with q(λ) = max(|λ|, m)⁻² and B(r) = |r| (or r²), over all
    layers at once with ``torch._foreach_*`` kernels (a handful of launches instead of ~8 per layer
    forward and backward; HALO's penalty otherwise dominated a ResNet step on a GPU). Gradients:

        ∂/∂w = ξ·sign(w)·q(λ),     ∂/∂λ = −2ξ|w|·sign(λ)·|λ|⁻³·[|λ| > m] + ψ·B'(r)·sign(λ).
    """

    @staticmethod
    def forward(ctx, halo: "HALO", *tensors):
        n = len(tensors) // 2
        ws, lams = list(tensors[:n]), list(tensors[n:])
        abs_w, abs_l = torch._foreach_abs(ws), torch._foreach_abs(lams)
        clamped = torch._foreach_clamp_min(abs_l, halo.min_scale)
        q = torch._foreach_pow(clamped, -2.0)
        data = torch.stack(torch._foreach_norm(torch._foreach_mul(abs_w, q), 1)).sum()
        r = torch.stack(torch._foreach_norm(lams, 1)).sum() - halo.P
        ctx.halo, ctx.n = halo, n
        ctx.save_for_backward(r, *ws, *lams)
        return halo.xi * data + halo.psi * (r * r if halo.squared else r.abs())

    @staticmethod
    def backward(ctx, g):
        halo, n = ctx.halo, ctx.n
        r, *saved = ctx.saved_tensors
        ws, lams = saved[:n], saved[n:]
        abs_l = torch._foreach_abs(lams)
        clamped = torch._foreach_clamp_min(abs_l, halo.min_scale)
        q = torch._foreach_pow(clamped, -2.0)
        sign_l = torch._foreach_sign(lams)
        grad_w = torch._foreach_mul(torch._foreach_sign(ws), q)
        torch._foreach_mul_(grad_w, g * halo.xi)
        # −2ξ|w|·|λ|⁻³ where |λ| > m (the clamp passes no gradient below m), then ψ·B'(r)
        active = torch._foreach_clamp_min(torch._foreach_sign(torch._foreach_sub(abs_l, halo.min_scale)), 0.0)
        grad_l = torch._foreach_mul(torch._foreach_abs(ws), torch._foreach_pow(clamped, -3.0))
        torch._foreach_mul_(grad_l, active)
        torch._foreach_mul_(grad_l, -2.0 * halo.xi)
        budget = halo.psi * (2 * r if halo.squared else torch.sign(r))
        torch._foreach_add_(grad_l, budget)
        torch._foreach_mul_(grad_l, sign_l)
        torch._foreach_mul_(grad_l, g)
        return (None, *grad_w, *grad_l)


def profile_constant(xi: float, psi: float) -> float:
    """The constant ``3·2^{-2/3} ξ^{1/3} ψ^{2/3}`` of the profile penalty."""
    return 3.0 * 2.0 ** (-2.0 / 3.0) * math.pow(xi, 1 / 3) * math.pow(psi, 2 / 3)
