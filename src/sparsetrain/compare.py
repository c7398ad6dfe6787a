"""``sparsetrain compare``: several methods at several target sparsities, side by side.

    sparsetrain compare --methods dense,linbreg,adabreg,xrda,halo,gmp,rigl,imp --model lenet300 \\
        --data fashion-mnist --sparsity 0.9,0.95,0.98 --epochs 20 --seeds 3 --out DIR

runs every method at every target with the same epoch budget (``--epochs``; methods that train
longer by design, IMP's levels × epochs or HALO's fine-tuning, report and show their real count)
and every seed. Methods without a ``--sparsity`` option (``dense``) run once per seed, not per
target, and are the reference row. Output in ``DIR``:

  runs/<method>-s<target>-seed<k>/   one ordinary run directory each (``dense-seed<k>`` for the
                                     reference), written by the normal Trainer
  results.json                       every run's key numbers, aggregates over seeds, the settings
  results.md                         method, target, achieved sparsity, test accuracy mean ± std
                                     over seeds, epochs trained, wall time per run
  pareto.png                         test accuracy vs density (log x), one line per method, error
                                     bars over seeds, dense as a horizontal line
  layers.png                         per-layer density of every method at the highest target

results.json and results.md are rewritten after every finished run, the plots at the end
(matplotlib, Agg backend, imported lazily; without matplotlib they are skipped with a warning).

Interrupting is safe: run the same command again. A run directory with ``summary.json`` is done
and skipped; one with ``checkpoint.pt`` but no summary continues from its checkpoint
(``resume=True``); a finished or started run whose settings differ from the command's is refused
(use another ``--out``). Adding methods, targets or seeds to an existing compare only runs the
new combinations. A run that diverges (NaN loss) is reported as such and the compare goes on
(the command then exits 3). ``sparsetrain compare --report DIR`` re-renders results.md and the
plots from results.json without training.

Python: :func:`compare` (the CLI calls it) and :func:`render_report`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UsageError, choice
from .liveness import DeadNetworkError

__all__ = ["compare", "render_report", "configure_parser", "run_cli"]

DEFAULT_SPARSITIES = (0.9, 0.95, 0.98)
RESULTS = "results.json"
# TrainConfig fields that ``--set METHOD.FIELD=VALUE`` may change per method (besides the options)
PER_METHOD_FIELDS = {"lr": float, "weight_decay": float, "schedule": str}
# settings a finished/started run directory must share with the command to be reused
_SAME = ("method", "model", "data", "epochs", "batch_size", "lr", "weight_decay", "schedule", "seed",
         "train_subset", "test_subset", "options")
_ABSENT = object()      # an option a run's config.json does not have (the run predates it)
_STANDARD = {"method", "model", "data", "epochs", "test_accuracy", "test_loss", "sparsity", "density",
             "compression_ratio", "weights", "nonzeros", "per_layer", "flops", "wall_seconds", "options",
             "epoch_seconds", "precision"}


# ============================================================================ input checking
MAX_SEEDS = 1000


def parse_sparsities(text) -> list[float]:
    """``"0.9,0.95"`` (or a list of numbers) -> [0.9, 0.95]; every value in [0, 1)."""
    items = text.split(",") if isinstance(text, str) else list(text if isinstance(text, Iterable) else [text])
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            if isinstance(item, bool):
                raise ValueError
            v = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise UsageError(f"--sparsity: expected comma-separated numbers in [0, 1), got {item!r}") from None
        if not (math.isfinite(v) and 0 <= v < 1):
            raise UsageError(f"--sparsity: must be in [0, 1) (a fraction of zero weights), got {item!r}")
        if v not in out:
            out.append(v)
    return out


def parse_methods(text) -> list[str]:
    from .methods import METHODS
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for m in items:
        m = str(m).strip()
        if not m:
            continue
        choice(m, "--methods", sorted(METHODS), "method")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError(f"--methods: required (comma-separated); allowed: {', '.join(sorted(METHODS))}")
    return out


def _parse_value(kind: type, text: str, where: str):
    if not isinstance(text, str):                 # Python API: a value of the right type already
        if kind is float and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        if isinstance(text, kind) and not (kind is int and isinstance(text, bool)):
            return text
        raise UsageError(f"{where}: expected {kind.__name__}, got {text!r}")
    try:
        if kind is bool:
            from .cli import _parse_bool
            return _parse_bool(text)
        return kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise UsageError(f"{where}: expected {expected}, got {text!r}") from None


def parse_overrides(items, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["linbreg.momentum=0.9", ...]`` or ``{"linbreg": {"momentum": 0.9}}`` -> per-method
    overrides (method options, and the TrainConfig fields lr, weight_decay, schedule), typed."""
    from .methods import METHODS
    pairs: list[tuple[str, str, Any, str]] = []
    if isinstance(items, dict):
        for m, opts in items.items():
            if not isinstance(opts, dict):
                raise UsageError(f"--set: {m}: expected a dict of option values, got {opts!r}")
            pairs += [(str(m), str(k), v, f"--set {m}.{k}") for k, v in opts.items()]
    else:
        for item in items or ():
            key, eq, value = str(item).partition("=")
            method, dot, name = key.strip().partition(".")
            if not (eq and dot and method and name.strip()):
                raise UsageError(f"--set: expected METHOD.OPTION=VALUE (e.g. linbreg.momentum=0.9), got {item!r}")
            pairs.append((method, name.strip(), value.strip(), f"--set {item}"))
    out: dict[str, dict[str, Any]] = {}
    for method, name, value, where in pairs:
        if method not in METHODS:
            raise UsageError(f"{where}: unknown method {method!r}; allowed: the --methods of this compare "
                             f"({', '.join(methods)})")
        if method not in methods:
            raise UsageError(f"{where}: method {method!r} is not compared; allowed: the --methods of this "
                             f"compare ({', '.join(methods)})")
        name = name.replace("-", "_")
        options = {o.name: o for o in METHODS[method].options}
        if name == "sparsity":
            raise UsageError(f"{where}: the target sparsity is set by --sparsity; allowed: the other options "
                             f"of {method}")
        if name in PER_METHOD_FIELDS:
            out.setdefault(method, {})[name] = _parse_value(PER_METHOD_FIELDS[name], value, where)
        elif name in options:
            v = _parse_value(options[name].type, value, where)
            options[name].check(v)
            out.setdefault(method, {})[name] = v
        else:
            names = ", ".join(sorted([n for n in options if n != "sparsity"] + list(PER_METHOD_FIELDS)))
            raise UsageError(f"{where}: {name!r} is not an option of method {method}; allowed: {names}")
    return out


# ============================================================================ the plan
def _has_target(method: str) -> bool:
    from .methods import METHODS
    return any(o.name == "sparsity" for o in METHODS[method].options)


def run_name(method: str, target: float | None, seed: int) -> str:
    return f"{method}-seed{seed}" if target is None else f"{method}-s{target:g}-seed{seed}"


def _plan(methods, sparsities, seeds, base: dict, overrides) -> list[dict]:
    """Every run, seed-major (one seed of every method first: a usable table early)."""
    from .trainer import TrainConfig
    plan = []
    for seed in range(seeds):
        for method in methods:
            extra = dict(overrides.get(method, {}))
            fields = {k: extra.pop(k) for k in list(extra) if k in PER_METHOD_FIELDS}
            for target in (sparsities if _has_target(method) else [None]):
                options = {**extra, **({} if target is None else {"sparsity": target})}
                cfg = TrainConfig(**{**base, **fields, "method": method, "seed": seed, "options": options})
                plan.append({"name": run_name(method, target, seed), "method": method, "target": target,
                             "seed": seed, "cfg": cfg})
    return plan


def _expected(cfg) -> dict:
    """The resolved settings of ``cfg`` as its run directory's config.json holds them."""
    resolved = copy.deepcopy(cfg).validate()
    return json.loads(json.dumps({k: resolved.to_dict()[k] for k in _SAME}, default=float))


def _check_same(run_dir: Path, expected: dict) -> None:
    path = run_dir / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return                                   # no readable config: the trainer checks the checkpoint
    if not isinstance(old, dict):
        return
    diffs = []
    for key in _SAME:
        if key not in old:
            continue
        if key == "options" and isinstance(old[key], dict):
            # an option left None is filled in by the method when it builds (e.g. a starting λ); one
            # the run's config lacks is newer than the run, which trained without it
            diffs += [(k, old[key].get(k, _ABSENT), v) for k, v in expected[key].items()
                      if v is not None and old[key].get(k, _ABSENT) != v]
        elif old[key] != expected[key]:
            diffs.append((key, old[key], expected[key]))
    if diffs:
        key, was, now = diffs[0]
        if was is _ABSENT:
            raise UsageError(f"--out: {run_dir} holds a run from a sparsetrain without --{key.replace('_', '-')} "
                             f"(this compare trains with {key}={json.dumps(now)}); allowed: another --out, or "
                             f"delete the run to train it again")
        raise UsageError(f"--out: {run_dir} holds a run with {key}={json.dumps(was)}, this compare asks for "
                         f"{json.dumps(now)}; allowed: the same settings, or another --out")


# ============================================================================ compare
def compare(methods, sparsities=DEFAULT_SPARSITIES, *, model: str = "lenet300", data: str = "fashion-mnist",
            epochs: int = 20, seeds: int = 3, out, batch_size: int = 128, lr: float | None = None,
            data_dir: str | None = None, device: str = "auto", train_subset: int | None = None,
            test_subset: int | None = None, overrides=None, progress: bool = False, plots: bool = True,
            precision: str = "fp32", log: Callable[[str], None] | None = None) -> dict:
    """Train every method at every target sparsity for ``seeds`` seeds (0 … seeds−1) into
    ``out/runs/``, write ``results.json``, ``results.md``, ``pareto.png``, ``layers.png`` and return
    the results (the content of results.json, plus ``executed``/``skipped``: the run names trained
    / found finished by this call, and ``failed``: runs that diverged).

    ``methods``: list or comma-separated string; ``sparsities``: numbers in [0, 1) (list or
    comma-separated string); ``overrides``: ``{"linbreg": {"momentum": 0.9}}`` or a list of
    ``"linbreg.momentum=0.9"`` strings (method options, or lr / weight_decay / schedule).
    Everything is validated before anything is trained (one-line :class:`UsageError` s)."""
    from .data import DATASETS, locate
    from .errors import check
    from .models import MODELS
    from .trainer import Trainer, resolve_device

    log = log or (lambda line: print(line, flush=True))
    methods = parse_methods(methods)
    sparsities = parse_sparsities(sparsities)
    choice(model, "--model", MODELS)
    choice(data, "--data", DATASETS)
    check(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0, "--epochs", "an integer > 0",
          epochs)
    check(isinstance(seeds, int) and not isinstance(seeds, bool) and 0 < seeds <= MAX_SEEDS, "--seeds",
          f"an integer in [1, {MAX_SEEDS}] (the number of seeds, 0 … N−1)", seeds)
    if not sparsities and any(_has_target(m) for m in methods):
        raise UsageError("--sparsity: at least one target is required for "
                         f"{', '.join(m for m in methods if _has_target(m))}; allowed: numbers in [0, 1)")
    if out is None or str(out) == "":
        raise UsageError("--out: required; allowed: a directory for the runs and the results")
    overrides = parse_overrides(overrides, methods)
    base = dict(model=model, data=data, data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                device=device, train_subset=train_subset, test_subset=test_subset, progress=progress,
                precision=precision)
    plan = _plan(methods, sparsities, seeds, base, overrides)
    for run in plan:                               # every flag and option, before anything runs
        run["expected"] = _expected(run["cfg"])
    resolve_device(device)
    locate(data, data_dir)                        # the data is there (or downloads once, now)
    out = Path(out)
    _prepare_out(out)
    settings = {"methods": methods, "sparsities": sparsities, "model": model, "data": data, "epochs": epochs,
                "seeds": seeds, "batch_size": batch_size, "lr": lr, "train_subset": train_subset,
                "test_subset": test_subset, "overrides": overrides, "precision": precision}
    for run in plan:                              # reuse needs the same settings: check all first
        d = out / "runs" / run["name"]
        if (d / "summary.json").is_file() or (d / "checkpoint.pt").is_file():
            _check_same(d, run["expected"])

    rows: list[dict] = []
    failed: list[dict] = []
    executed: list[str] = []
    skipped: list[str] = []
    n = len(plan)
    for k, run in enumerate(plan, 1):
        d = out / "runs" / run["name"]
        target = "" if run["target"] is None else f" {run['target']:g}"
        label = f"[{k}/{n}] {run['method']}{target} seed {run['seed']}"
        summary = _read_summary(d)
        if summary is not None:
            skipped.append(run["name"])
            row = _row(run, summary, d, out)
            rows.append(row)
            log(f"{label}: acc {row['test_accuracy']:.4f}  sparsity {row['sparsity']:.4f}  (done earlier)")
            continue
        resumed = (d / "checkpoint.pt").is_file()
        cfg = copy.deepcopy(run["cfg"])
        cfg.out, cfg.resume = str(d), resumed
        t0 = time.perf_counter()
        try:
            summary = Trainer(cfg).run()
        except (FloatingPointError, DeadNetworkError) as e:
            reason = "dead" if isinstance(e, DeadNetworkError) else "diverged"
            failed.append({"name": run["name"], "method": run["method"], "target": run["target"],
                           "seed": run["seed"], "dir": str(d.relative_to(out)), "error": str(e), "reason": reason})
            log(f"{label}: {reason}: {e}")
            _write_results(out, settings, rows, failed, complete=False)
            continue
        executed.append(run["name"])
        row = _row(run, summary, d, out)
        rows.append(row)
        log(f"{label}: acc {row['test_accuracy']:.4f}  sparsity {row['sparsity']:.4f}  "
            f"({time.perf_counter() - t0:.1f}s{', resumed' if resumed else ''})")
        _write_results(out, settings, rows, failed, complete=False)
    results = _write_results(out, settings, rows, failed, complete=True)
    if plots:
        for line in render_plots(results, out):
            log(line)
    return {**results, "executed": executed, "skipped": skipped}


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory; allowed: a new directory or a compare's --out")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out} ({e.strerror or e}); allowed: a writable directory") from None


def _read_summary(run_dir: Path) -> dict | None:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None                   # absent or torn: (re)finish the run from its checkpoint
    return s if isinstance(s, dict) and "test_accuracy" in s else None


def _row(run: dict, summary: dict, run_dir: Path, out: Path) -> dict:
    extras = {k: v for k, v in summary.items()
              if k not in _STANDARD and (v is None or isinstance(v, (int, float, str, bool)))}
    return {"name": run["name"], "method": run["method"], "target": run["target"], "seed": run["seed"],
            "dir": str(run_dir.relative_to(out)), "test_accuracy": summary["test_accuracy"],
            "test_loss": summary.get("test_loss"), "sparsity": summary["sparsity"], "density": summary["density"],
            "compression_ratio": summary.get("compression_ratio"),
            "epochs": summary.get("epochs", run["cfg"].epochs), "wall_seconds": summary.get("wall_seconds"),
            "epoch_seconds": summary.get("epoch_seconds"),
            "flops_relative": (summary.get("flops") or {}).get("relative"),
            "target_met": summary.get("target_met"),
            "per_layer": [{"layer": r["layer"], "shape": r.get("shape"), "numel": r["numel"], "nnz": r["nnz"],
                           "density": r["density"]} for r in summary.get("per_layer", [])],
            "extras": extras}


# ============================================================================ aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))     # sample std


def aggregate(rows: list[dict], settings: dict) -> list[dict]:
    """One entry per (method, target), in the settings' method order then ascending target."""
    order = {m: i for i, m in enumerate(settings.get("methods", []))}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (
            order.get(kv[0][0], len(order)), kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        acc, acc_std = _mean_std([r["test_accuracy"] for r in rs])
        sp, sp_std = _mean_std([r["sparsity"] for r in rs])
        de, de_std = _mean_std([r["density"] for r in rs])
        wall, _ = _mean_std([r.get("wall_seconds") for r in rs])
        epoch_s, _ = _mean_std([r.get("epoch_seconds") for r in rs])
        layers: dict[str, list[float]] = {}
        shapes: dict[str, Any] = {}
        for r in rs:
            for layer in r.get("per_layer", []):
                layers.setdefault(layer["layer"], []).append(layer["density"])
                shapes.setdefault(layer["layer"], layer.get("shape"))
        met = [r.get("target_met") for r in rs if r.get("target_met") is not None]
        out.append({"method": method, "target": target, "reference": target is None, "n": len(rs),
                    "target_met": None if not met else all(met),
                    "seeds": sorted(r["seed"] for r in rs),
                    "test_accuracy_mean": acc, "test_accuracy_std": acc_std,
                    "sparsity_mean": sp, "sparsity_std": sp_std, "density_mean": de, "density_std": de_std,
                    "epochs": max(r["epochs"] for r in rs), "wall_seconds_mean": wall,
                    "wall_seconds_total": sum(r.get("wall_seconds") or 0.0 for r in rs),
                    "epoch_seconds_mean": epoch_s,
                    "per_layer_density": [{"layer": k, "shape": shapes[k], "density": sum(v) / len(v)}
                                          for k, v in layers.items()]})
    ref = next((a for a in out if a["reference"] and a["method"] == "dense"), None)
    for a in out:   # training time of an epoch relative to dense (None without a dense reference)
        ok = ref is not None and all(not math.isnan(x) for x in (a["epoch_seconds_mean"], ref["epoch_seconds_mean"]))
        a["epoch_time_vs_dense"] = a["epoch_seconds_mean"] / ref["epoch_seconds_mean"] if ok else None
    return out


def _write_results(out: Path, settings: dict, rows: list[dict], failed: list[dict], complete: bool) -> dict:
    from .checkpoint import write_json
    results = {"settings": settings, "complete": complete and not failed, "runs": rows, "failed": failed,
               "aggregates": aggregate(rows, settings)}
    try:
        write_json(results, out / RESULTS)
        _write_text(out / "results.md", markdown(results))
    except OSError as e:
        raise UsageError(f"--out: cannot write {out / RESULTS} ({e.strerror or e}); finished runs are kept; "
                         f"free space and run the same command again") from None
    return results


def _write_text(path: Path, text: str) -> None:
    from .checkpoint import atomic_write
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


# ============================================================================ report
def _pct(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def markdown(results: dict) -> str:
    s = results.get("settings", {})
    aggs = results.get("aggregates") or aggregate(results.get("runs", []), s)
    seeds = s.get("seeds")
    epochs = s.get("epochs")
    lines = [f"# sparsetrain compare: {s.get('model', '?')} on {s.get('data', '?')}", ""]
    subset = "".join(f", {k.replace('_', ' ')} {s[k]}" for k in ("train_subset", "test_subset") if s.get(k))
    lines.append(f"Budget {epochs} epochs per run (methods that train longer by design show their real count), "
                 f"{seeds} seed{'s' if seeds != 1 else ''} per cell, batch size {s.get('batch_size')}{subset}. "
                 f"Test accuracy: mean ± sample std over seeds. Wall time: training time per run (mean). "
                 f"Epoch: median training time of an epoch, × dense (precision {s.get('precision', 'fp32')}).")
    if s.get("overrides"):
        lines.append("Overrides: " + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                                             for m, o in s["overrides"].items()) + ".")
    total = len(results.get("runs", []))
    planned = sum(int(seeds or 0) * (len(s.get("sparsities", [])) if _target_method(m, results) else 1)
                  for m in s.get("methods", []))
    if not results.get("complete", True) or (planned and total < planned):
        lines.append(f"**Partial results: {total} of {planned} runs finished.**")
    lines += ["", "| method | target | achieved sparsity (%) | test accuracy (%) | Δ vs dense | epochs | wall time / run "
                  "| epoch (× dense) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = next((a for a in aggs if a["reference"] and a["method"] == "dense"),
               next((a for a in aggs if a["reference"]), None))

    def cell(a):
        acc = f"{_pct(a['test_accuracy_mean'])} ± {_pct(a['test_accuracy_std'])}"
        if seeds and a["n"] != seeds:
            acc += f" (n={a['n']})"
        delta = "—" if a is ref or ref is None else f"{100 * (a['test_accuracy_mean'] - ref['test_accuracy_mean']):+.2f}"
        ep = str(a["epochs"])
        if epochs and a["epochs"] != epochs:
            ep += f" ({a['epochs'] / epochs:g}× budget)"
        wall = "—" if a["wall_seconds_mean"] is None or math.isnan(a["wall_seconds_mean"]) else \
            f"{a['wall_seconds_mean']:.1f} s"
        target = "—" if a["target"] is None else f"{100 * a['target']:g}"
        name = a["method"] + (" (reference)" if a["reference"] else "")
        achieved = _pct(a['sparsity_mean']) + (" ⚠ missed" if a.get("target_met") is False else "")
        epoch_s, rel = a.get("epoch_seconds_mean"), a.get("epoch_time_vs_dense")
        epoch = "—" if epoch_s is None or math.isnan(epoch_s) else f"{epoch_s:.2f} s" + (
            f" ({rel:.2f}×)" if rel is not None else "")
        return f"| {name} | {target} | {achieved} | {acc} | {delta} | {ep} | {wall} | {epoch} |"

    for a in sorted(aggs, key=lambda a: (not a["reference"], -1 if a["target"] is None else a["target"])):
        lines.append(cell(a))
    if any(a.get("target_met") is False for a in aggs):
        lines += ["", "⚠ missed: at least one seed of the cell ended more than 0.5 percentage points away from "
                      "its target sparsity (target_met false in its summary.json)."]
    if results.get("failed"):
        dead = any(_reason(f) == "dead" for f in results["failed"])
        lines += ["", "Diverged runs (NaN loss" + (") and dead networks (no gradient reaches a layer); "
                                                   if dead else "; ") + "not in the table:", ""]
        lines += [f"- {f['name']}: {f['error']}" for f in results["failed"]]
    return "\n".join(lines) + "\n"


def _reason(failed_run: dict) -> str:
    """``"diverged"`` (a NaN/inf loss) or ``"dead"`` (no gradient reaches a layer)."""
    return failed_run.get("reason", "diverged")     # results written before dead runs were told apart


def _failures(failed: list[dict], short: bool = False) -> str:
    """``1 run(s) diverged (NaN loss), 2 run(s) with a dead network (...)`` (short: ``1 diverged, 2 dead``)."""
    words = {"diverged": ("diverged", "run(s) diverged (NaN loss)"),
             "dead": ("dead", "run(s) with a dead network (no gradient reaches a layer)")}
    counts = {k: sum(_reason(f) == k for f in failed) for k in words}
    return ", ".join(f"{n} {words[k][0 if short else 1]}" for k, n in counts.items() if n)


def _target_method(method: str, results: dict) -> bool:
    runs = [r for r in results.get("runs", []) if r["method"] == method]
    if runs:
        return runs[0]["target"] is not None
    try:
        return _has_target(method)
    except Exception:  # noqa: BLE001 - a method that is not registered any more
        return True


def render_plots(results: dict, out: Path) -> list[str]:
    """Write pareto.png and layers.png; returns lines to print (warnings, what was written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["compare: matplotlib is not installed; skipped pareto.png and layers.png "
                "(pip install matplotlib, then `sparsetrain compare --report DIR`)"]
    s = results.get("settings", {})
    aggs = aggregate(results.get("runs", []), s)
    if not aggs:
        return []
    title = f"{s.get('model', '?')} on {s.get('data', '?')}, {s.get('epochs', '?')} epochs"
    written = []

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(a["method"] for a in aggs if not a["reference"]))
    for m in methods:
        pts = sorted((a for a in aggs if a["method"] == m and not a["reference"]), key=lambda a: a["density_mean"])
        x = [max(a["density_mean"], 1e-6) for a in pts]
        y = [100 * a["test_accuracy_mean"] for a in pts]
        ax.errorbar(x, y, yerr=[100 * a["test_accuracy_std"] for a in pts], marker="o", ms=4, capsize=3, label=m)
    for i, ref in enumerate(a for a in aggs if a["reference"]):
        mean, std = 100 * ref["test_accuracy_mean"], 100 * ref["test_accuracy_std"]
        color = "k" if i == 0 else f"C{len(methods) + i}"
        ax.axhline(mean, color=color, ls="--", lw=1, label=f"{ref['method']} ({mean:.2f} %)")
        if std > 0:
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.08)
    for t in s.get("sparsities", []):
        ax.axvline(max(1 - t, 1e-6), color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("density (fraction of nonzero weights, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "pareto.png"))

    targets = [a["target"] for a in aggs if a["target"] is not None]
    if targets:
        top = max(targets)
        cells = [a for a in aggs if a["target"] == top and a["per_layer_density"]]
        layers = list(dict.fromkeys(l["layer"] for a in cells for l in a["per_layer_density"]))
        shapes = {l["layer"]: l.get("shape") for a in cells for l in a["per_layer_density"]}
        if cells and layers:
            fig, ax = plt.subplots(figsize=(max(6.0, min(0.9 * len(layers) + 2, 0.3 * len(layers) + 4)), 4.5))
            width = 0.8 / len(cells)
            for i, a in enumerate(cells):
                dens = {l["layer"]: l["density"] for l in a["per_layer_density"]}
                xs = [j - 0.4 + width * (i + 0.5) for j in range(len(layers))]
                ax.bar(xs, [max(dens.get(l, math.nan), 1e-6) for l in layers], width, label=a["method"])
            ax.axhline(1 - top, color="grey", lw=0.8, ls=":", label=f"target density {1 - top:.3g}")
            ax.set_xticks(range(len(layers)))
            many = len(layers) > 6
            ax.set_xticklabels([l.removesuffix(".weight") + ("" if not shapes.get(l) else
                                ("  " if many else "\n") + "×".join(map(str, shapes[l]))) for l in layers],
                               rotation=45 if many else 0, ha="right" if many else "center", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("layer density (log scale)")
            ax.set_title(f"per-layer density at target sparsity {100 * top:g} %\n{title}", fontsize=10)
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            fig.savefig(out / "layers.png", dpi=120)
            plt.close(fig)
            written.append(str(out / "layers.png"))
    return ["wrote " + ", ".join(written)] if written else []


def render_report(out) -> dict:
    """Re-render ``out``'s results.md and plots from its results.json (no training)."""
    out = Path(out)
    path = out / RESULTS
    if not path.is_file():
        raise UsageError(f"--report: {out} has no {RESULTS}; allowed: the --out directory of a compare")
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
            raise ValueError("no 'runs' list")
        results["aggregates"] = aggregate(results["runs"], results.get("settings", {}))
        text = markdown(results)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--report: {path} is not a compare's results file ({e}); allowed: the results.json "
                         f"written by sparsetrain compare") from None
    _write_text(out / "results.md", text)
    results["plots"] = render_plots(results, out)
    return results


# ============================================================================ command line
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None, metavar="M,M,...",
                   help="comma-separated methods (see `sparsetrain train --help`), e.g. dense,linbreg,gmp; "
                        "methods without --sparsity (dense) run once per seed as the reference")
    p.add_argument("--sparsity", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES), metavar="S,S,...",
                   help="comma-separated target sparsities in [0, 1) (default 0.9,0.95,0.98)")
    p.add_argument("--model", default="lenet300", help="model (default lenet300)")
    p.add_argument("--data", default="fashion-mnist", help="dataset (default fashion-mnist)")
    p.add_argument("--epochs", type=int, default=20, help="epoch budget of every run (default 20; IMP trains "
                   "--levels × this and says so)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell: 0 … N−1 (default 3)")
    p.add_argument("--out", default=None, help="directory for runs/, results.json, results.md and the plots")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of every run (an integer > 0)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each "
                   "method's own; per method: --set METHOD.lr=X)")
    p.add_argument("--data-dir", default=None, help="directory with the dataset's files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (see `sparsetrain train --help`)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test samples")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="per-method option (repeatable), e.g. --set linbreg.momentum=0.9 --set gmp.lr=0.05 "
                        "(any option of the method, or lr, weight_decay, schedule)")
    p.add_argument("--progress", action="store_true", help="show every run's epoch progress bars and lines")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="only re-render DIR's results.md and plots from its results.json (no training)")


def run_cli(args) -> int:
    if args.report is not None:
        results = render_report(args.report)
        for line in results.get("plots", []):
            print(line)
        print(f"wrote {Path(args.report) / 'results.md'}")
        return 0
    if args.methods is None:
        from .methods import METHODS
        raise UsageError(f"--methods: required (comma-separated); allowed: {', '.join(sorted(METHODS))}")
    if args.out is None:
        raise UsageError("--out: required; allowed: a directory for the runs and the results")
    try:
        results = compare(args.methods, args.sparsity, model=args.model, data=args.data, epochs=args.epochs,
                          seeds=args.seeds, out=args.out, batch_size=args.batch_size, lr=args.lr,
                          data_dir=args.data_dir, device=args.device, train_subset=args.train_subset,
                          test_subset=args.test_subset, overrides=args.overrides, progress=args.progress,
                          precision=args.precision)
    except KeyboardInterrupt:
        print("sparsetrain: compare interrupted; finished runs are kept: run the same command again to "
              "continue (finished runs are skipped, the interrupted one resumes)", file=sys.stderr)
        return 130
    failed = f", {_failures(results['failed'], short=True)}" if results["failed"] else ""
    print(f"wrote {Path(args.out) / 'results.md'} ({len(results['executed'])} runs trained, "
          f"{len(results['skipped'])} done earlier{failed})")
    if results["failed"]:
        print(f"sparsetrain: error: {_failures(results['failed'])}: "
              f"{', '.join(f['name'] for f in results['failed'])}; see results.md", file=sys.stderr)
        return 3
    return 0
