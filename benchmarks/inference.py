"""CPU inference benchmark: dense vs every export format (not a test; ~2-3 minutes on 2 cores).

    python benchmarks/inference.py [--run RUN_DIR] [--threads N] [--repeats R] [--no-variants]

1. LeNet-300-100 at a trained-like sparsity: the model of ``--run`` (pruned further by magnitude
   if ``--prune`` is given), else a fresh one magnitude-pruned layer by layer to 98 %; each export
   format is written, reloaded (the sparse one with its layers chosen for the batch size being
   timed) and timed at batch 1 and 64.
2. A 3-layer 4096×4096 MLP at 90 / 95 / 98 / 99 % sparsity: dense vs the sparse format, plus the
   compressed file size.
3. (unless --no-variants) The kernels tried for one 4096×4096 layer at 98 %: CSR with int64 / int32
   indices, torch.sparse.mm vs addmm vs mv vs sparse.mm(reduce="sum"), sparse weight @ inputᵀ vs
   input @ sparse weightᵀ, COO, BSR, a gather + segment-sum matvec, and 1 vs all threads.

Latency is the median over ``--repeats`` round-robin runs after warm-up (all candidates of a
row are timed alternately, so machine noise hits them alike). speedup = dense / format;
ideal = 1 / density of the Linear/Conv weights; "of ideal" = speedup / ideal.

``--device cuda`` measures the GPU exports instead (CUDA events, round-robin, median): one
Linear of 4096×4096 and the GPT-2-small MLP pair (768→3072, 3072→768) at batch 1 / 16 / 256 in
fp16 and bf16 -- dense ``F.linear`` vs the 2:4 semi-structured weight (``to_semi_structured``,
NVIDIA sparse tensor cores) vs CSR (cuSPARSE through ``torch.sparse``) at 95 % and 99 %
unstructured sparsity. ``--device cpu --gpu-shapes-only`` runs the same code on a CPU with tiny
shapes (semi-structured then falls back to dense; a check of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from sparsetrain import native
from sparsetrain.export import FORMATS, export_model, load_export, load_run, magnitude_prune, sparsify
from sparsetrain.export.sparse_modules import KERNELS, SparseLinear
from sparsetrain.models import build_model

warnings.filterwarnings("ignore", message=".*Sparse.*")


def _lap(f, device: str):
    """Run ``f`` once; returns a reader of its milliseconds (CUDA: a pair of recorded events,
    to be read after a synchronize)."""
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        return lambda: a.elapsed_time(b)
    t0 = time.perf_counter()
    f()
    ms = (time.perf_counter() - t0) * 1e3
    return lambda: ms


def timed(fns: dict, repeats: int, warmup: int = 3, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds of each zero-argument function, timed round-robin; CUDA events on a GPU."""
    laps = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(warmup):
                f()
        for _ in range(repeats):
            for k, f in fns.items():
                laps[k].append(_lap(f, device))
        if device == "cuda":
            torch.cuda.synchronize()
    return {k: statistics.median(read() for read in v) for k, v in laps.items()}


def weight_density(model: nn.Module) -> float:
    from sparsetrain.params import prunable_weights
    ws = [w for _, w in prunable_weights(model)]
    return sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def table(title: str, head: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    sys.stdout.flush()


def lenet(args, tmp: Path) -> None:
    in_shape = (1, 28, 28)
    if args.run:
        model, info = load_run(args.run)
        in_shape = tuple(info["in_shape"])
        if args.prune is not None:
            magnitude_prune(model, args.prune, scope="layer")
        source = f"run {args.run}"
    else:
        torch.manual_seed(0)
        model = build_model("lenet300", in_shape, 10).eval()
        magnitude_prune(model, args.prune if args.prune is not None else 0.98, scope="layer")
        source = "fresh LeNet-300-100, magnitude-pruned per layer"
    d = weight_density(model)
    paths = {f: export_model(model, f, tmp / f"lenet.{f}.safetensors", in_shape=in_shape, batch_size=64)
             for f in FORMATS}
    sizes = {f: p.stat().st_size for f, p in paths.items()}
    rows = []
    for bs in (1, 64):
        models = {"dense (original)": model}
        models.update({f: load_export(p, model=copy.deepcopy(model) if f in ("dense", "compressed") else None,
                                      batch_size=bs if f == "sparse" else None) for f, p in paths.items()})
        x = torch.randn(bs, *in_shape)
        lat = timed({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats)
        base = lat["dense (original)"]
        for k, ms in lat.items():
            sp = base / ms
            size = sizes.get(k)
            rows.append([k, bs, ms, sp, 1 / d, sp * d,
                         f"{size / sizes['dense']:.4f}" if size else "-"])
    table(f"LeNet-300-100 ({source}; density {d:.4f}; torch threads {torch.get_num_threads()})",
          ["format", "batch", "ms", "speedup", "ideal", "of ideal", "file / dense"], rows)


_SHORT = {"sparse:native": "nat", "dense": "d", "sparse": "csr", "sparse:spmm_sum": "sum"}


def big_mlp(args, tmp: Path) -> None:
    n = 4096
    rows = []
    for sparsity in (0.9, 0.95, 0.98, 0.99):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n)).eval()
        magnitude_prune(model, sparsity, scope="layer")
        d = weight_density(model)
        comp = export_model(model, "compressed", tmp / "mlp.compressed.safetensors").stat().st_size
        dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        for bs in (1, 64):
            sparse = copy.deepcopy(model)
            choice = sparsify(sparse, bs)
            x = torch.randn(bs, n)
            lat = timed({"dense": lambda: model(x), "sparse": lambda: sparse(x)}, args.repeats)
            sp = lat["dense"] / lat["sparse"]
            rows.append([f"{sparsity:.0%}", bs, lat["dense"], lat["sparse"], sp, 1 / d, sp * d,
                         "/".join(_SHORT[r["choice"]] for r in choice), f"{comp / dense_bytes:.4f}"])
    table(f"3 × Linear(4096, 4096) MLP (torch threads {torch.get_num_threads()}; layers as chosen by timing: "
          f"d = dense, csr = CSR addmm/mv, sum = CSR sparse.mm(reduce='sum'), nat = sparsetrain.native)",
          ["sparsity", "batch", "dense ms", "sparse ms", "speedup", "ideal", "of ideal", "layers",
           "compressed / dense"], rows)


def variants(args) -> None:
    n, density = 4096, 0.02
    torch.manual_seed(0)
    lin = nn.Linear(n, n)
    magnitude_prune(lin, 1 - density, scope="layer")
    w = lin.weight.detach()
    csr64 = w.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(csr64.crow_indices().int(), csr64.col_indices().int(), csr64.values(),
                                    w.shape)
    coo = w.to_sparse().coalesce()
    bsr = w.to_sparse_bsr((4, 4))
    row = torch.repeat_interleave(torch.arange(n), csr64.crow_indices().diff())
    col, vals, lengths = csr64.col_indices(), csr64.values(), csr64.crow_indices().diff()
    threads = torch.get_num_threads()
    rows = []
    for bs in (1, 64):
        x = torch.randn(bs, n)
        xt = x.t().contiguous()
        fns = {
            "dense F.linear": lambda: F.linear(x, w),
            "CSR int64, sparse.mm(W, xᵀ)": lambda: torch.sparse.mm(csr64, xt),
            "CSR int32, sparse.mm(W, xᵀ)": lambda: torch.sparse.mm(csr32, xt),
            "CSR int32, addmm(b, W, xᵀ)": lambda: torch.addmm(lin.bias.detach()[:, None], csr32, xt),
            "CSR int64, sparse.mm(W, xᵀ, reduce='sum')": lambda: torch.sparse.mm(csr64, xt, "sum"),
            "CSR int32, sparse.mm(W, x.t()) (non-contiguous)": lambda: torch.sparse.mm(csr32, x.t()),
            "CSR int32, F.linear(x, W) = x @ Wᵀ": lambda: F.linear(x, csr32),
            "COO, sparse.mm(W, xᵀ)": lambda: torch.sparse.mm(coo, xt),
        }
        if bs == 1:
            fns["CSR int32, mv(W, x)"] = lambda: torch.mv(csr32, x[0])
            fns["CSR int64, mv(W, x)"] = lambda: torch.mv(csr64, x[0])
            fns["gather x[col]·v + segment_reduce"] = lambda: torch.segment_reduce(
                x[0].index_select(0, col) * vals, "sum", lengths=lengths)
            fns["gather x[col]·v + index_add_"] = lambda: torch.zeros(n).index_add_(
                0, row, x[0].index_select(0, col) * vals)
        fns["BSR 4×4, sparse.mm(W, xᵀ)"] = lambda: torch.sparse.mm(bsr, xt)
        for kernel in KERNELS:
            sp = SparseLinear.from_dense(lin)
            sp.kernel = kernel
            fns[f"SparseLinear, kernel={kernel} (library)"] = (lambda s=sp: s(x))
        for th in sorted({1, threads}):
            torch.set_num_threads(th)
            lat = timed(fns, max(5, args.repeats // 2), warmup=2)
            base = lat["dense F.linear"]
            rows += [[k, bs, th, ms, base / ms, base / ms * density] for k, ms in lat.items()]
        torch.set_num_threads(threads)
    table(f"One Linear(4096, 4096) at 98 % sparsity: kernels tried",
          ["kernel", "batch", "threads", "ms", "speedup", "of ideal"], rows)


def gpu_linears(args) -> None:
    """Dense vs semi-structured (2:4) vs CSR linears on a GPU (see the module docstring)."""
    from sparsetrain.export import to_semi_structured
    from sparsetrain.nm import project_
    device = args.device
    shapes = [(4096, 4096), (768, 3072), (3072, 768)] if not args.gpu_shapes_only else [(64, 64), (32, 64)]
    batches = (1, 16, 256) if not args.gpu_shapes_only else (1, 16)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for n_in, n_out in shapes:
            torch.manual_seed(0)
            dense = nn.Linear(n_in, n_out, device=device, dtype=dtype)
            nm24 = copy.deepcopy(dense)
            project_(nm24, 2, 4)
            report = to_semi_structured(nm24)[0]
            csr = {}
            for sp in (0.95, 0.99):
                w = magnitude_prune(copy.deepcopy(dense), sp).weight.detach()
                try:
                    csr[sp] = w.to_sparse_csr()
                except (RuntimeError, NotImplementedError):
                    pass
            for bs in batches:
                x = torch.randn(bs, n_in, device=device, dtype=dtype)
                fns = {"dense": lambda: dense(x), "2:4 semi-structured": lambda: nm24(x)}
                for sp, W in csr.items():
                    fns[f"CSR {sp:.0%}"] = (lambda W=W: torch.sparse.mm(W, x.t()))
                try:
                    lat = timed(fns, args.repeats, device=device)
                except (RuntimeError, NotImplementedError) as e:   # a kernel missing for this dtype/shape
                    fns = {k: f for k, f in fns.items() if not k.startswith("CSR")}
                    lat = timed(fns, args.repeats, device=device)
                    lat.update({k: float("nan") for k in ("CSR 95%", "CSR 99%")})
                    print(f"(CSR {str(dtype)[6:]} {n_in}→{n_out} b{bs}: {' '.join(str(e).split())[:100]})")
                base = lat["dense"]
                rows.append([f"{n_in}→{n_out}", str(dtype).replace("torch.", ""), bs, base,
                             *[f"{lat[k]:.3f} ({base / lat[k]:.2f}×)" if k in lat else "-"
                               for k in ("2:4 semi-structured", "CSR 95%", "CSR 99%")],
                             "yes" if report["semi_structured"] else report["reason"][:40]])
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (script check)"
    table(f"GPU linears on {name}: ms (speedup vs dense)",
          ["linear", "dtype", "batch", "dense ms", "2:4 semi-structured", "CSR 95 %", "CSR 99 %", "2:4 kernel"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a run directory to take LeNet-300-100 from")
    p.add_argument("--prune", type=float, default=None, help="magnitude-prune to this sparsity (default 0.98 "
                   "without --run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-variants", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU exports (see above)")
    p.add_argument("--gpu-shapes-only", action="store_true", help="run the GPU section only, with tiny shapes "
                   "(a CPU check of the script)")
    args = p.parse_args(argv)
    if args.device == "cuda" or args.gpu_shapes_only:
        print(f"torch {torch.__version__}, device {args.device}")
        gpu_linears(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MKL {torch.backends.mkl.is_available()}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{native.status()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lenet(args, Path(tmp))
        big_mlp(args, Path(tmp))
    if not args.no_variants:
        variants(args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
