r"""LinBreg: linearized Bregman iterations (Bungert, Roith, Tenbrinck, Burger; SPEC §2).

With J_δ(w) = J(w) + ‖w‖²/(2δ) and the subgradient state v ∈ ∂J_δ(w):

.. math::
    v_0 &= w_0/δ + ∂J(w_0) \qquad (\text{so } \mathrm{prox}_{δJ}(δ v_0) = w_0) \\
    m_k &= β m_{k-1} + (1-β)\,\mathrm{lr}_k\, g_k \qquad (\text{only if momentum } β > 0) \\
    v_k &= v_{k-1} - m_k \quad (\text{or } v_{k-1} - \mathrm{lr}_k g_k \text{ without momentum}) \\
    w_k &= \mathrm{prox}_{δJ}(δ v_k) = δ\,\mathrm{prox}_J(v_k)

With λ = 0 and δ = 1 this is exactly SGD. Weights that are zero stay zero until |v| exceeds
λ (inverse scale space: parameters are *added* during training).

Momentum convention: *dampened*. ``torch.optim.SGD(momentum=β)`` keeps ``b ← βb + g`` and steps
``lr·b`` (a step of ``lr/(1−β)·g`` once the buffer has settled); LinBreg's ``m`` already includes
``(1−β)``, so at the same lr its settled step is ``lr·g``: 10× smaller than SGD's at β = 0.9.
Use ``lr_linbreg = lr_sgd/(1−β)`` for the same effective step.

Implementation note: the momentum buffer is stored as m / c with a scalar ``momentum_scale``
c (the learning rate of the last step), so that at a constant learning rate the update is one
fused ``lerp_``; when the learning rate changes the buffer is rescaled first (same math).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import fused_cuda
from ._base import BregmanOptimizer, bregman_prox_, check_number

__all__ = ["LinBreg", "linbreg"]


class LinBreg(BregmanOptimizer):
    r"""Linearized Bregman iterations.

    Args:
        params: parameters or param groups (each group may carry its own ``reg``/``delta``).
        lr: learning rate.
        reg: default regularizer for groups without a ``"reg"`` key (None: no penalty).
        delta: δ of the elastic net J_δ = J + ‖·‖²/(2δ) (default 1).
        momentum: β of the dampened momentum m ← βm + (1−β)·lr·g (default 0; see the module
            docstring for how it compares with ``torch.optim.SGD``'s momentum).
        weight_decay: L2 term added to the gradient, g + wd·w, as ``torch.optim.SGD`` (default 0).
        maximize: ascend the objective instead (default False).
        foreach: multi-tensor path (default) or ``False`` for the single-tensor loop.
    """

    coupled_weight_decay = True

    def __init__(self, params, lr: float, reg=None, delta: float = 1.0, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: bool | None = None) -> None:
        check_number(lr, "lr")
        check_number(momentum, "momentum", high=1.0, high_strict=True)
        defaults = dict(lr=lr, reg=reg, delta=delta, momentum=momentum, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update_group(self, group: dict) -> None:
        """One LinBreg step on one param group."""
        self._check_key(group)  # λ / δ / reg changed -> v rebuilt from the current w
        lr, beta, delta, reg = float(group["lr"]), group["momentum"], float(group["delta"]), group.get("reg")
        params, grads, vs, bufs, scales, states = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._bregman_state(p, group)
            if beta > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_scale"] = lr
            params.append(p)
            grads.append(p.grad)
            vs.append(state["v"])
            if beta > 0:
                bufs.append(state["momentum_buffer"])
                scales.append(state["momentum_scale"])
                states.append(state)
        if not params:
            return
        fused, cache = None, self._fused_cache()
        if fused_cuda.applicable([params, grads, vs, bufs], group, fused_cuda.BREGMAN_KNOWN, cache,
                                 self._applied_keys):
            fused = fused_cuda.linbreg(params, grads, vs, bufs, scales, reg=reg, lr=lr, delta=delta,
                                       momentum=beta, cache=cache)
        scales = fused if fused is not None else linbreg(params, grads, vs, bufs, scales, reg=reg, lr=lr,
                                                         delta=delta, momentum=beta, foreach=self._use_foreach(group))
        for state, c in zip(states, scales):
            state["momentum_scale"] = c


def _dampened_momentum_(buf: Tensor, grad: Tensor, beta: float, lr: float, c: float) -> float:
    """buf holds m/c; returns the new c with buf = m_new/c_new, m_new = βm + (1−β)·lr·g."""
    if lr > 0 and c == lr:
        buf.lerp_(grad, 1 - beta)
        return lr
    if lr > 0:
        buf.mul_(beta * c / lr).add_(grad, alpha=1 - beta)
        return lr
    buf.mul_(beta)  # lr = 0: m ← βm, keep the scale
    return c


def linbreg(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], bufs: list[Tensor],
            scales: list[float], *, reg, lr: float, delta: float, momentum: float,
            foreach: bool = True) -> list[float]:
    """Functional LinBreg update (in place on ``params``, ``vs``, ``bufs``); returns the new
    momentum scales. See :class:`LinBreg`."""
    if momentum == 0:
        if foreach:
            torch._foreach_add_(vs, grads, alpha=-lr)
        else:
            for v, g in zip(vs, grads):
                v.add_(g, alpha=-lr)
    elif foreach and lr > 0 and all(c == lr for c in scales):
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        torch._foreach_add_(vs, bufs, alpha=-lr)
        scales = [lr] * len(bufs)
    else:
        scales = [_dampened_momentum_(b, g, momentum, lr, c) for b, g, c in zip(bufs, grads, scales)]
        for v, b, c in zip(vs, bufs, scales):
            v.add_(b, alpha=-c)
    bregman_prox_(params, vs, reg, delta, foreach)
    return scales
