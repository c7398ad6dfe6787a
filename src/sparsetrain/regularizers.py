r"""Sparsity-promoting regularizers J and their proximal maps (SPEC §1).

Every regularizer knows

* ``value(w)``       -- :math:`J(w)` as a 0-dim tensor,
* ``prox(x, t)``     -- :math:`\operatorname{prox}_{tJ}(x) = \arg\min_w \tfrac12\|w-x\|^2 + t J(w)`,
* ``prox_(x, t, out=None)`` -- the same, written into ``out`` (default: ``x`` itself); this is
  the allocation-free path the optimizers use in their hot loop,
* ``subgradient(w)`` -- one element of :math:`\partial J(w)` (0 where J is not differentiable
  and 0 is a subgradient: zero entries for L1, zero groups for group lasso),
* ``lam``            -- the penalty strength, a plain attribute a λ-controller may change,
* ``to_dict()``      -- plain python types only; :func:`regularizer_from_dict` rebuilds it.

=================  ==============================  =============================================
regularizer        J(w)                            prox_{tJ}(x)
=================  ==============================  =============================================
``L1(λ)``          λ‖w‖₁                           S_{tλ}(x) = sign(x)·max(|x| − tλ, 0)
``GroupL12(λ)``    λ Σ_g √n_g ‖w_g‖₂               x_g · max(1 − tλ√n_g / ‖x_g‖₂, 0)
``Nuclear(λ)``     λ Σ σ_i(W)                       U diag(max(σ − tλ, 0)) Vᵀ
``SparseGroup``    λ₁‖w‖₁ + λ₂ Σ_g √n_g ‖w_g‖₂     group prox (tλ₂) of S_{tλ₁}(x)
``Null()``/None    0                               x
=================  ==============================  =============================================

Groups (``groups=``): ``"rows"`` -- one output neuron ``w[o]`` of a Linear weight;
``"kernels"`` -- one ``k×k`` kernel ``w[o, i]`` of a Conv weight; ``"filters"`` -- a whole
output channel ``w[o]`` of a Conv weight. Fallbacks for tensors whose shape does not fit:

* a 2-D tensor has no kernels or filters: every grouping uses its rows;
* on a Conv weight (≥ 3-D) ``"rows"`` means the rows of ``w.reshape(out, -1)``, i.e. filters;
* a 0-D / 1-D tensor (bias, norm scale) is a single group.

``Nuclear`` acts on ``w.reshape(out, -1)`` (a 1-D tensor is treated as one row).
All regularizers are positively 1-homogeneous, so ``prox_{δJ}(δ v) = δ · prox_J(v)``; the
Bregman optimizers rely on this. Nothing here produces NaN for all-zero tensors, zero groups
or λ = 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import UsageError, choice

__all__ = ["Regularizer", "Null", "L1", "GroupL12", "Nuclear", "SparseGroup",
           "make_regularizer", "regularizer_from_dict", "is_null", "GROUPINGS", "NAMES"]

GROUPINGS = ("rows", "kernels", "filters")
NAMES = ("l1", "group", "sparse-group", "nuclear", "none")

_softshrink = torch._C._nn.softshrink  # has an ``out=`` overload; in-place when out is x


def _check_lam(value, field: str = "lam") -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{field}: must be a number >= 0, got {value!r}") from None
    if not (lam >= 0 and math.isfinite(lam)):
        raise UsageError(f"{field}: must be a finite number >= 0, got {value!r}")
    return lam


def group_dims(ndim: int, groups: str) -> tuple[int, ...] | None:
    """Dimensions reduced to form one group (``None``: the whole tensor is one group)."""
    if ndim <= 1:
        return None
    if groups == "kernels" and ndim >= 3:
        return tuple(range(2, ndim))
    return tuple(range(1, ndim))


def group_size(shape, groups: str) -> int:
    """n_g, the number of elements of one group of a tensor of ``shape``."""
    dims = group_dims(len(shape), groups)
    return math.prod(shape) if dims is None else math.prod(shape[d] for d in dims)


def _as_matrix(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)


class Regularizer:
    """Base class. Subclasses implement ``value``, ``prox_``, ``subgradient``, ``to_dict``."""

    name = "none"

    def __init__(self, lam: float = 0.0) -> None:
        self.lam = lam

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value) -> None:
        self._lam = _check_lam(value)

    def value(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def subgradient(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        """prox_{tJ}(x) written into ``out`` (``x`` when omitted); returns it."""
        raise NotImplementedError

    def prox(self, x: Tensor, t: float) -> Tensor:
        """prox_{tJ}(x) = argmin_w ½‖w − x‖² + t·J(w), as a new tensor."""
        with torch.no_grad():
            return self.prox_(x.detach(), t, out=torch.empty_like(x))

    def prox_foreach_(self, xs: list[Tensor], t: float, outs: list[Tensor] | None = None) -> None:
        """``prox_`` over a list of tensors (the optimizers' multi-tensor path)."""
        for i, x in enumerate(xs):
            self.prox_(x, t, out=None if outs is None else outs[i])

    def activation(self, v: Tensor) -> Tensor | None:
        """Per-entry factor f such that the entry is nonzero in ``prox_{fJ}(v)`` iff f < this
        score (prox_J thresholds linearly in λ). ``None`` where no such per-entry score exists."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "lam": self.lam}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"


class Null(Regularizer):
    """J ≡ 0: prox is the identity. ``None`` means the same everywhere in the library."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(0.0)

    def value(self, w: Tensor) -> Tensor:
        return w.new_zeros(())

    def subgradient(self, w: Tensor) -> Tensor:
        return torch.zeros_like(w)

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        if out is None or out is x:
            return x
        return out.copy_(x)

    def to_dict(self) -> dict:
        return {"name": self.name}


class L1(Regularizer):
    r"""J(w) = λ‖w‖₁; prox_{tJ}(x) = S_{tλ}(x) (soft thresholding, one fused kernel)."""

    name = "l1"

    def value(self, w: Tensor) -> Tensor:
        return self.lam * w.abs().sum()

    def subgradient(self, w: Tensor) -> Tensor:
        return torch.sign(w).mul_(self.lam)

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        return _softshrink(x, t * self.lam, out=x if out is None else out)

    def activation(self, v: Tensor) -> Tensor:
        return v.abs().div_(max(self.lam, torch.finfo(v.dtype).tiny))


class GroupL12(Regularizer):
    r"""J(w) = λ Σ_g √n_g ‖w_g‖₂ (group lasso);
    prox_{tJ}(x)_g = x_g · max(1 − tλ√n_g / ‖x_g‖₂, 0); subgradient λ√n_g w_g/‖w_g‖ (0 on a
    zero group). See the module docstring for the groupings and their fallbacks."""

    name = "group"

    def __init__(self, lam: float, groups: str = "rows") -> None:
        super().__init__(lam)
        self.groups = choice(groups, "groups", GROUPINGS)

    def _norms(self, w: Tensor) -> tuple[Tensor, float]:
        dims = group_dims(w.dim(), self.groups)
        norms = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        return norms, math.sqrt(group_size(w.shape, self.groups))

    def value(self, w: Tensor) -> Tensor:
        norms, root_n = self._norms(w)
        return self.lam * root_n * norms.sum()

    def subgradient(self, w: Tensor) -> Tensor:
        norms, root_n = self._norms(w)
        # zero group -> 0 (λ√n / tiny overflowed to inf for λ√n > ~4, and 0·inf gave NaN)
        scale = torch.where(norms > 0, (self.lam * root_n) / norms, torch.zeros_like(norms))
        return w * scale

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        out = x if out is None else out
        norms, root_n = self._norms(x)
        tau = t * self.lam * root_n
        if tau == 0:
            return out if out is x else out.copy_(x)
        # scale = max(1 - tau/||x_g||, 0); a zero group gets 0 (never 0/0)
        scale = norms.clamp_min_(torch.finfo(norms.dtype).tiny).reciprocal_().mul_(-tau).add_(1).clamp_min_(0)
        return torch.mul(x, scale, out=out)

    def activation(self, v: Tensor) -> Tensor:
        norms, root_n = self._norms(v)
        return (norms / max(self.lam * root_n, torch.finfo(v.dtype).tiny)).expand_as(v)

    def to_dict(self) -> dict:
        return {"name": self.name, "lam": self.lam, "groups": self.groups}


class Nuclear(Regularizer):
    r"""J(W) = λ Σ σ_i(W) on W = w.reshape(out, −1); prox soft-thresholds the singular values,
    subgradient λ U Vᵀ over the nonzero singular values."""

    name = "nuclear"

    def value(self, w: Tensor) -> Tensor:
        return self.lam * torch.linalg.svdvals(_as_matrix(w)).sum()

    def subgradient(self, w: Tensor) -> Tensor:
        m = _as_matrix(w)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        tol = (s.max() if s.numel() else s.new_zeros(())) * max(m.shape) * torch.finfo(s.dtype).eps
        keep = (s > tol).to(s.dtype)
        return ((u * keep) @ vh).mul_(self.lam).reshape(w.shape)

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        out = x if out is None else out
        if t * self.lam == 0:
            return out if out is x else out.copy_(x)
        u, s, vh = torch.linalg.svd(_as_matrix(x), full_matrices=False)
        s = (s - t * self.lam).clamp_min_(0)
        return out.copy_(((u * s) @ vh).reshape(x.shape))


class SparseGroup(Regularizer):
    r"""Sparse-group lasso J(w) = λ₁‖w‖₁ + λ₂ Σ_g √n_g ‖w_g‖₂.

    prox_{tJ}(x) = prox_{tλ₂·group}(S_{tλ₁}(x)) (exact for this composite; both thresholds are
    linear in t and λ). ``lam`` is the total strength λ₁ + λ₂: setting it rescales both parts
    and keeps their ratio (from 0, the new value is split equally). ``l1_lam`` / ``group_lam``
    can be set individually.
    """

    name = "sparse-group"

    def __init__(self, l1_lam: float, group_lam: float, groups: str = "rows") -> None:
        self._l1 = L1(_check_lam(l1_lam, "l1_lam"))
        self._group = GroupL12(_check_lam(group_lam, "group_lam"), groups)

    @property
    def l1_lam(self) -> float:
        return self._l1.lam

    @l1_lam.setter
    def l1_lam(self, value) -> None:
        self._l1.lam = _check_lam(value, "l1_lam")

    @property
    def group_lam(self) -> float:
        return self._group.lam

    @group_lam.setter
    def group_lam(self, value) -> None:
        self._group.lam = _check_lam(value, "group_lam")

    @property
    def groups(self) -> str:
        return self._group.groups

    @property
    def lam(self) -> float:
        return self.l1_lam + self.group_lam

    @lam.setter
    def lam(self, value) -> None:
        new, old = _check_lam(value), self.l1_lam + self.group_lam
        if old > 0:
            self._l1.lam, self._group.lam = self.l1_lam * new / old, self.group_lam * new / old
        else:
            self._l1.lam = self._group.lam = new / 2

    def value(self, w: Tensor) -> Tensor:
        return self._l1.value(w) + self._group.value(w)

    def subgradient(self, w: Tensor) -> Tensor:
        return self._l1.subgradient(w).add_(self._group.subgradient(w))

    def prox_(self, x: Tensor, t: float, out: Tensor | None = None) -> Tensor:
        out = self._l1.prox_(x, t, out=out)
        return self._group.prox_(out, t)

    def to_dict(self) -> dict:
        return {"name": self.name, "l1_lam": self.l1_lam, "group_lam": self.group_lam,
                "groups": self.groups}


def is_null(reg) -> bool:
    """True for ``None`` and :class:`Null` (no penalty)."""
    return reg is None or isinstance(reg, Null)


def regularizer_from_dict(d: dict | None) -> Regularizer | None:
    """Inverse of ``to_dict()``; ``None`` gives ``None``."""
    if d is None:
        return None
    name = choice(d.get("name"), "regularizer name", NAMES)
    if name == "none":
        return Null()
    if name == "l1":
        return L1(d["lam"])
    if name == "group":
        return GroupL12(d["lam"], d.get("groups", "rows"))
    if name == "nuclear":
        return Nuclear(d["lam"])
    return SparseGroup(d["l1_lam"], d["group_lam"], d.get("groups", "rows"))


def make_regularizer(name: str, lam: float, groups: str | None = None) -> Regularizer:
    """Build a regularizer from CLI values. ``name`` in l1, group, sparse-group, nuclear, none;
    ``lam`` >= 0; ``groups`` (group / sparse-group only) in rows, kernels, filters, default rows.
    ``sparse-group`` splits ``lam`` equally between its L1 and group parts."""
    name = choice(name, "--reg", NAMES)
    lam = _check_lam(lam, "--lam")
    groups = "rows" if groups is None else choice(groups, "--groups", GROUPINGS)
    if name == "none":
        return Null()
    if name == "l1":
        return L1(lam)
    if name == "group":
        return GroupL12(lam, groups)
    if name == "nuclear":
        return Nuclear(lam)
    return SparseGroup(lam / 2, lam / 2, groups)
