"""Training time of an epoch per method and precision, relative to dense (not a test).

Each (method, precision) trains ``--epochs`` epochs (default 2) on ``--train-subset`` samples;
the reported time is the median training time of the epochs after the first (the first includes
kernel compilation and cuDNN autotuning), without evaluation. Prints a markdown table and writes
it (plus JSON) to ``--out`` if given.

    python benchmarks/epoch_time.py --device cuda --model resnet18 --data-dir DIR \\
        [--methods dense,gmp,...] [--precisions fp32,bf16] [--train-subset 10000] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetrain.data import make_loaders
from sparsetrain.trainer import TrainConfig, Trainer

METHODS = "dense,gmp,rigl,xrda,linbreg,adabreg,halo,proxsgd"


def epoch_seconds(method: str, precision: str, args, loaders) -> tuple[float, float]:
    """(median training seconds of the epochs after the first, test accuracy)."""
    cfg = TrainConfig(method=method, model=args.model, data=args.data, data_dir=args.data_dir, epochs=args.epochs,
                      batch_size=args.batch_size, device=args.device, precision=precision,
                      train_subset=args.train_subset, test_subset=args.test_subset, progress=False)
    t = Trainer(cfg, loaders)   # the data read once (and kept on the GPU by the first run)
    summary = t.run()
    times = [r["train_seconds"] for r in t.history]
    return statistics.median(times[1:] if len(times) > 1 else times), summary["test_accuracy"]


def render(head: str, methods, precisions, results: dict, seconds: float, out: str | None) -> str:
    """The markdown table of what is measured so far (written to ``out`` too)."""
    nan = (float("nan"), float("nan"))
    both = "bf16" in precisions and "fp32" in precisions
    lines = [head, "", "| method | " + " | ".join(f"{p} s/epoch (× dense {p})" for p in precisions)
             + (" | bf16 × dense fp32 |" if both else " |"), "|---|" + "---:|" * (len(precisions) + both)]
    for method in methods:
        if not any(f"{method}/{p}" in results for p in precisions):
            continue
        cells = []
        for prec in precisions:
            s, dense = results.get(f"{method}/{prec}", nan)[0], results.get(f"dense/{prec}", nan)[0]
            cells.append(f"{s:.3f} ({s / dense:.2f}×)")
        if both:
            cells.append(f"{results.get(f'{method}/bf16', nan)[0] / results.get('dense/fp32', nan)[0]:.2f}×")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + f"\n\n({seconds:.0f} s)\n"
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "epoch_time.md").write_text(text)
        (path / "epoch_time.json").write_text(json.dumps({k: {"seconds": v[0], "test_accuracy": v[1]}
                                                          for k, v in results.items()}, indent=1))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--out", default=None, help="directory for epoch_time.md / epoch_time.json")
    args = p.parse_args(argv)
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    head = (f"{args.model} on {args.data} ({args.train_subset} samples, batch {args.batch_size}), {where}, "
            f"torch {torch.__version__}: median training seconds per epoch (after the first), × dense")
    print(head, flush=True)
    results: dict = {}
    t0 = time.perf_counter()
    loaders = make_loaders(args.data, args.data_dir, args.batch_size, 0, 0.0, args.train_subset, args.test_subset)
    for method in methods:
        for prec in precisions:
            try:
                results[f"{method}/{prec}"] = epoch_seconds(method, prec, args, loaders)
            except Exception as e:          # report and go on: one method must not hide the others
                results[f"{method}/{prec}"] = (float("nan"), float("nan"))
                print(f"{method} {prec}: failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}", flush=True)
            s, acc = results[f"{method}/{prec}"]
            print(f"  {method:<8} {prec}: {s:.3f} s/epoch, test acc {acc:.4f}", flush=True)
        render(head, methods, precisions, results, time.perf_counter() - t0, args.out)  # partial results land
    print("\n" + render(head, methods, precisions, results, time.perf_counter() - t0, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
