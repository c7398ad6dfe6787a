r"""Sparse optimizers: proximal SGD, Bregman iterations (LinBreg, AdaBreg), xRDA, gRDA.

All are :class:`torch.optim.Optimizer` subclasses (functional core + thin class, like
``torch/optim/sgd.py``): LR schedulers, closures, ``add_param_group`` and
``state_dict()``/``load_state_dict()`` work as usual; the state dict holds only tensors and
plain python values (regularizers as ``to_dict()``), so it loads with
``torch.load(..., weights_only=True)``. Parameters are updated in place. ``foreach=True``
(multi-tensor ``torch._foreach_*`` ops) is the default; ``foreach=False`` selects the
single-tensor loop; on CPU both run the same kernels and give bit-identical results.

Regularizers live in the param groups (key ``"reg"``; ``reg=`` is the default for groups
without one), so layers can carry different penalties -- see
:func:`sparsetrain.param_groups`. xRDA and gRDA keep their penalty in the group instead
(``"lam"`` resp. ``"c"``); a group whose ``reg`` is ``None`` is unpenalised there.

λ-controller interface (every optimizer)::

    opt.get_lam()            # [λ or None per param group]; None = unregularized group
    opt.set_lam(1e-3)        # set λ on every regularized group
    opt.set_lam([1e-3, None])  # per group
    opt.scale_lam(0.5)       # multiply every regularized group's λ (shared regularizers once)

λ is ``group["reg"].lam`` for ProxSGD / LinBreg / AdaBreg, ``group["lam"]`` for XRDA and
``group["c"]`` for GRDA; changing it there directly is equivalent.

Bregman state: LinBreg/AdaBreg keep v ∈ ∂J_δ(w), initialised lazily as v₀ = w/δ + ∂J(w) (so
training starts from w₀). When λ, δ or a group's regularizer changes, v is rebuilt from the
current w at the next ``step()`` (detected automatically); ``opt.reinit_subgradient()`` does
it explicitly for all groups.
"""
from .adabreg import AdaBreg, adabreg
from .grda import GRDA, grda
from .linbreg import LinBreg, linbreg
from .proxsgd import ProxSGD, proxsgd
from .xrda import XRDA, reweight_factor, xrda, xrda_schedule
from ._base import SparseOptimizer, BregmanOptimizer

__all__ = ["ProxSGD", "LinBreg", "AdaBreg", "XRDA", "GRDA", "SparseOptimizer", "BregmanOptimizer",
           "proxsgd", "linbreg", "adabreg", "xrda", "grda", "xrda_schedule", "reweight_factor"]
