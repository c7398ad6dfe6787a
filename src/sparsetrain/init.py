r"""Sparse initialisation for Bregman training (SPEC §2).

For every Linear / Conv weight W_l (:func:`sparsetrain.prunable_weights`):

.. math::
    W_l = r_l\cdot W_{\mathrm{He}} \odot B_l, \qquad W_{\mathrm{He}} \sim \mathcal N(0, 2/\mathrm{fan\_in}),
    \qquad B_l \sim \mathrm{Bernoulli}(p_l)

with one Bernoulli draw per entry (``groups="entries"``), per row / output neuron
(``"rows"``; on a conv weight a row is a whole filter w[o]) or per conv kernel w[o, i]
(``"kernels"``; a Linear weight has no kernels and uses its rows). r_l defaults to 1/√p̂_l, p̂_l
the fraction the mask actually kept (≈ p_l; more where the floor adds weights), which preserves
the variance E[W²] = 2/fan_in of the dense init (the paper's MLP uses r = 0.7/√p, its
ConvNet r = 10 with p = 0.01). Biases of those layers are drawn small and positive,
U(0, r₀/√fan_in) with r₀ = ``bias_scale`` (1 by default; the authors' example scripts use r₀ = 5,
one of their run scripts 2); other modules (norms, embeddings) are untouched.

**Per-layer densities** (``allocation``): the overall density p is spread over the layers

* ``"uniform"``: p_l = p in every layer (the paper's choice);
* ``"erk"`` (Erdős–Rényi-kernel, as in RigL): p_l ∝ Σ dims / Π dims of W_l, scaled so that the
  expected number of nonzeros is p · Σ_l |W_l|; a layer that would exceed 1 is made dense and
  the others rescaled. Small layers (the first conv, the classifier) get more of the budget.

**Floor** (``floor=True``, the default): a network is dead when one layer is empty (every
activation after it is zero, so every weight gradient is zero and a Bregman method, which only
grows weights whose accumulated gradient is nonzero, never leaves the start). After the draw,
every output unit whose row (filter) drew nothing gets one group switched on at random — so
every layer and every unit has an input (with ``"rows"`` groups: every layer keeps at least one
row). At p = 0.2 % the 144-weight first conv of ResNet-20 would otherwise start empty with
probability 0.75 (LeNet-5's 150-weight conv: 0.74).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UsageError, choice
from .params import sparse_layers

__all__ = ["sparse_init_", "layer_init_densities", "ALLOCATIONS"]

GROUPS = ("entries", "rows", "kernels")
ALLOCATIONS = ("uniform", "erk")


def _mask_shape(shape: torch.Size, groups: str) -> list[int]:
    if groups == "entries" or len(shape) < 2:
        return list(shape)
    keep = 2 if groups == "kernels" and len(shape) >= 3 else 1
    return list(shape[:keep]) + [1] * (len(shape) - keep)


def layer_init_densities(model: nn.Module, density: float, allocation: str = "uniform") -> dict[str, float]:
    """Per-layer density p_l of the sparse init (layer name -> p_l) for an overall ``density``."""
    from .pruning import layer_densities              # lazy: pruning imports the metrics
    allocation = choice(allocation, "allocation", ALLOCATIONS)
    shapes = {name: layer.weight.shape for name, layer in sparse_layers(model) if layer.weight.numel()}
    if not shapes:
        return {}
    return layer_densities(shapes, 1.0 - density, allocation)


def _floor_(keep: torch.Tensor, generator) -> None:
    """Switch on one random group in every output unit (row / filter) whose mask is all zero;
    where a group is a whole unit (``"rows"``, or ``"kernels"`` on a Linear weight or a conv with
    one input channel), one random unit when the whole layer is empty."""
    if keep.dim() < 2 or keep[0].numel() == 1:
        flat = keep.view(-1)
        if not flat.any():
            flat[torch.randint(flat.numel(), (1,), generator=generator).item()] = 1
        return
    rows = keep.view(keep.shape[0], -1)
    empty = (rows.sum(1) == 0).nonzero().flatten()
    if empty.numel():
        cols = torch.randint(rows.shape[1], (empty.numel(),), generator=generator)
        rows[empty, cols.to(rows.device)] = 1


@torch.no_grad()
def sparse_init_(model: nn.Module, density: float, scale: float | None = None, groups: str = "entries",
                 generator: torch.Generator | None = None, allocation: str = "uniform",
                 floor: bool = True, bias_scale: float = 1.0) -> nn.Module:
    """Initialise ``model``'s Linear / Conv layers sparsely in place and return ``model``.

    Args:
        model: the network (a DDP / DataParallel wrapper is unwrapped).
        density: p ∈ (0, 1], the overall probability that an entry / row / kernel is kept.
        scale: r, the factor on the Kaiming-normal init (default 1/√p̂_l per layer, p̂_l the kept fraction).
        groups: ``"entries"`` | ``"rows"`` | ``"kernels"``: what one Bernoulli draw switches on.
        generator: a ``torch.Generator`` for reproducible draws.
        allocation: ``"uniform"`` | ``"erk"``: how p is spread over the layers (module docstring).
        floor: give every output unit at least one nonzero group (no layer starts empty).
        bias_scale: r₀ ≥ 0, biases are drawn from U(0, r₀/√fan_in).
    """
    try:
        p = float(density)
    except (TypeError, ValueError):
        raise UsageError(f"density: must be a number in (0, 1], got {density!r}") from None
    if not 0 < p <= 1:
        raise UsageError(f"density: must be in (0, 1], got {density!r}")
    if scale is not None and not (float(scale) > 0 and math.isfinite(float(scale))):
        raise UsageError(f"scale: must be a finite number > 0, got {scale!r}")
    if not (float(bias_scale) >= 0 and math.isfinite(float(bias_scale))):
        raise UsageError(f"bias_scale: must be a finite number >= 0, got {bias_scale!r}")
    groups = choice(groups, "groups", GROUPS)
    per_layer = layer_init_densities(model, p, allocation)
    for name, layer in sparse_layers(model):
        w = layer.weight
        if w.numel() == 0:
            continue
        p_l = per_layer[name]
        nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)
        kept = 1.0
        if p_l < 1:
            keep = torch.bernoulli(torch.full(_mask_shape(w.shape, groups), p_l, dtype=w.dtype,
                                              device=w.device), generator=generator)
            if floor:
                _floor_(keep, generator)
            w.mul_(keep)
            kept = keep.mean().item()           # the floor may keep more than p_l
        w.mul_(1 / math.sqrt(max(kept, 1e-12)) if scale is None else float(scale))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            fan_in = w.numel() // w.shape[0]
            bias.uniform_(0.0, float(bias_scale) / math.sqrt(fan_in), generator=generator)
    return model
