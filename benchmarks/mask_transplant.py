"""How good is the support a method found, apart from how it trained it? (a diagnostic, not a test)

For each finished run directory, the mask of its final Linear/Conv weights (w ≠ 0) is trained
again from a fresh init of the same model, restricted to the mask, with one fixed recipe for
every run (SGD, momentum 0.9, cosine lr; the run's data, subsets, batch size and epochs). The
same recipe on every method's mask separates the quality of its *support* from the quality of
its *training*. The fresh init is rescaled per output unit (``--init per-unit``, the default:
row i of a weight times √(fan_in / kept_i)); with the dense init (``--init dense``) a mask that
spreads a few weights over every unit starts with a weaker signal than one that concentrates
them, and the comparison measures that too. The table gives the run's own accuracy, the mask's
from-scratch accuracy and its gap to the first run's mask. Built-in models, on the CPU.

    python benchmarks/mask_transplant.py RUN_DIR [RUN_DIR ...] [--lr 0.1] [--epochs N] [--seed 0]
        [--init per-unit|dense]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetrain.checkpoint import load_checkpoint
from sparsetrain.data import make_loaders
from sparsetrain.errors import UsageError
from sparsetrain.models import MODELS, build_model
from sparsetrain.params import prunable_weights
from sparsetrain.pruning import Mask
from sparsetrain.trainer import evaluate, seed_everything


def train_mask(run: Path, lr: float, epochs: int | None, seed: int, init: str = "per-unit") -> dict:
    """Train the mask of ``run``'s final weights from a fresh init; returns the row of the table."""
    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    loaders = make_loaders(cfg["data"], cfg.get("data_dir"), cfg["batch_size"], seed, cfg.get("val_fraction", 0.0),
                           cfg.get("train_subset"), cfg.get("test_subset"))
    seed_everything(seed)
    model = build_model(cfg["model"], tuple(loaders.info.in_shape), loaders.info.num_classes)
    mask = Mask(model, {name: state[name] != 0 for name, _ in prunable_weights(model)})
    if init == "per-unit":
        with torch.no_grad():
            for name, w in mask.params.items():   # each output unit: the dense init's pre-activation variance
                kept = mask.masks[name].flatten(1).sum(1).clamp(min=1)
                w.mul_((w[0].numel() / kept).sqrt().view(-1, *[1] * (w.dim() - 1)))
    mask.apply()
    epochs = epochs or cfg["epochs"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loaders.train))
    t0 = time.time()
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        model.train()
        total, seen = torch.zeros(()), 0          # the last epoch's mean training loss
        for x, y in loaders.train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mask.mask_grads()                      # pruned weights (and their momentum) stay 0
            opt.step()
            sched.step()
            total, seen = total + loss.detach() * len(y), seen + len(y)
    test_loss, test_acc = evaluate(model, loaders.test, torch.device("cpu"))
    density = 1.0 - mask.sparsity()
    return {"run": str(run), "method": cfg["method"], "density": density, "run_accuracy": summary["test_accuracy"],
            "mask_accuracy": test_acc, "mask_train_loss": float(total) / max(seen, 1), "mask_test_loss": test_loss,
            "seconds": time.time() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=None, help="default: each run's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("per-unit", "dense"), default="per-unit",
                    help="per-unit: each unit's kept weights scaled by sqrt(fan-in / kept), so a mask that "
                         "spreads few weights over many units starts with the signal of one that concentrates "
                         "them; dense: the model's dense init, masked")
    args = ap.parse_args()
    for name, value in (("--lr", args.lr), ("--epochs", args.epochs)):
        if value is not None and not value > 0:      # (NaN fails too)
            print(f"mask_transplant: error: {name}: {value} is not > 0; allowed: a number > 0", file=sys.stderr)
            return 2
    for run in args.runs:
        missing = [f for f in ("config.json", "summary.json", "checkpoint.pt") if not (run / f).is_file()]
        if missing:
            print(f"mask_transplant: error: {run}: no {missing[0]}; allowed: the --out directory of a finished "
                  f"sparsetrain run", file=sys.stderr)
            return 2
        model = json.loads((run / "config.json").read_text()).get("model")
        if model not in MODELS:
            print(f"mask_transplant: error: {run}: model {model!r} is not built in; allowed: {', '.join(MODELS)}",
                  file=sys.stderr)
            return 2
    rows = []
    print("| run | method | density | run's accuracy (%) | mask from scratch (%) | Δ vs first mask | train loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        try:
            r = train_mask(run, args.lr, args.epochs, args.seed, args.init)
        except UsageError as e:              # e.g. the run's --data-dir is gone
            print(f"mask_transplant: error: {run}: {e}", file=sys.stderr)
            return 2
        rows.append(r)
        print(f"| {run.name} | {r['method']} | {r['density']:.4f} | {100 * r['run_accuracy']:.2f} | "
              f"{100 * r['mask_accuracy']:.2f} | {100 * (r['mask_accuracy'] - rows[0]['mask_accuracy']):+.2f} | "
              f"{r['mask_train_loss']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
