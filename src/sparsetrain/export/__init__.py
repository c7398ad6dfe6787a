"""Deployable sparse models: smaller files, smaller networks, faster CPU inference.

Four export formats, all one safetensors file (never pickle) with its description in the
safetensors metadata (``sparsetrain_format``, ``format_version``, ``model``, ``in_shape``,
``num_classes``, ``codings``, ...):

==========  =====================================================================================
dense       the plain state dict with the zeros baked in (pruning masks / parametrizations
            applied); ``safetensors.torch.load_file`` + ``model.load_state_dict`` reads it
compressed  every tensor in its smallest lossless coding: nonzero values plus a bitmask, CSR
            indices or a one-byte gap stream (codec.py); loads back bit-for-bit
shrunk      all-zero neurons / filters removed, their constant outputs folded into the next
            layer (shrink.py); a smaller dense ``nn.Sequential`` rebuilt from a JSON architecture
            (arch.py) without the original class — or, for any other torch.fx-traceable model, a
            ``torch.fx.GraphModule`` from its JSON graph (graph.py, graph_shrink.py)
sparse      the shrunk network with each Linear / Conv2d that runs faster as a ``torch.sparse``
            CSR product replaced by SparseLinear / SparseConv2d (sparse_modules.py), chosen per
            layer by timing both for a batch size at export time (or again at load time)
semi-       the dense state (compressed coding) of a model whose Linear weights are 2:4 sparse
structured  (``--pattern 2:4``); loading swaps each 2:4 Linear weight for
            ``torch.sparse.to_sparse_semi_structured`` on a CUDA device in fp16/bf16 (NVIDIA's
            sparse tensor cores) and keeps it dense elsewhere (semi_structured.py); the model's
            ``semi_structured`` attribute lists what was swapped and why not
==========  =====================================================================================

dense / compressed files of a non-Sequential model carry its graph too when it can be traced
(else ``load_export(path, model=MyNet())``). Deployment through torch.export / ONNX: deploy.py.

Python::

    export_model(model, "compressed", "m.safetensors", model_name="lenet300", in_shape=(1, 28, 28))
    model = load_export("m.safetensors")               # or load_export(path, model=my_model)

CLI: ``sparsetrain export RUN_DIR --format FORMAT [--out FILE]`` and ``sparsetrain inspect RUN_DIR``
(which calls :func:`inspect_exports`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError, check, choice
from . import codec
from .arch import BiasMap, Residual, canonical, from_spec, register_converter, to_spec
from .shrink import shrink
from .semi_structured import semi_structured_layers, to_semi_structured
from .sparse_modules import SparseConv2d, SparseLinear, densify, sparsify

FORMATS = ("dense", "compressed", "shrunk", "sparse", "semi-structured")

__all__ = ["FORMATS", "describe", "export_model", "load_export", "export_info", "print_export_info", "load_run", "export_run",
           "inspect_exports", "magnitude_prune", "shrink", "sparsify", "densify", "canonical", "to_spec",
           "from_spec", "register_converter", "SparseLinear", "SparseConv2d", "Residual", "BiasMap",
           "to_semi_structured",
           "configure_parser", "run_cli"]


# ----------------------------------------------------------------------------- helpers
def _baked_copy(model: nn.Module, threshold: float = 0.0) -> nn.Module:
    """A deep copy with pruning reparametrizations applied and |w| <= threshold zeroed."""
    from torch.nn.utils import parametrize, prune
    from ..params import prunable_weights, unwrap
    model = unwrap(model)
    # torch.nn.utils.prune keeps the masked weight as a plain non-leaf attribute, which deepcopy
    # refuses: take it off while copying (prune.remove below recomputes it from orig × mask)
    computed = [(mod, hook._tensor_name, mod.__dict__.pop(hook._tensor_name))
                for mod in model.modules() for hook in mod._forward_pre_hooks.values()
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in mod.__dict__]
    try:
        m = copy.deepcopy(model)
    finally:
        for mod, name, value in computed:
            setattr(mod, name, value)
    for mod in m.modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(mod, hook._tensor_name)
        if parametrize.is_parametrized(mod):
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    if threshold > 0:
        with torch.no_grad():
            for _, w in prunable_weights(m):
                w[w.abs() <= threshold] = 0
    return m.eval()


def _bake_state(sd: dict) -> dict:
    """State dict with ``module.`` prefixes stripped and ``X_orig`` × ``X_mask`` merged into ``X``."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = dict(sd)
    for k in list(sd):
        if k.endswith("_orig") and k[:-5] + "_mask" in sd:
            base = k[:-5]
            out[base] = sd[k] * sd[base + "_mask"]
            del out[k], out[base + "_mask"]
    return out


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global") -> nn.Module:
    """Zero, in place, the smallest-magnitude Linear/Conv weights until ``sparsity`` of them are zero
    (``scope="global"`` ranks all layers together, ``"layer"`` prunes each layer to ``sparsity``)."""
    from ..params import prunable_weights
    check(0.0 <= sparsity < 1.0, "sparsity", "in [0, 1)", sparsity)
    choice(scope, "scope", ("global", "layer"))
    weights = [w for _, w in prunable_weights(model)]
    with torch.no_grad():
        groups = [[w] for w in weights] if scope == "layer" else [weights]
        for group in groups:
            flat = torch.cat([w.detach().abs().reshape(-1) for w in group])
            k = int(round(sparsity * flat.numel()))
            if k:
                cut = flat.kthvalue(k).values           # ties at the cut are pruned together
                for w in group:
                    w[w.abs() <= cut] = 0
    return model


def _dense_size(state: dict) -> int:
    """Bytes of the dense format of ``state`` (header included)."""
    from safetensors.torch import save
    return len(save({k: v.detach().contiguous() for k, v in state.items()},
                    metadata={"sparsetrain_format": "dense"}))


def _weight_stats(model: nn.Module) -> dict:
    from ..params import prunable_weights
    total = nnz = 0
    for _, w in prunable_weights(model):
        total += w.numel()
        nnz += int(torch.count_nonzero(w.detach()))
    return {"weights": total, "nonzeros": nnz, "density": nnz / total if total else 1.0}


# ----------------------------------------------------------------------------- export / load
def export_model(model: nn.Module, format: str, path: str | os.PathLike, *, model_name: str | None = None,
                 in_shape=None, num_classes: int | None = None, batch_size: int = 64, measure: bool = True,
                 threshold: float = 0.0) -> Path:
    """Write ``model`` to ``path`` in ``format`` (one of :data:`FORMATS`); returns the path.

    ``model_name`` / ``num_classes`` (a name of ``sparsetrain.models.MODELS``) let
    :func:`load_export` rebuild dense / compressed exports without a model; ``in_shape`` (C, H, W)
    is needed by shrunk / sparse exports of conv nets. ``batch_size`` / ``measure``: how the
    sparse format chooses its sparse layers. ``threshold``: weights with |w| <= threshold are
    zeroed first (for methods that leave near-zeros).
    """
    choice(format, "format", FORMATS)
    check(batch_size >= 1, "batch_size", ">= 1", batch_size)
    check(threshold >= 0, "threshold", ">= 0", threshold)
    m = _baked_copy(model, threshold)
    meta = {"sparsetrain_format": format, "model": model_name or "",
            "in_shape": list(in_shape) if in_shape is not None else None, "num_classes": num_classes}
    extra = _weight_stats(m)
    if format in ("dense", "compressed", "semi-structured"):
        state = m.state_dict()
        if format == "semi-structured":
            extra["semi_structured_layers"] = semi_structured_layers(m)
        try:                                   # lets load_export rebuild it without its class or name
            meta["architecture"] = describe(m)
        except UsageError as e:
            extra["architecture"] = f"not stored: {e}"
    else:
        seq, report = shrink(m, in_shape)
        meta["architecture"] = to_spec(seq)
        extra["shrink"] = report
        if format == "sparse":
            layers = sparsify(copy.deepcopy(seq), batch_size, in_shape, measure=measure)
            meta["layers"] = {r["layer"]: r["choice"] for r in layers}
            meta["batch_size"] = str(batch_size)
            extra["sparse_layers"] = layers
        state = seq.state_dict()
    meta["extra"] = extra
    return codec.write_file(path, state, meta, compress=format in ("compressed", "sparse", "semi-structured"))


def describe(model: nn.Module) -> dict:
    """The JSON architecture of ``model`` whose rebuilt module loads ``model``'s state dict: a plain
    ``nn.Sequential`` of known modules as such, any other model as its torch.fx graph (graph.py).
    A UsageError says why a model cannot be described."""
    from .graph import same_state_keys, trace
    if type(model) is nn.Sequential:
        try:
            return to_spec(model)
        except UsageError:
            pass
    gm = trace(model)
    if not same_state_keys(gm, model):
        raise UsageError(f"model: {type(model).__name__} has parameters or buffers its forward never uses; "
                         f"its graph would not load its state dict")
    return to_spec(gm)


def export_info(path: str | os.PathLike) -> dict:
    """The metadata of an export (JSON fields parsed) plus ``file_bytes``."""
    meta, _ = codec.read_file(path)
    meta["file_bytes"] = Path(path).stat().st_size
    return meta


def print_export_info(path: str | os.PathLike, file=None) -> dict:
    """``sparsetrain inspect FILE``: what an export holds (format, model, weights, per-layer choices)."""
    out = file or sys.stdout
    meta = export_info(path)
    extra = meta.get("extra") or {}
    arch = meta.get("architecture") or {}
    print(f"{path}: {meta.get('sparsetrain_format')} export, {_fmt_bytes(meta['file_bytes'])}, model "
          f"{meta.get('model') or '-'} ({'architecture: ' + arch['type'] if arch else 'no architecture: load with model='}), "
          f"in_shape {meta.get('in_shape')}, num_classes {meta.get('num_classes')}", file=out)
    if "weights" in extra:
        print(f"weights {extra['weights']:,}, nonzeros {extra['nonzeros']:,}, density {extra['density']:.4f}", file=out)
    for row in extra.get("shrink") or []:
        print(f"  {row['layer']:<24} units {row['units']:>6} -> {row['kept']:>6}", file=out)
    for name, how in (meta.get("layers") or {}).items():
        print(f"  {name:<24} {how}", file=out)
    return meta


def _load_into(model: nn.Module, state: dict, where: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        text = " ".join(str(e).split()).replace("Error(s) in loading state_dict for ", "")
        raise UsageError(f"{where}: does not match the model ({text[:200]}{'...' if len(text) > 200 else ''})"
                         ) from None
    return model


def load_export(path: str | os.PathLike, model: nn.Module | None = None, *, batch_size: int | None = None,
                measure: bool = True) -> nn.Module:
    """Load an export written by :func:`export_model` (or ``sparsetrain export``), in eval mode.

    semi-structured: loaded like dense, then every 2:4 Linear weight is swapped for its
    semi-structured form where the GPU kernels run (see :func:`to_semi_structured`; on a CPU the
    model stays dense). The model's ``semi_structured`` attribute holds the per-layer report; to
    run it on a GPU, load, move it (``.cuda().half()``) and call ``to_semi_structured(model)``.
    """
    meta, state = codec.read_file(path)
    model = _load_export(path, meta, state, model, batch_size=batch_size, measure=measure)
    if meta["sparsetrain_format"] == "semi-structured":
        model.semi_structured = to_semi_structured(model)
    return model


def _load_export(path: str | os.PathLike, meta: dict, state: dict, model: nn.Module | None = None, *,
                 batch_size: int | None = None, measure: bool = True) -> nn.Module:
    """The loader of every format, from the file's (``meta``, ``state``) (see :func:`load_export`).

    dense / compressed: into ``model`` if given, else into a fresh ``build_model(meta.model, ...)``,
    else (a Sequential exported without a library name) rebuilt from the stored architecture.
    shrunk / sparse: an ``nn.Sequential`` (or ``torch.fx.GraphModule``) rebuilt from the file's
    architecture (a ``model`` is refused: its weights would stay untouched).
    sparse: the per-layer sparse/dense choice stored at export time is used, unless ``batch_size``
    is given: then both are timed again on this machine for that batch size.
    """
    fmt = meta["sparsetrain_format"]
    choice(fmt, f"export {path}: sparsetrain_format", FORMATS)
    if model is not None and fmt in ("shrunk", "sparse"):   # else the caller's model keeps its own weights
        raise UsageError(f"model: a {fmt} export is rebuilt from its own (cut) architecture and loads into no "
                         f"given model; allowed: model= for dense, compressed or semi-structured exports, "
                         f"or load_export({str(path)!r}) without model=")
    if fmt in ("dense", "compressed", "semi-structured"):
        from ..models import MODELS, build_model
        name = meta.get("model") or ""
        if model is None and name in MODELS:
            model = build_model(name, tuple(meta.get("in_shape") or (1, 28, 28)), int(meta.get("num_classes") or 10))
        if model is None and "architecture" not in meta:
            raise UsageError(f"model: export {path} names no library model ({name!r}) and has no architecture; "
                             f"pass model=, or export with model_name= one of {', '.join(MODELS)}")
        if model is not None:
            return _load_into(model, state, f"export {path}").eval()
    if "architecture" not in meta:
        raise UsageError(f"export {path}: a {fmt} export without an architecture (corrupt)")
    try:
        seq = from_spec(meta["architecture"])
    except UsageError as e:
        raise UsageError(f"export {path}: {e}") from None
    _load_into(seq, state, f"export {path}").eval()
    if fmt == "sparse":
        if batch_size is not None:
            check(batch_size >= 1, "batch_size", ">= 1", batch_size)
            sparsify(seq, batch_size, meta.get("in_shape"), measure=measure)
        else:
            layers = meta.get("layers") or {}
            if not isinstance(layers, dict):
                raise UsageError(f"export {path}: layers must be a JSON object (corrupt)")
            try:
                sparsify(seq, choices=layers)
            except UsageError as e:
                raise UsageError(f"export {path}: {e}") from None
    return seq


# ----------------------------------------------------------------------------- run directories
def load_run(run_dir: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The trained model of a run directory (eval mode) and {model, data, in_shape, num_classes}.

    A run of a user model (``train(model=MyNet())``) is rebuilt as :mod:`sparsetrain.usermodel`
    describes: into ``model`` if given, else its class if imported, else its recorded architecture."""
    from .. import usermodel
    from ..checkpoint import load_checkpoint
    from ..data import dataset_info
    from ..models import build_model
    run = Path(run_dir)
    allowed = "allowed: a run directory written by `sparsetrain train --out`"
    if not run.is_dir():
        raise UsageError(f"RUN_DIR: {run} is not a directory; {allowed}")
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"RUN_DIR: {run} has no config.json; {allowed}")
    try:
        cfg = json.loads(cfg_path.read_text())
        name, data = cfg["model"], cfg["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"RUN_DIR: {cfg_path} is not a sparsetrain config ({e}); {allowed}") from None
    ck = load_checkpoint(run / "checkpoint.pt")
    if not isinstance(ck.get("model"), dict):
        raise UsageError(f"checkpoint {run / 'checkpoint.pt'}: has no 'model' state dict")
    state = _bake_state(ck["model"])
    entry = usermodel.read(run)
    if entry is not None:
        in_shape, num_classes = tuple(entry["in_shape"]), int(entry["num_classes"])
        model = usermodel.rebuild(run, entry, model, state_keys=state.keys())
    else:
        info = dataset_info(data)
        in_shape, num_classes = tuple(info.in_shape), info.num_classes
        model = model if model is not None else build_model(name, in_shape, num_classes)
    _load_into(model, state, f"checkpoint {run / 'checkpoint.pt'}")
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:   # train never checkpoints such a state; an export of it would only carry NaNs along
        raise UsageError(f"checkpoint {run / 'checkpoint.pt'}: {', '.join(bad[:3])} has non-finite values; "
                         f"allowed: the checkpoint of a run that did not diverge")
    return model.eval(), {"model": name, "data": data, "in_shape": list(in_shape), "num_classes": num_classes}


def _probe_shape(model: nn.Module, in_shape) -> tuple:
    if in_shape:
        return tuple(in_shape)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear))), None)
    if first is None:
        raise UsageError("in_shape: unknown for this model; allowed: export it with in_shape=(C, H, W)")
    return (first.in_features,)


def load_source(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """A run directory (see :func:`load_run`) or an export file, as (dense model, info); a shrunk or
    sparse export comes back as its dense nn.Sequential (info["model"] is then "")."""
    path = Path(path)
    if not path.is_file():
        return load_run(path)
    meta, _ = codec.read_file(path)
    model = load_export(path)
    shrunk = meta["sparsetrain_format"] in ("shrunk", "sparse")
    if shrunk:
        densify(model)
    return model, {"model": "" if shrunk else meta.get("model") or "", "data": None,
                   "in_shape": meta.get("in_shape"), "num_classes": meta.get("num_classes")}


def export_run(run_dir: str | os.PathLike, format: str, out: str | os.PathLike | None = None, *,
               model: nn.Module | None = None, **kwargs) -> Path:
    """Export the model of a run directory; ``out`` defaults to ``RUN_DIR/model.FORMAT.safetensors``;
    ``model``: an instance of a user model's class to load the weights into (see :func:`load_run`)."""
    choice(format, "--format", FORMATS)
    model, info = load_run(run_dir, model)
    out = Path(out) if out is not None else Path(run_dir) / f"model.{format}.safetensors"
    return export_model(model, format, out, model_name=info["model"], in_shape=info["in_shape"],
                        num_classes=info["num_classes"], **kwargs)


# ----------------------------------------------------------------------------- measuring
def macs(model: nn.Module, in_shape) -> int:
    """Multiply-accumulates one input costs as the model runs: dense layers count every weight,
    SparseLinear / SparseConv2d only their nonzeros."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        linear = isinstance(mod, (nn.Linear, SparseLinear))
        per = out.numel() // out.shape[0] // (out.shape[-1] if linear else out.shape[1])
        n = mod.nnz if isinstance(mod, (SparseLinear, SparseConv2d)) else mod.weight.numel()
        total += n * per

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseLinear, SparseConv2d)
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def latency(models: dict[str, nn.Module], x: torch.Tensor, *, budget_s: float = 1.0, min_reps: int = 3,
            max_reps: int = 50) -> dict[str, float]:
    """Median seconds per forward of each model on ``x``, timed round-robin after one warm-up call."""
    times = {k: [] for k in models}
    with torch.no_grad():
        first = time.perf_counter()
        for m in models.values():
            m(x)
        if time.perf_counter() - first > budget_s:
            min_reps = 1
        start = time.perf_counter()
        while True:
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
            n = len(next(iter(times.values())))
            if n >= max_reps or (n >= min_reps and time.perf_counter() - start > budget_s):
                break
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_exports(run_dir: str | os.PathLike, *, batch_sizes=(1, 64), budget_s: float = 0.25,
                    file=None, model: nn.Module | None = None) -> list[dict]:
    """Export a run in every format (to a temporary directory), reload each, and print a table of
    file size, parameters, MACs per input and measured latency per batch size. Returns the rows.
    A format the model cannot take (shrunk / sparse of an untraceable model) is listed with why."""
    out = file or sys.stdout
    try:
        model, info = load_run(run_dir, model)
    except UsageError as e:
        print(f"exports: not measured ({e})", file=out)
        return []
    in_shape = tuple(info["in_shape"])
    rows, loaded = [], {}
    ck = Path(run_dir) / "checkpoint.pt"
    with tempfile.TemporaryDirectory(prefix="sparsetrain-export-") as tmp:
        for fmt in FORMATS:
            try:
                path = export_model(model, fmt, Path(tmp) / f"{fmt}.safetensors", model_name=info["model"],
                                    in_shape=in_shape, num_classes=info["num_classes"], batch_size=max(batch_sizes))
                m = load_export(path, model=copy.deepcopy(model) if fmt in ("dense", "compressed") else None)
            except UsageError as e:
                print(f"{fmt}: not available ({e})", file=out)
                continue
            loaded[fmt] = m
            rows.append({"format": fmt, "bytes": path.stat().st_size,
                         "params": sum(t.numel() for t in m.state_dict().values() if t.is_floating_point()),
                         "macs": macs(m, in_shape)})
    dense_bytes = rows[0]["bytes"]
    for bs in batch_sizes:
        x = torch.randn(bs, *in_shape)
        lat = latency({"original": model, **loaded}, x, budget_s=budget_s)
        for r in rows:
            r[f"ms_b{bs}"] = lat[r["format"]] * 1e3
            r[f"speedup_b{bs}"] = lat["original"] / lat[r["format"]]
    stats = _weight_stats(model)
    print(f"exports ({info['model']}, density {stats['density']:.4f}, torch threads {torch.get_num_threads()}; "
          f"checkpoint.pt {_fmt_bytes(ck.stat().st_size) if ck.is_file() else '-'}):", file=out)
    head = (f"{'format':<11} {'file':>9} {'/dense':>7} {'params':>10} {'MACs':>11}"
            + "".join(f" {'ms b' + str(b):>9} {'x':>6}" for b in batch_sizes))
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        r["ratio"] = r["bytes"] / dense_bytes
        print(f"{r['format']:<11} {_fmt_bytes(r['bytes']):>9} {r['ratio']:>7.3f} {r['params']:>10,} {r['macs']:>11,}"
              + "".join(f" {r[f'ms_b{b}']:>9.3f} {r[f'speedup_b{b}']:>6.2f}" for b in batch_sizes), file=out)
    return rows


# ----------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory written by `sparsetrain train --out`, or an export file to convert")
    p.add_argument("--format", default=None, help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.FORMAT.safetensors)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sparse: the batch size each layer's sparse/dense choice is timed for (default 64)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="sparse: choose sparse layers by density <= 0.1 instead of timing them")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="zero weights with |w| <= THRESHOLD first (for methods that leave near-zeros)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_cli(args) -> int:
    if args.format is None:
        raise UsageError(f"--format: required; allowed: {', '.join(FORMATS)}")
    choice(args.format, "--format", FORMATS)
    check(args.batch_size >= 1, "--batch-size", ">= 1", args.batch_size)
    check(args.threshold >= 0 and math.isfinite(args.threshold), "--threshold", "a finite number >= 0",
          args.threshold)
    src = Path(args.run_dir)
    model, info = load_source(src)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / f"model.{args.format}.safetensors"
    if out.is_dir():
        raise UsageError(f"--out: {out} is a directory; allowed: a file path")
    if src.is_file() and out.resolve() == src.resolve():
        raise UsageError(f"--out: {out} is the input file; allowed: another path")
    try:
        path = export_model(model, args.format, out, model_name=info["model"], in_shape=info["in_shape"],
                            num_classes=info["num_classes"], batch_size=args.batch_size, measure=args.measure,
                            threshold=args.threshold)
    except OSError as e:
        raise UsageError(f"--out: {out} is not writable ({e.strerror or e})") from None
    loaded = load_export(path)
    ref = _baked_copy(model, args.threshold)
    x = torch.randn(4, *_probe_shape(ref, info["in_shape"]))
    with torch.no_grad():
        diff = float((loaded(x) - ref(x)).abs().max())
    size = path.stat().st_size
    dense = _dense_size(ref.state_dict())
    params = sum(t.numel() for t in loaded.state_dict().values() if t.is_floating_point())
    result = {"path": str(path), "format": args.format, "bytes": size, "dense_bytes": dense,
              "ratio": size / dense, "params": params, "max_abs_diff": diff, **_weight_stats(ref)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {path}: {args.format}, {_fmt_bytes(size)} ({size / dense:.4f} of dense {_fmt_bytes(dense)}), "
              f"{params:,} parameters, weight density {result['density']:.4f}, max |output diff| {diff:.2e}")
    return 0
