"""Layers that multiply by a ``torch.sparse`` CSR weight, chosen per layer only where faster.

:class:`SparseLinear` keeps the weight as CSR with int32 indices (MKL's native index type: int64
indices are converted on every call) and computes

* batch 1: ``torch.mv(W_csr, x)`` — the sparse matrix-vector product reads only the nonzeros;
* batch B > 1: ``torch.addmm(b, W_csr, xᵀ)ᵀ`` — sparse weight times the transposed input, whose
  result is returned as a transposed view; the next SparseLinear then finds its ``xᵀ`` already
  contiguous, so a chain of sparse layers never copies activations. (``F.linear(x, W_csr)``,
  i.e. dense input times the transposed sparse weight, was ~6× slower at batch 64; int64
  indices, COO, BSR (4×4 blocks of unstructured sparsity) and gather + segment-sum matvecs were
  all slower than int32 CSR in benchmarks/inference.py.)

Every product goes through one registered operator, ``torch.ops.sparsetrain.csr_matmul_t``
(ops.py), so ``torch.jit.trace`` / ``torch.export`` / ``torch.compile`` record it (plain eager
calls skip the dispatcher); under ``torch.onnx.export`` the layers compute through their dense
weight instead (ONNX has no sparse product).

:class:`SparseConv2d` runs ``unfold`` (im2col) per sample followed by the same CSR product. On
CPU it rarely pays: MKL-DNN's dense convolution is faster than the im2col copy alone for the
convs of LeNet-5 / VGG / ResNet at 2 % density, so convs denser than 10 % are not even timed.

:func:`sparsify` replaces each Linear / Conv2d layer by its sparse version only when that is
faster: with ``measure=True`` the dense layer and each sparse kernel are timed on the layer's real
input shape for the given batch size (round-robin after warm-up, the fastest of ≥ 3 runs: on a
shared machine medians mostly measure the neighbours) and the sparse one must be at least
``min_speedup`` × faster; with ``measure=False`` a layer goes sparse when its density is
at most ``density_threshold`` (default 0.1: on the 2-core AVX-512 machine these were measured on,
CSR was 1.5–2.4× faster than MKL's dense GEMM at density 0.1 for 1024² and 4096² layers at batch
1 and 64, and broke even around density 0.2–0.3; see benchmarks/inference.py).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings

import torch
from torch import nn
import torch.nn.functional as F

from .. import native
from . import ops
from .ops import _csr

DENSITY_THRESHOLD = 0.1
CONV_DENSITY_LIMIT = 0.1          # denser convs are not even timed: im2col alone costs more than MKL-DNN
MIN_SPEEDUP = 1.1


def _csr_parts(w2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = w2d.detach().to_sparse_csr()
    return s.crow_indices().to(torch.int32), s.col_indices().to(torch.int32), s.values().clone()


KERNELS = ("addmm", "spmm_sum", "native")


def available_kernels() -> tuple[str, ...]:
    """The kernels worth timing here: ``native`` needs :mod:`sparsetrain.native`'s compiled library."""
    return KERNELS if native.lib() is not None else KERNELS[:2]


_never = (lambda: False)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _never)
_is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", _never)


def _graph_capture() -> bool:
    """True while torch.jit.trace, torch.compile or torch.export records the forward (called on
    every layer call: < 1 µs)."""
    return torch._C._get_tracing_state() is not None or _is_compiling() or _is_exporting()


def _onnx_export() -> bool:
    """True inside ``torch.onnx.export`` (~7 µs: asked only when a graph is being recorded)."""
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and getattr(onnx, "is_in_onnx_export", _never)())


class _SparseBase(nn.Module):
    """Holds ``crow`` / ``col`` (int32) / ``values`` buffers and a cached CSR tensor over them.

    ``kernel`` picks the product for more than one column: ``"addmm"`` (MKL's sparse × dense,
    int32 indices), ``"spmm_sum"`` (``torch.sparse.mm(W, x, "sum")``, ATen's vectorised
    row-parallel SpMM, which needs int64 indices and was 10–35 % faster at batch ≥ 64 but 2×
    slower at batch 16) or ``"native"`` (:func:`sparsetrain.native.csr_matmul_t`: each row's 64
    output columns stay in vector registers across its nonzeros; 2.5-4× faster than MKL at batch
    64 on the development machine; CPU float32 only, else it falls back to addmm). A single column
    always uses ``torch.mv`` / ``addmv`` (MKL's gather loop was ≈ 20 % faster than ours).
    """

    kernel: str = "addmm"

    def _init_sparse(self, w2d: torch.Tensor, bias: torch.Tensor | None) -> None:
        crow, col, values = _csr_parts(w2d)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._shape2d = tuple(w2d.shape)
        self._cache = None

    def _cached(self) -> dict:
        key = (self.crow.data_ptr(), self.col.data_ptr(), self.values.data_ptr(), self.values.device)
        if self._cache is None or self._cache["key"] != key:
            self._cache = {"key": key, "csr32": _csr(self.crow, self.col, self.values, self._shape2d)}
        return self._cache

    def weight_csr(self) -> torch.Tensor:
        return self._cached()["csr32"]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight_2d(self) -> torch.Tensor:
        return self.weight_csr().to_dense()

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x (+ bias)`` for one vector ``x`` (eager only: MKL's matrix-vector product on the
        cached CSR tensor, without the view ops of the general path, which cost as much)."""
        w = self.weight_csr()
        return torch.mv(w, x) if self.bias is None else torch.addmv(self.bias, w, x)

    def _matmul_t(self, xt: torch.Tensor) -> torch.Tensor:
        """``W @ xt (+ bias)``: (out, N) from ``xt`` (in, N), through the registered operator
        ``torch.ops.sparsetrain.csr_matmul_t`` (ops.py), which graph tools see and trace; inside
        ``torch.onnx.export`` the same product in standard operators, which ONNX has."""
        if type(xt) is torch.Tensor and not _graph_capture():
            # plain eager call: the op's own implementation without the dispatcher's ~50 µs
            # (fake / functional / traced tensors are subclasses or seen by _graph_capture)
            c = self._cached()
            if self.kernel == "spmm_sum" and "csr64" not in c:
                c["csr64"] = _csr(self.crow.long(), self.col.long(), self.values, self._shape2d)
            return ops.reference(self.crow, self.col, self.values, xt, self.bias, self.kernel,
                                 csr=c["csr32"], csr64=c.get("csr64"))
        if _onnx_export():
            return ops.densified(self.crow, self.col, self.values, xt, self.bias)
        return ops.csr_matmul_t(self.crow, self.col, self.values, xt, self.bias, self.kernel)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_cache"] = None                    # the CSR views are rebuilt from the buffers
        return state

    def extra_repr(self) -> str:
        return f"nnz={self.nnz}, kernel={self.kernel}"


class SparseLinear(_SparseBase):
    """Inference-only ``nn.Linear`` with a CSR weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = weight if weight is not None else torch.zeros(out_features, in_features)
        self._init_sparse(w.reshape(out_features, in_features), bias)

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> "SparseLinear":
        return cls(layer.in_features, layer.out_features, layer.weight.detach(),
                   None if layer.bias is None else layer.bias.detach())

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight_2d())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():                 # inference only: no autograd through CSR
            with torch.no_grad():
                return self.forward(x)
        if x.dim() == 2:
            if x.shape[0] == 1 and type(x) is torch.Tensor and not _graph_capture():
                return self._matvec(x[0]).unsqueeze(0)
            return self._matmul_t(x.t().contiguous()).t()     # in a graph: the op, for every batch size
        lead = x.shape[:-1]
        y = self._matmul_t(x.reshape(-1, self.in_features).t().contiguous()).t()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


class SparseConv2d(_SparseBase):
    """Inference-only ``nn.Conv2d`` (groups=1, zero padding): im2col + CSR product."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d: only groups=1 and numeric zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self._init_sparse(conv.weight.detach().reshape(conv.out_channels, -1),
                          None if conv.bias is None else conv.bias.detach())

    @classmethod
    def from_dense(cls, layer: nn.Conv2d) -> "SparseConv2d":
        return cls(layer)

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight_2d().reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.forward(x)
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if _graph_capture():
            # a graph must not unroll the per-sample loop below over the example's batch size:
            # one im2col of the whole batch, (C·k·k, B·H·W), one product
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            y = self._matmul_t(cols.transpose(0, 1).reshape(cols.shape[1], -1))
            return y.reshape(self.out_channels, b, ho * wo).transpose(0, 1).reshape(b, self.out_channels, ho, wo)
        # one sample at a time: its im2col matrix (C·k·k, H·W) is already the right layout and
        # stays in cache, where a whole-batch one needs a transpose copy of B× the size
        out = x.new_empty(b, self.out_channels, ho * wo)
        for i in range(b):
            cols = F.unfold(x[i:i + 1], self.kernel_size, self.dilation, self.padding, self.stride)[0]
            out[i] = self._matmul_t(cols)
        return out.view(b, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {super().extra_repr()}")


SPARSE_TYPES = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def can_sparsify(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def time_candidates(fns: dict, *, budget_s: float = 0.1, min_reps: int = 3, max_reps: int = 25,
                    warmup: int = 2, give_up: float = 4.0, stat: str = "median") -> dict[str, float]:
    """Seconds per call of each zero-argument function (``stat``: "median" or "min" of the runs),
    timed round-robin after ``warmup`` calls.

    The first entry is the baseline: a candidate whose first call takes over ``give_up`` × the
    baseline's is dropped at once (reported with that first time), so hopeless kernels cost one call.
    """
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k] = [time.perf_counter() - t0]
        base = next(iter(times))
        live = {k: f for k, f in fns.items() if k == base or times[k][0] <= give_up * times[base][0]}
        for _ in range(warmup - 1):
            for f in live.values():
                f()
        for k in live:
            times[k] = []
        start, n = time.perf_counter(), 0
        while n < max_reps and (n < min_reps or time.perf_counter() - start < budget_s):
            for k, f in live.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
            n += 1
    reduce = min if stat == "min" else statistics.median
    return {k: reduce(v) for k, v in times.items()}


def time_pair(fa, fb, **kwargs) -> tuple[float, float]:
    """Median seconds of ``fa()`` and ``fb()`` (see :func:`time_candidates`)."""
    t = time_candidates({"a": fa, "b": fb}, **kwargs)
    return t["a"], t["b"]


def _make_sparse(m: nn.Module, kernel: str = "addmm") -> _SparseBase:
    sp = SPARSE_TYPES[type(m)].from_dense(m)
    sp.kernel = kernel
    return sp


def _density(m: nn.Module) -> float:
    w = m.weight.detach()
    return float(torch.count_nonzero(w)) / max(w.numel(), 1)


def sparsify(model: nn.Module, batch_size: int = 64, in_shape=None, *, measure: bool = True,
             density_threshold: float = DENSITY_THRESHOLD, min_speedup: float = MIN_SPEEDUP,
             choices: dict[str, str] | None = None) -> list[dict]:
    """Replace, in place, each Linear / Conv2d of ``model`` by its sparse version where that is faster.

    ``choices`` (layer name -> "dense" | "sparse" | "sparse:KERNEL", KERNEL one of
    :data:`KERNELS`) forces the decision (e.g. read from a file); otherwise ``measure=True`` times
    the dense layer and each sparse kernel on the layer's input for ``batch_size`` samples (input
    shapes come from one forward pass of ``in_shape``; MLPs need no ``in_shape``) and takes the
    fastest sparse kernel if it beats dense by ``min_speedup``; ``measure=False`` goes sparse
    (addmm) when ``density <= density_threshold``. Linear layers denser than 0.5 and convs denser
    than :data:`CONV_DENSITY_LIMIT` are never timed. Returns one row per layer: layer, kind,
    density, choice, kernel, dense_ms, sparse_ms (the chosen or best sparse kernel's time).
    """
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if can_sparsify(m)]
    shapes = {}
    if measure and choices is None:
        from .shrink import record_shapes
        if in_shape is None:
            first = next((m for _, m in layers if isinstance(m, nn.Linear)), None)
            if any(isinstance(m, nn.Conv2d) for _, m in layers) or first is None:
                measure = False
            else:
                in_shape = (first.in_features,)
        if measure:
            shapes = record_shapes(model, in_shape)
    report = []
    for name, m in layers:
        d = _density(m)
        row = {"layer": name, "kind": type(m).__name__, "density": d, "kernel": None,
               "dense_ms": None, "sparse_ms": None}
        kernel = "addmm"
        if choices is not None:
            choice, _, kernel = choices.get(name, "dense").partition(":")
            kernel = kernel or "addmm"
            if choice not in ("dense", "sparse") or kernel not in KERNELS:
                from ..errors import UsageError
                raise UsageError(f"layers[{name!r}]: unknown value {choices[name]!r}; allowed: dense, sparse, "
                                 + ", ".join(f"sparse:{k}" for k in KERNELS))
        elif d > (0.5 if isinstance(m, nn.Linear) else CONV_DENSITY_LIMIT):
            choice = "dense"
        elif not measure or id(m) not in shapes:
            choice = "sparse" if d <= density_threshold else "dense"
        else:
            x = torch.randn((batch_size,) + tuple(shapes[id(m)][0][1:]), dtype=m.weight.dtype)
            fns = {"dense": lambda: m(x)}
            # one column per sample for a Linear: batch 1 is a matvec, where the kernels are the same
            ncols = batch_size * (math.prod(shapes[id(m)][1][2:]) if isinstance(m, nn.Conv2d) else 1)
            for k in (available_kernels() if ncols > 1 else KERNELS[:1]):
                fns[k] = (lambda sp=_make_sparse(m, k): sp(x))
            t = time_candidates(fns, stat="min")     # min: what the layer costs without the neighbours
            kernel = min((k for k in fns if k != "dense"), key=t.get)
            row["dense_ms"], row["sparse_ms"] = t["dense"] * 1e3, t[kernel] * 1e3
            choice = "sparse" if t[kernel] * min_speedup < t["dense"] else "dense"
        row["choice"] = choice if choice == "dense" or kernel == "addmm" else f"sparse:{kernel}"
        if choice == "sparse":
            row["kernel"] = kernel
            _replace(model, name, _make_sparse(m, kernel))
        report.append(row)
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place (sparse layers back to nn.Linear / nn.Conv2d)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, _SparseBase):
            _replace(model, name, m.to_dense())
    return model
