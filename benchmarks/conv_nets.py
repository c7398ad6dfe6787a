"""The seed methods on conv nets and ResNets, next to GMP, measured in the same run.

Runs ``sparsetrain compare`` for each model of a preset and writes one table (``conv_nets.md``,
``conv_nets.json`` under ``--out``): per model, method and target the mean test accuracy, its
gap to GMP at the same target in the same run, the achieved sparsity, the wall time per run, and
a flag where a run ended near chance (< 20 % on 10 classes) or more than 1 point off its target
sparsity; it exits 1 when a run failed (diverged, dead) or a cell is flagged, 2 on bad input. Presets:

``cpu`` (default without CUDA; ≈ 15 min on 2 cores): ResNet-20, the Bregman ConvNet and LeNet-5
    on 2000 Fashion-MNIST training images (1000 test), 3 epochs, batch 32, 90 % sparsity.
``gpu`` (default with CUDA): ResNet-18, full Fashion-MNIST, 10 epochs, batch 128, 95 %.
``sweep``: every built-in model × 90 / 95 / 98 %, the ``cpu`` preset's small budget (a smoke
    test that no model × method × target ends at chance or off its target).

    python benchmarks/conv_nets.py [--preset cpu|gpu|sweep] [--seeds 1] [--out results/conv_nets] [--sparsity 0.95]
        [--methods gmp,linbreg,adabreg,halo,xrda] [--models resnet20,convnet] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsetrain.compare import compare
from sparsetrain.errors import UsageError
from sparsetrain.models import MODELS

QUICK = dict(epochs=3, train_subset=2000, test_subset=1000, batch_size=32)
PRESETS = {
    "cpu": dict(models=("resnet20", "convnet", "lenet5"), sparsities=(0.9,), **QUICK),
    "gpu": dict(models=("resnet18",), sparsities=(0.95,), epochs=10, train_subset=None, test_subset=None,
                batch_size=128),
    "sweep": dict(models=tuple(MODELS), sparsities=(0.9, 0.95, 0.98), **QUICK),
}
METHODS = "gmp,linbreg,adabreg,halo,xrda"


def main() -> int:
    """Writes the table; returns 1 (the exit code) when a run failed (diverged or dead) or a cell is
    flagged (at chance, off its target), else 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--models", default=None, help="comma-separated models (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--sparsity", default=None, help="comma-separated targets (default: the preset's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (autocast on a GPU)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="results/conv_nets")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.epochs is not None:
        p["epochs"] = args.epochs
    if args.sparsity is not None:
        try:
            p["sparsities"] = tuple(float(x) for x in args.sparsity.split(","))
        except ValueError:
            raise UsageError(f"--sparsity: {args.sparsity!r} is not a comma-separated list of numbers; "
                             f"allowed: e.g. 0.9,0.95") from None
    models = args.models.split(",") if args.models else p["models"]
    lines = [f"preset {args.preset}: {p['epochs']} epochs, batch {p['batch_size']}, train subset "
             f"{p['train_subset'] or 'all'}, {args.seeds} seed(s), device {args.device}, {args.precision}"
             + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
             "", "| model | method | target (%) | test accuracy (%) | Δ vs GMP | sparsity (%) | wall s / run | flag |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    table, failed, flagged = [], 0, []
    for model in models:
        res = compare(args.methods, list(p["sparsities"]), model=model, epochs=p["epochs"], seeds=args.seeds,
                      out=Path(args.out) / model, batch_size=p["batch_size"], data_dir=args.data_dir,
                      device=args.device, train_subset=p["train_subset"], test_subset=p["test_subset"],
                      precision=args.precision, plots=False, log=print)
        cells = [c for c in res["aggregates"] if not c["reference"]]
        gmp = {c["target"]: c["test_accuracy_mean"] for c in cells if c["method"] == "gmp"}
        for c in cells:
            a, t = c["test_accuracy_mean"], c["target"]
            gap = "" if t not in gmp or c["method"] == "gmp" else f"{100 * (a - gmp[t]):+.2f}"
            flag = ", ".join(f for f, bad in (("chance", a < 0.2),
                                              ("off target", abs(c["sparsity_mean"] - t) > 0.01)) if bad)
            if flag:
                flagged.append(f"{model} {c['method']} {100 * t:g} % ({flag})")
            lines.append(f"| {model} | {c['method']} | {100 * t:g} | {100 * a:.2f} | {gap} | "
                         f"{100 * c['sparsity_mean']:.2f} | {c.get('wall_seconds_mean') or float('nan'):.1f} | {flag} |")
            table.append({"model": model, **{k: v for k, v in c.items() if not isinstance(v, (list, dict))}})
        failed += len(res["failed"])
        for f in res["failed"]:
            lines.append(f"| {model} | {f['method']} | {f['target']} | failed | | | | {f['error'][:80]} |")
            table.append({"model": model, "method": f["method"], "target": f["target"], "error": f["error"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if not args.models else "-" + "-".join(models)
    (out / f"conv_nets{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"conv_nets{suffix}.json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))
    if failed:
        print(f"conv_nets: error: {failed} run(s) failed (see the table)", file=sys.stderr)
    if flagged:
        print(f"conv_nets: error: {len(flagged)} cell(s) flagged: {'; '.join(flagged)}", file=sys.stderr)
    return 1 if failed or flagged else 0


def cli() -> int:
    """``main`` with bad input (a model, a method, an --out in use) as one line and exit code 2."""
    try:
        return main()
    except UsageError as e:
        print(f"conv_nets: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
