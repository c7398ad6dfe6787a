r"""gRDA: generalized regularized dual averaging (Chao et al., "Directional pruning"; SPEC §4).

.. math::
    \mathrm{acc}_0 &= w_0, \qquad \mathrm{acc}_n = \mathrm{acc}_{n-1} - \mathrm{lr}_n g_n \\
    θ_n &= θ_{n-1} + c\,\mathrm{lr}_n^{1/2}\big[(n\,\mathrm{lr}_n)^μ - ((n-1)\,\mathrm{lr}_n)^μ\big]
        \qquad (θ_0 = 0) \\
    w_n &= S_{θ_n}(\mathrm{acc}_n)

At a constant learning rate the increments telescope to θ_n = c·lr^{μ+½}·n^μ; accumulating
increments keeps learning-rate schedules valid. The state keeps θ_n/c (``threshold_unit``) and
``threshold`` = c·θ_n/c, so that a λ controller that changes c rescales the whole threshold at
once (as λ scales xRDA's accumulated T); at a constant c the two are the same. Groups with ``penalize=False`` (or built by
:func:`sparsetrain.param_groups` with ``reg=None``: biases, norms) take plain SGD steps.
The penalty strength seen by ``get_lam``/``set_lam`` is ``c``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..regularizers import is_null
from ._base import SparseOptimizer, _softshrink, check_number

__all__ = ["GRDA", "grda"]


class GRDA(SparseOptimizer):
    r"""gRDA with soft thresholding of the accumulated gradients.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        c: threshold scale (typical (0, 5e-3]).
        mu: threshold growth exponent (typical [0.501, 0.7]).
        weight_decay: L2 term added to the gradient, g + wd·w (default 0).
        maximize: ascend the objective instead (default False).
        foreach: multi-tensor path (default) or ``False`` for the single-tensor loop.

    Momentum: none (gRDA accumulates raw gradients; torch.optim.SGD with momentum=0 is its
    unregularized limit).
    """

    lam_key = "c"
    coupled_weight_decay = True

    def __init__(self, params, lr: float, c: float, mu: float, weight_decay: float = 0.0, *,
                 maximize: bool = False, foreach: bool | None = None) -> None:
        check_number(lr, "lr")
        check_number(c, "c")
        check_number(mu, "mu", strict=True)
        super().__init__(params, dict(lr=lr, c=c, mu=mu, weight_decay=weight_decay, maximize=maximize,
                                      penalize=True, foreach=foreach))

    def add_param_group(self, param_group: dict) -> None:
        if "reg" in param_group:  # a group from param_groups(): reg=None means unpenalised
            param_group = dict(param_group)
            param_group.setdefault("penalize", not is_null(param_group.pop("reg")))
        super().add_param_group(param_group)

    @torch.no_grad()
    def _update_group(self, group: dict) -> None:
        """One gRDA step on one param group."""
        lr, c, mu = float(group["lr"]), float(group["c"]), float(group["mu"])
        params, grads, accs, thresholds = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            if not group["penalize"]:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["threshold_unit"] = 0.0
                state["acc"] = p.detach().clone(memory_format=torch.preserve_format)
            n = state["step"] = state["step"] + 1
            state["threshold_unit"] += lr ** 0.5 * ((n * lr) ** mu - ((n - 1) * lr) ** mu)
            state["threshold"] = c * state["threshold_unit"]
            accs.append(state["acc"])
            thresholds.append(state["threshold"])
        if params:
            grda(params, grads, accs, thresholds, lr=lr, foreach=self._use_foreach(group))


def grda(params: list[Tensor], grads: list[Tensor], accs: list[Tensor], thresholds: list[float],
         *, lr: float, foreach: bool = True) -> None:
    """Functional gRDA update: acc ← acc − lr·g; w ← S_θ(acc). With ``accs`` empty (an
    unpenalised group) this is a plain SGD step on ``params``."""
    if not accs:
        if foreach:
            torch._foreach_add_(params, grads, alpha=-lr)
        else:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr)
        return
    if foreach:
        torch._foreach_add_(accs, grads, alpha=-lr)
    else:
        for a, g in zip(accs, grads):
            a.add_(g, alpha=-lr)
    for p, a, t in zip(params, accs, thresholds):
        _softshrink(a, t, out=p)
