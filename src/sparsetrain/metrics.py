"""Sparsity, density, compression and FLOPs — one meaning everywhere (SPEC §7).

All counts are over the weights of Linear and Conv layers (``params.prunable_weights``);
biases and normalisation parameters are excluded.

* sparsity = (#exact zeros) / (#elements);  density = 1 − sparsity
* compression ratio = #elements / #nonzeros
* group densities: fraction of rows (Linear outputs), kernels (``weight[o, i]``) and filters
  (``weight[o]``) that hold at least one nonzero
* FLOPs: multiply-accumulates of each Linear/Conv layer for one input, dense vs. counting only
  nonzero weights (a sparse kernel's work); other layers are not counted.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .params import prunable_weights, sparse_layers, unwrap


def _counts(model: nn.Module) -> tuple[int, int]:
    total = nnz = 0
    for _, w in prunable_weights(model):
        total += w.numel()
        nnz += int(torch.count_nonzero(w.detach()))
    return total, nnz


def sparsity(model: nn.Module) -> float:
    total, nnz = _counts(model)
    return 1.0 - nnz / total if total else 0.0


def density(model: nn.Module) -> float:
    return 1.0 - sparsity(model)


def compression_ratio(model: nn.Module) -> float:
    total, nnz = _counts(model)
    return total / nnz if nnz else math.inf


def group_alive(w: torch.Tensor) -> dict[str, float]:
    """Fraction of rows / kernels / filters of ``w`` with at least one nonzero entry."""
    nz = w.detach() != 0
    out = {"rows" if w.dim() == 2 else "filters": nz.flatten(1).any(1).float().mean().item()}
    if w.dim() > 2:
        out["kernels"] = nz.flatten(2).any(2).float().mean().item()
    return out


def layer_table(model: nn.Module) -> list[dict]:
    """One row per Linear/Conv layer: name, shape, numel, nnz, density, group densities."""
    rows = []
    for name, w in prunable_weights(model):
        nnz = int(torch.count_nonzero(w.detach()))
        rows.append({"layer": name, "shape": list(w.shape), "numel": w.numel(), "nnz": nnz,
                     "density": nnz / w.numel(), **group_alive(w)})
    return rows


def flops(model: nn.Module, in_shape: tuple[int, ...]) -> dict[str, float]:
    """Multiply-accumulates for one input of ``in_shape`` (C, H, W): dense, sparse, ratio."""
    base = unwrap(model)
    macs: dict[str, tuple[int, int]] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            w = module.weight.detach()
            # output positions each weight is applied at: 1 for a Linear on a vector, H·W for a conv
            positions = (output.numel() // (output.shape[0] * output.shape[-1]) if isinstance(module, nn.Linear)
                         else output[0, 0].numel())
            macs[name] = (w.numel() * positions, int(torch.count_nonzero(w)) * positions)
        return fn

    for name, m in sparse_layers(base):
        hooks.append(m.register_forward_hook(hook(name)))
    p = next(base.parameters())
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            base(torch.zeros(1, *in_shape, device=p.device, dtype=p.dtype))
    finally:
        base.train(was_training)
        for h in hooks:
            h.remove()
    dense = sum(d for d, _ in macs.values())
    sparse = sum(s for _, s in macs.values())
    return {"dense_macs": dense, "sparse_macs": sparse, "relative": sparse / dense if dense else 1.0}


def summary(model: nn.Module, in_shape: tuple[int, ...] | None = None) -> dict:
    """Overall sparsity, density, compression ratio, per-layer table (and FLOPs if ``in_shape``)."""
    total, nnz = _counts(model)
    out = {"sparsity": 1.0 - nnz / total if total else 0.0, "density": nnz / total if total else 1.0,
           "compression_ratio": total / nnz if nnz else math.inf, "weights": total, "nonzeros": nnz,
           "per_layer": layer_table(model)}
    if in_shape is not None:
        out["flops"] = flops(model, in_shape)
    return out


def format_table(rows: list[dict]) -> str:
    """The per-layer table as aligned text."""
    head = f"{'layer':<24} {'shape':<18} {'nnz':>9} {'numel':>9} {'density':>8} {'rows/filt':>9} {'kernels':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        grp = r.get("rows", r.get("filters", float("nan")))
        ker = f"{r['kernels']:.3f}" if "kernels" in r else "-"
        lines.append(f"{r['layer']:<24} {str(tuple(r['shape'])):<18} {r['nnz']:>9} {r['numel']:>9} "
                     f"{r['density']:>8.4f} {grp:>9.3f} {ker:>8}")
    return "\n".join(lines)
