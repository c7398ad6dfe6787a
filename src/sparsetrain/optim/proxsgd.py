r"""Proximal SGD (the "proximal SGD with plain ℓ1" baseline of SPEC §6, any regularizer).

.. math::
    d_k &= g_k + \mathrm{wd}\cdot w_{k-1} \\
    b_k &= μ b_{k-1} + d_k \qquad (b_0 = 0;\ \text{heavy ball as in torch.optim.SGD}) \\
    w_k &= \mathrm{prox}_{\mathrm{lr}\,J}(w_{k-1} - \mathrm{lr}\, b_k)

Implementation note: the momentum buffer stores the dampened average m = (1−μ)·b
(``m ← lerp(m, d, 1−μ)``, one fused op) and the step is ``lr/(1−μ)·m`` -- the same iterates as
torch's SGD momentum, one memory pass cheaper.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..regularizers import is_null
from . import fused_cuda
from ._base import SparseOptimizer, check_number

__all__ = ["ProxSGD", "proxsgd"]


class ProxSGD(SparseOptimizer):
    r"""Proximal stochastic gradient descent with heavy-ball momentum and weight decay.

    Args:
        params: parameters or param groups (each group may carry its own ``reg``).
        lr: learning rate (also the prox step: w ← prox_{lr·J}(·)).
        reg: default regularizer for groups without a ``"reg"`` key (None: plain SGD).
        momentum: heavy-ball momentum μ (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        maximize: ascend the objective instead (default False).
        foreach: multi-tensor path (default) or ``False`` for the single-tensor loop.

    Momentum convention: torch's (``torch.optim.SGD``, dampening 0): the same iterates as SGD
    before the prox.
    """

    def __init__(self, params, lr: float, reg=None, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, maximize: bool = False, foreach: bool | None = None) -> None:
        check_number(lr, "lr")
        check_number(momentum, "momentum", high=1.0, high_strict=True)
        defaults = dict(lr=lr, reg=reg, momentum=momentum, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update_group(self, group: dict) -> None:
        """One proximal SGD step on one param group."""
        mu = group["momentum"]
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            if mu > 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
        cache = self._fused_cache()
        if params and fused_cuda.applicable([params, grads, bufs], group, fused_cuda.PROXSGD_KNOWN, cache,
                                            self._applied_keys):
            fused_cuda.proxsgd(params, grads, bufs, reg=group.get("reg"), lr=float(group["lr"]), momentum=mu,
                               weight_decay=group["weight_decay"], cache=cache)
        elif params:
            proxsgd(params, grads, bufs, reg=group.get("reg"), lr=float(group["lr"]), momentum=mu,
                    weight_decay=group["weight_decay"], foreach=self._use_foreach(group))


def proxsgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, reg, lr: float,
            momentum: float, weight_decay: float, foreach: bool = True) -> None:
    """Functional proximal SGD update (in place on ``params`` and ``bufs``)."""
    step = lr / (1 - momentum) if momentum > 0 else lr
    if foreach:
        if weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum > 0:
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-step)
        if not is_null(reg):
            reg.prox_foreach_(params, lr)
        return
    for i, (p, g) in enumerate(zip(params, grads)):
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        if momentum > 0:
            g = bufs[i].lerp_(g, 1 - momentum)
        p.add_(g, alpha=-step)
        if not is_null(reg):
            reg.prox_(p, lr)
