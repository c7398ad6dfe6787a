r"""Sparse initialisation for Bregman training (SPEC §2).

For every Linear / Conv weight (:func:`sparsetrain.prunable_weights`):

.. math::
    W = r\cdot W_{\mathrm{He}} \odot B, \qquad W_{\mathrm{He}} \sim \mathcal N(0, 2/\mathrm{fan\_in}),
    \qquad B \sim \mathrm{Bernoulli}(p)

with one Bernoulli draw per entry (``groups="entries"``), per row / output neuron
(``"rows"``; on a conv weight a row is a whole filter w[o]) or per conv kernel w[o, i]
(``"kernels"``; a Linear weight has no kernels and uses its rows). p is the *density*;
r defaults to 1/√p, which preserves the variance E[W²] = 2/fan_in of the dense init (the
paper's MLP uses r = 0.7/√p, its ConvNet r = 10 with p = 0.01). Biases of those layers are
drawn small and positive, U(0, 1/√fan_in]; other modules (norms, embeddings) are untouched.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UsageError, choice
from .params import sparse_layers

__all__ = ["sparse_init_"]

GROUPS = ("entries", "rows", "kernels")


def _mask_shape(shape: torch.Size, groups: str) -> list[int]:
    if groups == "entries" or len(shape) < 2:
        return list(shape)
    keep = 2 if groups == "kernels" and len(shape) >= 3 else 1
    return list(shape[:keep]) + [1] * (len(shape) - keep)


@torch.no_grad()
def sparse_init_(model: nn.Module, density: float, scale: float | None = None, groups: str = "entries",
                 generator: torch.Generator | None = None) -> nn.Module:
    """Initialise ``model``'s Linear / Conv layers sparsely in place and return ``model``.

    Args:
        model: the network (a DDP / DataParallel wrapper is unwrapped).
        density: p ∈ (0, 1], the probability that an entry / row / kernel is kept.
        scale: r, the factor on the Kaiming-normal init (default 1/√p).
        groups: ``"entries"`` | ``"rows"`` | ``"kernels"``: what one Bernoulli draw switches on.
        generator: a ``torch.Generator`` for reproducible draws.
    """
    try:
        p = float(density)
    except (TypeError, ValueError):
        raise UsageError(f"density: must be a number in (0, 1], got {density!r}") from None
    if not 0 < p <= 1:
        raise UsageError(f"density: must be in (0, 1], got {density!r}")
    r = 1 / math.sqrt(p) if scale is None else float(scale)
    if not (r > 0 and math.isfinite(r)):
        raise UsageError(f"scale: must be a finite number > 0, got {scale!r}")
    groups = choice(groups, "groups", GROUPS)
    for _, layer in sparse_layers(model):
        w = layer.weight
        if w.numel() == 0:
            continue
        nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)
        w.mul_(r)
        if p < 1:
            keep = torch.full(_mask_shape(w.shape, groups), p, dtype=w.dtype, device=w.device)
            w.mul_(torch.bernoulli(keep, generator=generator))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            fan_in = w.numel() // w.shape[0]
            bias.uniform_(0.0, 1 / math.sqrt(fan_in), generator=generator)
    return model
