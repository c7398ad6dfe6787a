"""Magnitude pruning, masks and sparsity schedules: the building blocks of the pruning baselines
(SPEC §6) — one-shot magnitude pruning, gradual magnitude pruning (Zhu & Gupta), iterative
magnitude pruning with rewinding (lottery ticket) and RigL (Evci et al.).

Everything here works on the penalised tensors of :func:`sparsetrain.params.prunable_weights`
(Linear / Conv weights; biases and normalisation parameters are never pruned), so the counts
agree with :mod:`sparsetrain.metrics`.

* :func:`magnitude_masks` — keep-masks with an *exact* number of zeros, globally (one threshold
  over all layers) or per layer (``uniform``, ``erk`` or explicit per-layer sparsities). Ties are
  broken deterministically: among equal scores the entry that comes first (layer order, then
  row-major position) is pruned first. Entries already pruned by a current mask are pruned
  first, so masks only shrink as the sparsity grows.
* :class:`Mask` — one bool tensor per weight; keeps pruned weights, their gradients and their
  optimizer state (momentum buffers, Adam moments: every state tensor shaped like the weight) at
  exactly zero; ``state_dict()`` holds tensors only (``torch.load(weights_only=True)`` safe).
* :func:`layer_densities` — uniform / ERK density per layer (RigL's Erdős–Rényi-kernel rule).
* :func:`gmp_sparsity` — Zhu & Gupta's cubic schedule.
* :func:`rigl_update` — one RigL drop/grow step at constant per-layer density.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .params import prunable_weights

__all__ = ["Mask", "magnitude_masks", "global_magnitude_masks", "layerwise_magnitude_masks",
           "layer_densities", "allocate_counts", "gmp_sparsity", "rigl_update", "random_masks",
           "cosine_decay", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("global", "uniform", "erk")


def _weights(model_or_weights) -> dict[str, torch.Tensor]:
    if isinstance(model_or_weights, nn.Module):
        return dict(prunable_weights(model_or_weights))
    return dict(model_or_weights)


def _n_zeros(numel: int, sparsity: float) -> int:
    return min(numel, max(0, int(round(sparsity * numel))))


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask (flat) keeping the ``keep`` largest scores; among ties the later entry is kept
    (so the earlier one is pruned): a stable ascending sort prunes the first ``n - keep``."""
    n = scores.numel()
    keep = min(max(int(keep), 0), n)
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if keep:
        order = torch.sort(scores, stable=True).indices
        out[order[n - keep:]] = True
    return out


def _scores(weights: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor] | None,
            scores: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """|w| (or given scores, assumed >= 0) with currently pruned entries set to -1 (pruned first)."""
    out = {}
    for name, w in weights.items():
        s = (scores[name] if scores is not None else w.detach().abs()).float().flatten()
        if current is not None and name in current:
            s = torch.where(current[name].flatten(), s, torch.full_like(s, -1.0))
        out[name] = s
    return out


def global_magnitude_masks(weights, sparsity: float, current=None, scores=None) -> dict[str, torch.Tensor]:
    """Keep-masks with exactly ``round(sparsity * N)`` zeros over all ``weights`` together."""
    w = _weights(weights)
    sc = _scores(w, current, scores)
    flat = torch.cat([s.to(next(iter(sc.values())).device) for s in sc.values()]) if sc else torch.zeros(0)
    keep = _keep_top(flat, flat.numel() - _n_zeros(flat.numel(), sparsity))
    out, i = {}, 0
    for name, t in w.items():
        out[name] = keep[i:i + t.numel()].view(t.shape).to(t.device)
        i += t.numel()
    return out


def allocate_counts(numels: list[int], densities: list[float], total_keep: int) -> list[int]:
    """Integer keep-counts per layer close to ``density * numel`` that add up to ``total_keep``
    exactly (largest remainders get the extra units; no layer exceeds its size)."""
    raw = [min(n, max(0.0, d * n)) for n, d in zip(numels, densities)]
    counts = [int(math.floor(r)) for r in raw]
    diff = total_keep - sum(counts)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    while diff > 0:
        progressed = False
        for i in order:
            if diff and counts[i] < numels[i]:
                counts[i] += 1
                diff -= 1
                progressed = True
        if not progressed:
            break
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - counts[i], i))
    while diff < 0:
        progressed = False
        for i in order:
            if diff and counts[i] > 0:
                counts[i] -= 1
                diff += 1
                progressed = True
        if not progressed:
            break
    return counts


def layer_densities(shapes: Mapping[str, torch.Size], sparsity: float, distribution: str = "uniform",
                    dense: Iterable[str] = ()) -> dict[str, float]:
    """Per-layer density for a target overall ``sparsity``.

    ``uniform``: every layer at the same density (layers named in ``dense`` are kept dense and the
    others made sparser so that the overall sparsity is still the target).
    ``erk``: Erdős–Rényi-kernel (Evci et al., RigL): density ∝ Σ dims / Π dims of the weight,
    scaled to the target; layers that would exceed density 1 are made dense and the rest rescaled.
    """
    dense = set(dense)
    names = list(shapes)
    numel = {k: math.prod(shapes[k]) for k in names}
    total = sum(numel.values())
    keep_total = total - _n_zeros(total, sparsity)
    if distribution == "uniform":
        rest = sum(numel[k] for k in names if k not in dense)
        budget = keep_total - sum(numel[k] for k in names if k in dense)
        if rest == 0:
            return {k: 1.0 for k in names}
        if budget < 0:
            raise ValueError(f"sparsity {sparsity}: keeping {sorted(dense)} dense already exceeds the "
                             f"{keep_total} weights allowed")
        d = budget / rest
        return {k: 1.0 if k in dense else d for k in names}
    if distribution != "erk":
        raise ValueError(f"unknown distribution {distribution!r}; allowed: uniform, erk")
    raw = {k: sum(shapes[k]) / numel[k] for k in names}
    while True:
        rhs = keep_total - sum(numel[k] for k in dense)
        divisor = sum(raw[k] * numel[k] for k in names if k not in dense)
        if divisor == 0:
            break
        eps = rhs / divisor
        over = [k for k in names if k not in dense and eps * raw[k] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda k: raw[k]))
    return {k: 1.0 if k in dense else min(1.0, max(0.0, eps * raw[k])) for k in names}


def layerwise_magnitude_masks(weights, sparsity: float | Mapping[str, float], current=None, scores=None,
                              distribution: str = "uniform") -> dict[str, torch.Tensor]:
    """Keep-masks pruning each layer by its own magnitude ranking.

    ``sparsity`` is a float (spread by ``distribution``: uniform or erk; the per-layer counts are
    then rounded so that the overall number of zeros is exactly ``round(sparsity * N)``) or a
    dict of per-layer sparsities (each layer gets exactly ``round(s_l * n_l)`` zeros).
    """
    w = _weights(weights)
    sc = _scores(w, current, scores)
    names = list(w)
    numels = [w[k].numel() for k in names]
    if isinstance(sparsity, Mapping):
        keeps = [n - _n_zeros(n, sparsity[k]) for k, n in zip(names, numels)]
    else:
        dens = layer_densities({k: w[k].shape for k in names}, sparsity, distribution)
        keeps = allocate_counts(numels, [dens[k] for k in names], sum(numels) - _n_zeros(sum(numels), sparsity))
    return {k: _keep_top(sc[k], keep).view(w[k].shape).to(w[k].device) for k, keep in zip(names, keeps)}


def magnitude_masks(weights, sparsity: float, distribution: str = "global", current=None,
                    scores=None) -> dict[str, torch.Tensor]:
    """Keep-masks by magnitude: ``global`` (one threshold), ``uniform`` or ``erk`` (per layer)."""
    if distribution == "global":
        return global_magnitude_masks(weights, sparsity, current, scores)
    return layerwise_magnitude_masks(weights, sparsity, current, scores, distribution)


def random_masks(weights, sparsity: float, distribution: str = "erk", dense: Iterable[str] = (),
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random keep-masks with an exact count per layer (the layer densities of ``distribution``,
    counts rounded so that the overall number of zeros is exactly ``round(sparsity * N)``)."""
    w = _weights(weights)
    names = list(w)
    numels = [w[k].numel() for k in names]
    dens = layer_densities({k: w[k].shape for k in names}, sparsity, distribution, dense)
    keeps = allocate_counts(numels, [dens[k] for k in names], sum(numels) - _n_zeros(sum(numels), sparsity))
    out = {}
    for k, n, keep in zip(names, numels, keeps):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=generator)[:keep]] = True
        out[k] = m.view(w[k].shape).to(w[k].device)
    return out


class Mask:
    """Keep-masks (bool, True = kept) for the prunable weights of ``model``.

    ``apply()`` zeroes the pruned weights, ``mask_grads()`` their gradients (call it after
    ``backward``), ``mask_state(optimizer)`` every optimizer state tensor shaped like a masked
    weight (SGD momentum buffers, Adam's moments ...). With grads and state masked, no optimizer
    step can move a pruned weight; ``apply()`` after each step keeps it exactly 0 anyway.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None):
        self.params: dict[str, nn.Parameter] = dict(prunable_weights(model))
        self.masks: dict[str, torch.Tensor] = {
            k: torch.ones_like(p, dtype=torch.bool) for k, p in self.params.items()}
        if masks is not None:
            self.set(masks)

    # ------------------------------------------------------------------ updates
    def set(self, masks: Mapping[str, torch.Tensor]) -> None:
        for k, m in masks.items():
            if k not in self.params:
                raise KeyError(f"mask for unknown weight {k!r}")
            p = self.params[k]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask for {k}: shape {tuple(m.shape)} != weight shape {tuple(p.shape)}")
            self.masks[k] = m.to(device=p.device, dtype=torch.bool).clone()

    def update(self, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install new masks, zero the pruned weights (and their optimizer state)."""
        self.set(masks)
        self.apply()
        if optimizer is not None:
            self.mask_state(optimizer)

    def _multipliers(self) -> list[torch.Tensor]:
        """The masks in their weights' dtypes (one fused multi-tensor multiply per step instead of
        one kernel per layer), rebuilt whenever a mask is replaced or changed in place."""
        key = tuple((id(m), m._version) for m in self.masks.values())
        if getattr(self, "_mult_key", None) != key:
            self._mult = [self.masks[k].to(p.dtype) for k, p in self.params.items()]
            self._mult_key = key
        return self._mult

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_mul_(list(self.params.values()), self._multipliers())

    @torch.no_grad()
    def mask_grads(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self.params.values(), self._multipliers()) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def mask_state(self, optimizer: torch.optim.Optimizer) -> None:
        for k, p in self.params.items():
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(self.masks[k])

    # ------------------------------------------------------------------ counts
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        n = self.numel()
        return 1.0 - self.kept() / n if n else 0.0

    def layer_density(self) -> dict[str, float]:
        return {k: m.float().mean().item() for k, m in self.masks.items()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: m.detach().cpu().clone() for k, m in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"mask state lacks {sorted(missing)[:3]}")
        self.set(state)
        self.apply()


def gmp_sparsity(step: int, final: float, start_step: int, end_step: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` before ``start_step``, ``final`` from ``end_step`` on,
    ``s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3`` in between."""
    if step < start_step:
        return initial
    if step >= end_step or end_step <= start_step:
        return final
    frac = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - frac) ** 3


def cosine_decay(step: int, end_step: int, alpha: float) -> float:
    """RigL's update fraction ``α/2 (1 + cos(π t / T_end))`` (0 from ``end_step`` on)."""
    if step >= end_step or end_step <= 0:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * step / end_step))


@torch.no_grad()
def rigl_update(mask: Mask, fraction: float, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """One RigL step on every layer at constant density: drop the ``fraction`` of active weights
    with the smallest magnitude, grow as many inactive ones with the largest dense-gradient
    magnitude (the weights' ``.grad`` must hold the dense gradient). A just-dropped weight may be
    grown back (it keeps its value); really new connections start at 0 with zero optimizer
    state. Returns the number of changed connections per layer."""
    changed = {}
    for k, p in mask.params.items():
        old = mask.masks[k]
        active = int(old.sum())
        n_update = int(fraction * active)
        if n_update == 0 or p.grad is None or active == old.numel():
            changed[k] = 0
            continue
        flat_old = old.flatten()
        w = p.detach().abs().flatten().float()
        keep_scores = torch.where(flat_old, w, torch.full_like(w, -1.0))
        kept = _keep_top(keep_scores, active - n_update)
        g = p.grad.detach().abs().flatten().float()
        grow_scores = torch.where(kept, torch.full_like(g, -1.0), g)
        grown = _keep_top(grow_scores, n_update)
        new = kept | grown
        new_connections = new & ~flat_old
        changed[k] = int(new_connections.sum())
        mask.masks[k] = new.view(old.shape)
        p.mul_(mask.masks[k])                       # dropped → 0; new ones are 0 already
        if optimizer is not None:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(mask.masks[k])           # dropped connections: zero state
                    v.masked_fill_(new_connections.view(v.shape), 0)  # new ones: fresh state
    return changed
