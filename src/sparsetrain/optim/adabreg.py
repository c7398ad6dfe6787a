r"""AdaBreg: Bregman iterations with Adam moments (Bungert et al.; SPEC §2).

.. math::
    v_0 &= w_0/δ + ∂J(w_0) \\
    m_k &= β_1 m_{k-1} + (1-β_1) g_k, \qquad u_k = β_2 u_{k-1} + (1-β_2) g_k^2 \\
    \hat m_k &= m_k/(1-β_1^k), \qquad \hat u_k = u_k/(1-β_2^k) \\
    v_k &= v_{k-1} - \mathrm{lr}\,\hat m_k/(\sqrt{\hat u_k} + ε) \\
    w_k &= \mathrm{prox}_{δJ}(δ v_k) = δ\,\mathrm{prox}_J(v_k)

With λ = 0 and δ = 1 this is Adam, operation for operation (the same formula as
``torch.optim.Adam``, applied to v instead of w).

Weight decay is *decoupled*, as in ``torch.optim.AdamW``: before the step
``v ← v − lr·wd·w/δ``, which shrinks every nonzero weight by exactly the factor (1 − lr·wd)
(for ℓ1: ``w = δ·S_λ(v)``) and leaves zero weights alone; with λ = 0 and δ = 1 AdaBreg with
weight decay is AdamW. Momentum convention: Adam's first moment, an exponential average
``m ← β₁m + (1−β₁)g`` (the same as torch's Adam).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import fused_cuda
from ._base import BregmanOptimizer, bregman_prox_, check_number

__all__ = ["AdaBreg", "adabreg"]


class AdaBreg(BregmanOptimizer):
    r"""Adam-preconditioned Bregman iterations.

    Args:
        params: parameters or param groups (each group may carry its own ``reg``/``delta``).
        lr: learning rate.
        reg: default regularizer for groups without a ``"reg"`` key (None: no penalty).
        delta: δ of the elastic net J_δ = J + ‖·‖²/(2δ) (default 1).
        betas: (β₁, β₂) of the moment averages (default (0.9, 0.999)).
        eps: ε added to √û (default 1e-8).
        weight_decay: decoupled weight decay, as AdamW (default 0; see the module docstring).
        maximize: ascend the objective instead (default False).
        foreach: multi-tensor path (default) or ``False`` for the single-tensor loop.
    """

    def __init__(self, params, lr: float, reg=None, delta: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, maximize: bool = False, foreach: bool | None = None) -> None:
        check_number(lr, "lr")
        check_number(betas[0], "betas[0]", high=1.0, high_strict=True)
        check_number(betas[1], "betas[1]", high=1.0, high_strict=True)
        check_number(eps, "eps")
        defaults = dict(lr=lr, reg=reg, delta=delta, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update_group(self, group: dict) -> None:
        """One AdaBreg step on one param group."""
        self._check_key(group)
        delta, reg = float(group["delta"]), group.get("reg")
        params, grads, vs, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._bregman_state(p, group)
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            vs.append(state["v"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        wd = float(group.get("weight_decay", 0.0))
        if wd:                         # decoupled: v ← v − lr·wd·w/δ (AdamW's w ← (1 − lr·wd)·w)
            torch._foreach_add_(vs, params, alpha=-float(group["lr"]) * wd / delta)
        kw = dict(reg=reg, lr=float(group["lr"]), delta=delta, beta1=group["betas"][0], beta2=group["betas"][1],
                  eps=group["eps"])
        streams, cache = [params, grads, vs, exp_avgs, exp_avg_sqs], self._fused_cache()
        if not (fused_cuda.applicable(streams, group, fused_cuda.BREGMAN_KNOWN, cache, self._applied_keys)
                and fused_cuda.adabreg(params, grads, vs, exp_avgs, exp_avg_sqs, steps, **kw, cache=cache)):
            adabreg(params, grads, vs, exp_avgs, exp_avg_sqs, steps, **kw, foreach=self._use_foreach(group))


def adabreg(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], steps: list[int], *, reg, lr: float, delta: float,
            beta1: float, beta2: float, eps: float, foreach: bool = True) -> None:
    """Functional AdaBreg update (in place); ``steps`` are the already-incremented step counts."""
    step_sizes = [-lr / (1 - beta1 ** k) for k in steps]
    bias2_sqrt = [(1 - beta2 ** k) ** 0.5 for k in steps]
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(vs, exp_avgs, denom, step_sizes)
        del denom
    else:
        for i, g in enumerate(grads):
            exp_avgs[i].lerp_(g, 1 - beta1)
            exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sqs[i].sqrt() / bias2_sqrt[i]).add_(eps)
            vs[i].addcdiv_(exp_avgs[i], denom, value=step_sizes[i])
    bregman_prox_(params, vs, reg, delta, foreach)
