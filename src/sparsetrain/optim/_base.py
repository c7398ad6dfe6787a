"""Shared machinery of the sparse optimizers: regularizers in param groups, a state dict that
loads with ``torch.load(..., weights_only=True)``, and the λ-controller interface."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import UsageError, check
from ..regularizers import Null, Regularizer, is_null, regularizer_from_dict

_CALLABLE = "<callable: not serialised, kept from the live optimizer on load>"
_softshrink = torch._C._nn.softshrink


def check_number(value, field: str, low: float = 0.0, *, strict: bool = False,
                 high: float | None = None, high_strict: bool = False) -> float:
    """``float(value)`` checked against [low, high] (open ends with ``strict``/``high_strict``),
    or a UsageError naming ``field``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{field}: must be a number, got {value!r}") from None
    ok = x > low if strict else x >= low
    if high is not None:
        ok = ok and (x < high if high_strict else x <= high)
    if not ok:  # also catches NaN
        rng = f"{'>' if strict else '>='} {low}"
        if high is not None:
            rng += f" and {'<' if high_strict else '<='} {high}"
        raise UsageError(f"{field}: must be {rng}, got {value!r}")
    return x


class SparseOptimizer(Optimizer):
    """Base of every sparsetrain optimizer.

    * Each param group may carry a regularizer under ``"reg"`` (optimizer-level default ``reg=``);
      ``None`` / ``Null()`` means no penalty for that group.
    * ``state_dict()`` stores regularizers as ``to_dict()`` and callables as a marker, so the
      result is plain tensors + python types; ``load_state_dict()`` rebuilds the regularizers
      (updating the live objects in place when the type matches, so references held by a
      controller stay valid) and keeps the live callables.
    * λ-controller interface: ``get_lam()``, ``set_lam(value)``, ``scale_lam(factor)``.
    * torch.optim habits handled here for every optimizer: ``maximize`` (the gradient's sign is
      flipped) and, where ``coupled_weight_decay`` is set, ``weight_decay`` added to the gradient
      (``g + wd·w``, as ``torch.optim.SGD``). Each update then reads that gradient; ``p.grad``
      itself is left as the user's backward pass wrote it.
    """

    #: True: the base adds ``weight_decay·w`` to the gradient; False: the optimizer applies it
    coupled_weight_decay: bool = False

    #: group key holding the penalty strength; ``None``: the group's regularizer holds it
    lam_key: str | None = None

    # ---------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "reg" in group:
            reg = group["reg"]
            if reg is not None and not isinstance(reg, Regularizer):
                raise UsageError(f"reg: must be a sparsetrain regularizer or None, got {type(reg).__name__}")
        for p in group["params"]:
            if p.is_sparse:
                raise UsageError("params: sparse tensors are not supported")
        # the keys step() applies itself (_effective_grads), checked here for every group
        if "weight_decay" in group:
            check_number(group["weight_decay"], "weight_decay")
        check(isinstance(group.get("maximize", False), bool), "maximize", "True or False", group.get("maximize"))

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            swapped = self._effective_grads(group)
            try:
                self._update_group(group)
            finally:
                for p, g in swapped:
                    p.grad = g
        return loss

    def _effective_grads(self, group: dict) -> list:
        """Check that the group's gradients are dense, then point ``p.grad`` at ``±g (+ wd·w)`` for
        the update (see the class docstring; one multi-tensor op, one new tensor per gradient, as
        ``torch.optim.SGD(foreach=True)``); returns (param, original grad) pairs for ``step`` to put
        back."""
        pairs = [(p, p.grad) for p in group["params"] if p.grad is not None]
        for _, g in pairs:
            if g.layout != torch.strided:
                raise UsageError(f"params: {type(self).__name__} needs dense gradients, got a {g.layout} "
                                 f"one (e.g. from nn.Embedding(sparse=True)); allowed: modules with "
                                 f"sparse=False")
        maximize = bool(group.get("maximize", False))
        wd = float(group.get("weight_decay", 0.0)) if self.coupled_weight_decay else 0.0
        if not pairs or (not maximize and not wd):
            return []
        params, grads = [p for p, _ in pairs], [g for _, g in pairs]
        if maximize:
            new = torch._foreach_neg(grads)
            if wd:
                torch._foreach_add_(new, params, alpha=wd)
        else:
            new = torch._foreach_add(grads, params, alpha=wd)
        for (p, _), g in zip(pairs, new):
            p.grad = g
        return pairs

    def _update_group(self, group: dict) -> None:
        """The update of one param group (each optimizer's own)."""
        raise NotImplementedError

    @staticmethod
    def _use_foreach(group: dict) -> bool:
        return group.get("foreach") is not False

    @property
    def _applied_keys(self) -> tuple[str, ...]:
        """Group keys :meth:`_effective_grads` applies to the gradients before each update (so a
        fused kernel, which reads those gradients, implements them as it is)."""
        return ("maximize", "weight_decay") if self.coupled_weight_decay else ("maximize",)

    def _fused_cache(self) -> dict:
        """Device tables of the fused GPU steps (:mod:`.fused_cuda`); not part of the state."""
        return self.__dict__.setdefault("_fused", {})

    # ---------------------------------------------------------------- λ controller
    def is_regularized(self, group: dict) -> bool:
        """Whether ``group`` is penalised (its λ is reported by ``get_lam``/set by ``set_lam``)."""
        if self.lam_key is None:
            return not is_null(group.get("reg"))
        return bool(group.get("penalize", True))

    def get_lam(self) -> list[float | None]:
        """Penalty strength of every param group (``None`` for unregularized groups)."""
        out = []
        for g in self.param_groups:
            if not self.is_regularized(g):
                out.append(None)
            else:
                out.append(float(g["reg"].lam if self.lam_key is None else g[self.lam_key]))
        return out

    def set_lam(self, value) -> None:
        """Set λ on every regularized group (a number), or per group (a list with one entry per
        param group; ``None`` entries and unregularized groups are left alone)."""
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(self.param_groups)
        if len(values) != len(self.param_groups):
            raise UsageError(f"lam: need one value per param group ({len(self.param_groups)}), got {len(values)}")
        for g, lam in zip(self.param_groups, values):
            if lam is None or not self.is_regularized(g):
                continue
            lam = check_number(lam, "lam")
            if self.lam_key is None:
                g["reg"].lam = lam
            else:
                g[self.lam_key] = lam

    def scale_lam(self, factor: float, groups=None) -> None:
        """Multiply λ of every regularized group (or of the param groups with the indices in
        ``groups``) by ``factor`` (a shared regularizer once)."""
        factor = check_number(factor, "factor")
        seen: set[int] = set()
        chosen = None if groups is None else set(groups)
        for i in chosen or ():
            if not (isinstance(i, int) and 0 <= i < len(self.param_groups)):
                raise UsageError(f"groups: unknown param group index {i!r}; allowed: "
                                 f"{', '.join(map(str, range(len(self.param_groups))))}")
        for i, g in enumerate(self.param_groups):
            if not self.is_regularized(g) or (chosen is not None and i not in chosen):
                continue
            if self.lam_key is not None:
                g[self.lam_key] = g[self.lam_key] * factor
            elif id(g["reg"]) not in seen:
                seen.add(id(g["reg"]))
                g["reg"].lam = g["reg"].lam * factor

    # ---------------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for g in sd["param_groups"]:  # packed copies: the live groups are untouched
            for k, v in g.items():
                if k == "reg":
                    g[k] = None if v is None else v.to_dict()
                elif callable(v):
                    g[k] = _CALLABLE
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        live = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, old in zip(self.param_groups, live):
            for k, v in g.items():
                if k == "reg":
                    g[k] = _restore_reg(old.get("reg"), v)
                elif isinstance(v, str) and v == _CALLABLE:
                    g[k] = old.get(k)


def _restore_reg(live, saved):
    if saved is None or isinstance(saved, Regularizer):
        return saved
    new = regularizer_from_dict(saved)
    if live is not None and type(live) is type(new) and not isinstance(new, Null):
        live.__dict__.update(new.__dict__)  # keep the identity of the live object
        return live
    return new


# -------------------------------------------------------------------- Bregman helpers
def bregman_v0(w: Tensor, reg, delta: float) -> Tensor:
    """v₀ = w/δ + ∂J(w), so that δ·prox_J(v₀) = prox_{δJ}(δ v₀) = w."""
    v = torch.zeros_like(w) if is_null(reg) else reg.subgradient(w)
    return v.add_(w, alpha=1.0 / delta)


def bregman_prox_(params: list[Tensor], vs: list[Tensor], reg, delta: float, foreach: bool) -> None:
    """w ← prox_{δJ}(δ v) = δ·prox_J(v), written into the parameters in place."""
    if is_null(reg):
        if delta != 1.0:
            for p, v in zip(params, vs):
                torch.mul(v, delta, out=p)
        elif foreach:
            torch._foreach_copy_(params, vs)
        else:
            for p, v in zip(params, vs):
                p.copy_(v)
        return
    if foreach:
        reg.prox_foreach_(vs, 1.0, outs=params)
        if delta != 1.0:
            torch._foreach_mul_(params, delta)
    else:
        for p, v in zip(params, vs):
            reg.prox_(v, 1.0, out=p)
            if delta != 1.0:
                p.mul_(delta)


class BregmanOptimizer(SparseOptimizer):
    """Base of LinBreg / AdaBreg: state ``v`` ∈ ∂J_δ(w), J_δ = J + ‖·‖²/(2δ).

    ``v`` is initialised lazily on a parameter's first step as ``v₀ = w/δ + ∂J(w)``. Every step
    compares the group's (regularizer, δ) with the one its ``v`` was built with; when λ, δ or the
    regularizer changed, ``v`` is rebuilt from the current ``w`` first (no jump in ``w``).
    ``reinit_subgradient()`` does the same explicitly for all groups.

    A group with ``inactive="keep"`` rebuilds v only where w ≠ 0 and lets zero entries keep the
    v they accumulated: w is unchanged wherever |v| stays within the new threshold, and lowering
    λ admits the entries with the most accumulated evidence first (the inverse scale space's
    own order). The λ controller uses this; the default (``"reset"``) is SPEC §2's v₀.
    """

    _KEY = "bregman_state_for"  # group entry: the (reg, delta) the group's v was built with

    @staticmethod
    def _key(group: dict) -> dict:
        reg = group.get("reg")
        return {"reg": None if is_null(reg) else reg.to_dict(), "delta": float(group["delta"])}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_number(self.param_groups[-1]["delta"], "delta", strict=True)

    @torch.no_grad()
    def reinit_subgradient(self) -> None:
        """v ← w/δ + ∂J(w) for every parameter of every group (from the current weights)."""
        for group in self.param_groups:
            self._reinit_group(group)

    def _reinit_group(self, group: dict) -> None:
        delta, keep = float(group["delta"]), group.get("inactive") == "keep"
        for p in group["params"]:
            state = self.state.get(p)
            if state and "v" in state:
                v0 = bregman_v0(p.detach(), group.get("reg"), delta)
                if keep:  # zero entries keep their accumulated v (a λ controller's choice)
                    v0 = torch.where(p.detach() != 0, v0, state["v"])
                state["v"].copy_(v0)
        group[self._KEY] = self._key(group)

    def _bregman_state(self, p: Tensor, group: dict) -> dict:
        """The state of ``p``, with its subgradient v initialised lazily as v₀ = w/δ + ∂J(w)."""
        state = self.state[p]
        if "v" not in state:
            state["v"] = bregman_v0(p.detach(), group.get("reg"), float(group["delta"]))
        return state

    def _check_key(self, group: dict) -> None:
        key = self._key(group)
        if group.get(self._KEY) != key:
            self._reinit_group(group)
