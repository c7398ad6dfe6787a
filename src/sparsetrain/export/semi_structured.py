"""2:4 semi-structured Linear weights: NVIDIA's sparse tensor cores (Ampere and later) multiply a
weight with at most 2 nonzeros in every block of 4 along the input dimension at up to twice the
dense rate. :func:`to_semi_structured` swaps every 2:4 Linear weight of a model for
``torch.sparse.to_sparse_semi_structured(w)`` (values + 2-bit indices, half the memory) where
that runs: a CUDA device and an fp16 / bf16 weight. Everywhere else -- CPU, fp32, a layer that is
not 2:4 or whose shape the kernels refuse -- the layer stays dense, and the report says why.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nm import is_nm

__all__ = ["to_semi_structured", "semi_structured_layers"]

DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_layers(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose weight is 2:4 sparse."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_nm(m.weight, 2, 4)]


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> list[dict]:
    """Replace, in place, the weight of every 2:4 ``nn.Linear`` by its semi-structured form (CUDA,
    fp16/bf16); returns one row per Linear: {layer, semi_structured: bool, reason}."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        if not is_nm(w, 2, 4):
            reason = "not 2:4 sparse"
        elif w.device.type != "cuda":
            reason = f"dense fallback: {w.device.type} (semi-structured kernels need CUDA)"
        elif w.dtype not in DTYPES:
            reason = f"dense fallback: {str(w.dtype).replace('torch.', '')} (needs float16 or bfloat16)"
        else:
            try:
                m.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach()), requires_grad=False)
                reason = ""
            except (RuntimeError, ValueError) as e:   # shapes / devices the kernels do not support
                reason = "dense fallback: " + " ".join(str(e).split())[:120]
        rows.append({"layer": name, "semi_structured": not reason, "reason": reason})
    return rows
