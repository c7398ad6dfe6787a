"""Deployment helpers: an export as a ``torch.export`` program or an ONNX file.

Every format of :func:`~sparsetrain.export.load_export` is an ordinary ``nn.Module``; the
sparse layers call the registered operator ``torch.ops.sparsetrain.csr_matmul_t`` (ops.py), so
PyTorch's own tools apply directly: ``torch.jit.trace``, ``torch.compile``, ``torch.export``.
These two functions only fix the details:

* :func:`export_program` — ``torch.export.export`` with a dynamic batch dimension; with
  ``portable=True`` the sparse operator is replaced by standard ATen ops (gather, multiply,
  index_add over the CSR index/value constants), so ``torch.export.load`` of the saved ``.pt2``
  needs no sparsetrain. Without it the program keeps the fast kernel and its loader must
  ``import sparsetrain`` first (which registers the operator).
  The CSR weights travel as their three plain tensors (row pointers, columns, values): a
  ``torch.sparse_csr_tensor`` constant exports in memory but ``torch.export.save`` refuses it
  ("Sparse CSR tensors do not have is_contiguous", torch 2.13).
* :func:`to_onnx` — ``torch.onnx.export``; inside it the sparse layers compute through their
  dense weight rebuilt from the CSR parts (ONNX has no standard sparse product), so the file runs
  in any ONNX runtime with dense speed.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import UsageError


def _model(model_or_path) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path.eval()
    from . import load_export
    return load_export(model_or_path)


def export_program(model_or_path, example: torch.Tensor, *, portable: bool = False, dynamic_batch: bool = True):
    """A ``torch.export.ExportedProgram`` of a model or export file for inputs like ``example``
    (batch dimension dynamic unless ``dynamic_batch=False``; a model whose batch dimension
    cannot be dynamic is refused, naming ``dynamic_batch``); see the module docstring."""
    from .ops import portable as make_portable
    model = _model(model_or_path)
    dyn = None
    if dynamic_batch:
        dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
        if example.shape[0] == 1:      # torch.export specialises a size-1 dimension: trace with 2
            example = example.expand(2, *example.shape[1:]).clone()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example,), dynamic_shapes=dyn)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if dynamic_batch:   # never a silent static program: it would refuse every other batch size
            raise UsageError(f"dynamic_batch: torch.export cannot make the batch dimension of this model dynamic "
                             f"({why}); allowed: dynamic_batch=False (a program for the example's batch size "
                             f"only)") from None
        raise UsageError(f"torch.export: cannot export this model ({why})") from None
    return make_portable(ep) if portable else ep


def to_onnx(model_or_path, example: torch.Tensor, path: str | os.PathLike, **kwargs):
    """``torch.onnx.export(model, (example,), path, **kwargs)`` of a model or export file (needs
    the ``onnx`` package; the sparse layers export as dense products: see the module docstring)."""
    model = _model(model_or_path)
    with torch.no_grad():
        return torch.onnx.export(model, (example,), str(path), **kwargs)
