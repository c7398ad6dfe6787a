r"""N:M structured sparsity (``--pattern N:M``; 2:4 is what NVIDIA GPUs accelerate).

A weight is N:M sparse when every block of M consecutive entries along its input dimension (the
rows of ``w.reshape(out, -1)``: a Linear's in_features, a Conv's C_in·kh·kw) holds at most N
nonzeros. Layers whose row length is not a multiple of M cannot carry the pattern and are left
alone (and reported).

* :func:`nm_mask` -- the mask keeping the ``keep`` largest |w| of each block (exactly ``keep``
  per block), optionally only among the entries a current mask still allows;
* :func:`project_` -- the exact N:M projection of a model (the closest N:M weights in any norm);
* :func:`is_nm` -- whether a tensor satisfies the pattern.

Pruning baselines build their masks with :func:`nm_mask` (exactly N per block at the end);
every other method ends with :func:`project_` (its report goes into the run's summary).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .params import prunable_weights

__all__ = ["parse_pattern", "nm_mask", "is_nm", "project_", "keep_per_block"]


def parse_pattern(text) -> tuple[int, int] | None:
    """``"2:4"`` → (2, 4); None / "" → None; anything else a UsageError naming ``--pattern``."""
    if text is None or text == "":
        return None
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise UsageError(f"--pattern: must be N:M with integers 0 < N < M (e.g. 2:4), got {text!r}")
    return n, m


def _blocks(w: torch.Tensor, m: int) -> torch.Tensor | None:
    """``w`` as (blocks, m) in its logical order (a copy for non-default layouts), or None."""
    if w.dim() < 2 or w[0].numel() % m:
        return None
    return w.detach().reshape(w.shape[0], -1).reshape(-1, m)


def nm_mask(w: torch.Tensor, m: int, keep: int, current: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool mask of ``w``'s shape keeping the ``keep`` largest |w| in each block of ``m`` along the
    input dimension (entries masked out by ``current`` rank last, so they stay out while ``keep``
    does not grow); None when the rows are not a multiple of ``m`` long."""
    blocks = _blocks(w, m)
    if blocks is None:
        return None
    score = blocks.abs().float()
    if current is not None:
        score = torch.where(current.reshape(-1, m).to(torch.bool), score, torch.full_like(score, -1.0))
    idx = score.topk(min(max(keep, 0), m), dim=1).indices
    out = torch.zeros(score.shape, dtype=torch.bool, device=w.device).scatter_(1, idx, True)
    return out.reshape(w.shape)


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """At most ``n`` nonzeros in every block of ``m`` along the input dimension."""
    blocks = _blocks(w, m)
    return blocks is not None and bool(((blocks != 0).sum(1) <= n).all())


def keep_per_block(sparsity: float, final: float, n: int, m: int) -> int:
    """Entries kept per block when a schedule is at ``sparsity`` of its ``final`` target: from M
    (nothing pruned) down to N (the pattern) in proportion."""
    if final <= 0 or sparsity >= final:
        return n
    return max(n, m - int(sparsity / final * (m - n)))


@torch.no_grad()
def project_(model: nn.Module, n: int, m: int) -> dict:
    """Keep the N largest |w| of every block of M in each prunable weight of ``model`` (in place).
    Returns {pattern, pattern_layers, pattern_skipped (layers whose rows are not a multiple of M),
    pattern_removed (nonzeros the projection zeroed)}."""
    layers, skipped, removed = 0, [], 0
    for name, w in prunable_weights(model):
        mask = nm_mask(w, m, n)
        if mask is None:
            skipped.append(name)
            continue
        before = int(torch.count_nonzero(w))
        w.mul_(mask)
        removed += before - int(torch.count_nonzero(w))
        layers += 1
    return {"pattern": f"{n}:{m}", "pattern_layers": layers, "pattern_skipped": skipped,
            "pattern_removed": removed}
