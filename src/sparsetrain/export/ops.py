"""The sparse product as a registered PyTorch operator: ``torch.ops.sparsetrain.csr_matmul_t``.

``csr_matmul_t(crow, col, values, xt, bias, kernel) = W @ xt (+ bias[:, None])`` for the matrix
W (rows × in) held in CSR form by three plain tensors — ``crow`` (rows + 1 row pointers),
``col`` (column of each nonzero), ``values`` — and a dense ``xt`` of shape (in, N); the result
is (rows, N). ``kernel`` names the implementation (``addmm``, ``spmm_sum``, ``native``; see
:mod:`~sparsetrain.export.sparse_modules`); every kernel computes the same numbers.

Why an operator: SparseLinear / SparseConv2d used to call the compiled kernel through ctypes on
raw data pointers, which no graph tool can see: ``torch.jit.trace`` recorded the raw pointers of
its example input (later calls returned garbage), ``torch.export`` failed on fake tensors. As a
``torch.library`` custom op with a fake (meta) kernel the product is one node of the graph:

* ``torch.jit.trace`` records ``sparsetrain::csr_matmul_t``; the traced module runs the same
  kernel (loading a saved TorchScript file needs ``import sparsetrain`` first, which registers it);
* ``torch.export`` / ``torch.compile`` trace through the fake kernel (output shape only) and call
  the real one at run time; :func:`portable` replaces the op by plain ATen ops (gather,
  multiply, index_add) so the exported program runs without sparsetrain (ONNX too);
* the CPU implementation uses the native kernel where :func:`sparsetrain.native.usable`, else
  torch's CSR products; other devices (CUDA) take torch's CSR products.

Inference only: the op has no autograd formula, so asking for a gradient through it is an error.
``torch.library.custom_op`` exists from torch 2.4 on; older versions get the same schema through
``torch.library.Library`` (define / impl / impl_abstract).
"""
from __future__ import annotations

import warnings

import torch

from .. import native

NAME = "sparsetrain::csr_matmul_t"
SCHEMA = "(Tensor crow, Tensor col, Tensor values, Tensor xt, Tensor? bias, str kernel) -> Tensor"


def _csr(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


_INT64: dict = {}          # int32 indices -> their int64 copies (spmm_sum needs int64), by storage


def _int64(crow, col):
    """``(crow.long(), col.long())``, cached by storage address. An entry keeps its int32 sources
    alive: otherwise a freed index tensor's address (same size, version 0) is handed to a new one,
    which would then get the old tensor's int64 copies, i.e. silently wrong columns."""
    key = (crow.data_ptr(), col.data_ptr(), crow.numel(), col.numel(), crow._version, col._version, crow.device)
    hit = _INT64.get(key)
    if hit is None:
        if len(_INT64) >= 256:
            _INT64.clear()
        hit = _INT64[key] = (crow, col, crow.long(), col.long())
    return hit[2:]


def reference(crow, col, values, xt, bias=None, kernel: str = "addmm", *, csr=None, csr64=None) -> torch.Tensor:
    """The eager implementation (what the op runs): native kernel or torch's CSR products.
    ``csr`` / ``csr64``: the CSR tensor over these parts with int32 / int64 indices, if the
    caller keeps one (building it costs ~7 µs, as much as a small layer's whole product)."""
    shape = (crow.numel() - 1, xt.shape[0])
    if kernel == "native" and native.usable(crow, col, values, xt, bias) and xt.shape[1] > 1:
        return native.csr_matmul_t(crow, col, values, xt.contiguous(), bias)
    if kernel == "spmm_sum" and xt.shape[1] > 1:
        w64 = csr64 if csr64 is not None else _csr(*_int64(crow, col), values, shape)
        y = torch.sparse.mm(w64, xt, "sum")
        return y if bias is None else y.add_(bias.unsqueeze(1))
    w = csr if csr is not None else _csr(crow, col, values, shape)
    if xt.shape[1] == 1:       # one column: MKL's matrix-vector product
        v = torch.mv(w, xt[:, 0]) if bias is None else torch.addmv(bias, w, xt[:, 0])
        return v.unsqueeze(1)
    return torch.sparse.mm(w, xt) if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)


def decomposed(crow, col, values, xt, bias=None, kernel: str = "addmm") -> torch.Tensor:
    """The same product in plain dense ATen ops (gather, multiply, index_add): what
    :func:`portable` puts in a graph instead of the op, for tools without sparsetrain."""
    rows = crow.shape[0] - 1
    counts = (crow[1:] - crow[:-1]).long()
    row = torch.repeat_interleave(torch.arange(rows, device=crow.device), counts, output_size=values.shape[0])
    contrib = xt.index_select(0, col.long()) * values.unsqueeze(1)          # (nnz, N)
    y = xt.new_zeros(rows, xt.shape[1]).index_add(0, row, contrib)
    return y if bias is None else y + bias.unsqueeze(1)


def densified(crow, col, values, xt, bias=None, kernel: str = "addmm") -> torch.Tensor:
    """The same product through the dense weight, rebuilt from the CSR parts with operators ONNX
    has (compare, sum, scatter): ONNX has no sparse product, so an ONNX file computes densely."""
    rows, nnz = crow.shape[0] - 1, values.shape[0]
    row = (torch.arange(nnz, device=crow.device).unsqueeze(0) >= crow[1:].long().unsqueeze(1)).sum(0)
    w = values.new_zeros(rows, xt.shape[0]).index_put((row, col.long()), values)
    y = w @ xt
    return y if bias is None else y + bias.unsqueeze(1)


def _fake(crow, col, values, xt, bias=None, kernel: str = "addmm") -> torch.Tensor:
    torch._check(xt.dim() == 2, lambda: "csr_matmul_t: xt must be 2-D (in, N)")
    return xt.new_empty(crow.shape[0] - 1, xt.shape[1])


def _register():
    if hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake"):
        @torch.library.custom_op(NAME, mutates_args=(), schema=SCHEMA)
        def op(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, xt: torch.Tensor,
               bias: torch.Tensor | None, kernel: str) -> torch.Tensor:
            return reference(crow, col, values, xt, bias, kernel)

        torch.library.register_fake(NAME)(_fake)
        return None
    lib = torch.library.Library("sparsetrain", "DEF")                     # torch < 2.4
    lib.define("csr_matmul_t" + SCHEMA)
    lib.impl("csr_matmul_t", reference, "CompositeExplicitAutograd")
    torch.library.impl_abstract(NAME, lib=lib)(_fake)
    return lib


def _registered() -> bool:
    try:
        return hasattr(torch.ops.sparsetrain, "csr_matmul_t")
    except (AttributeError, RuntimeError):
        return False


_LIB = None if _registered() else _register()     # the Library object must outlive this module's import


def csr_matmul_t(crow, col, values, xt, bias=None, kernel: str = "addmm") -> torch.Tensor:
    """``torch.ops.sparsetrain.csr_matmul_t`` (see the module docstring)."""
    return torch.ops.sparsetrain.csr_matmul_t(crow, col, values, xt, bias, kernel)


def portable(program):
    """``program`` (a ``torch.export.ExportedProgram``) with every ``csr_matmul_t`` node replaced by
    :func:`decomposed`: standard ATen ops only, so the program runs — and converts to ONNX —
    without sparsetrain installed. The indices and values stay as the program's CSR constants."""
    return program.run_decompositions({torch.ops.sparsetrain.csr_matmul_t.default: decomposed})
