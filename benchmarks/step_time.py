"""Optimizer step time relative to torch.optim, measured in the same run.

Each sparsetrain optimizer's ``step()`` is timed against ``torch.optim.SGD(momentum=0.9,
foreach=True)`` (AdaBreg against ``torch.optim.Adam(foreach=True)``) on two parameter lists:
LeNet-300-100 (784-300-100-10 MLP, 266k params) and ResNet-18 (ImageNet shapes, 11.7M params,
built by hand). Weights (≥ 2-D) carry an L1 regularizer, biases / BN parameters none (as
``sparsetrain.param_groups`` does). Gradients are fixed random tensors, so only the optimizer
is measured. Baseline and candidate steps are interleaved; "ratio" is the median of the
per-repeat ratios (times are medians), "ratio (min)" divides the fastest repeats -- the more
stable number on a shared, noisy machine. Prints a markdown table.

With ``--device cuda`` the tensors live on the GPU (the fused Triton steps of
``sparsetrain.optim.fused_cuda`` are taken automatically), each step is timed with CUDA events,
and a GPT-2-small-shaped parameter list (124M) is added; the card's name is printed.

    python benchmarks/step_time.py [--threads 1] [--repeats 30] [--only resnet18|lenet|gpt2]
                                   [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsetrain.optim import GRDA, XRDA, AdaBreg, LinBreg, ProxSGD
from sparsetrain.regularizers import L1


def lenet_shapes():
    return [(300, 784), (300,), (100, 300), (100,), (10, 100), (10,)]


def resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, 512), (1000,)]


def gpt2_small_shapes():
    """GPT-2 small (124M): token/position embeddings, 12 blocks of attention + MLP, final norm."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def make_params(shapes, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, device=device).mul_(0.05).requires_grad_(True)
        p.grad = torch.randn(s, generator=g, device=device)
        params.append(p)
    return params


def groups(params, reg):
    return [{"params": [p for p in params if p.dim() >= 2], "reg": reg},
            {"params": [p for p in params if p.dim() < 2], "reg": None}]


CANDIDATES = {
    # name: (baseline, factory(params)), target ratio
    "ProxSGD (L1, momentum 0.9)": ("sgd", lambda ps: ProxSGD(groups(ps, L1(1e-4)), lr=1e-3, momentum=0.9), 1.2),
    "LinBreg (L1)": ("sgd", lambda ps: LinBreg(groups(ps, L1(1e-3)), lr=1e-3), 1.2),
    "LinBreg (L1, momentum 0.9)": ("sgd", lambda ps: LinBreg(groups(ps, L1(1e-3)), lr=1e-3, momentum=0.9), 1.2),
    "AdaBreg (L1)": ("adam", lambda ps: AdaBreg(groups(ps, L1(1e-3)), lr=1e-3), 1.2),
    "XRDA (normal, cosine)": ("sgd", lambda ps: XRDA(groups(ps, L1(1e-6)), lr=1e-3, lam=1e-6,
                                                     total_steps=10_000), 1.5),
    "XRDA (kernel, cosine)": ("sgd", lambda ps: XRDA(groups(ps, L1(1e-6)), lr=1e-3, lam=1e-6,
                                                     total_steps=10_000, mode="kernel"), 1.5),
    "XRDA (channel, cosine)": ("sgd", lambda ps: XRDA(groups(ps, L1(1e-6)), lr=1e-3, lam=1e-6,
                                                      total_steps=10_000, mode="channel"), 1.5),
    "XRDA (normal, no reweight)": ("sgd", lambda ps: XRDA(groups(ps, L1(1e-6)), lr=1e-3, lam=1e-6,
                                                          total_steps=10_000, reweight=False), 1.2),
    "GRDA": ("sgd", lambda ps: GRDA(groups(ps, L1(1.0)), lr=1e-3, c=1e-3, mu=0.6), None),
}

BASELINES = {
    "sgd": ("SGD(momentum=0.9, foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
    "adam": ("Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
}


def _time(opt, device="cpu"):
    """Seconds of one ``opt.step()`` (a CUDA device: a pair of recorded events, read later)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        return lambda: start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
    t = time.perf_counter() - t0
    return lambda: t


def measure(shapes, factory, base_factory, repeats, warmup=3, device="cpu"):
    ours, base = factory(make_params(shapes, device=device)), base_factory(make_params(shapes, device=device))
    for _ in range(warmup):
        ours.step()
        base.step()
    pairs = [(_time(base, device), _time(ours, device)) for _ in range(repeats)]
    if device == "cuda":
        torch.cuda.synchronize()
    t_ours, t_base, ratios = [], [], []
    for b, o in pairs:
        b, o = b(), o()
        t_base.append(b)
        t_ours.append(o)
        ratios.append(o / b)
    return (statistics.median(t_ours), statistics.median(t_base), statistics.median(ratios),
            min(t_ours) / min(t_base))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", choices=["lenet", "resnet18", "gpt2"], default=None)
    ap.add_argument("--match", default="", help="only optimizers whose name contains this")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"LeNet-300-100": lenet_shapes(), "ResNet-18": resnet18_shapes()}
    if args.device == "cuda":
        models["GPT-2 small"] = gpt2_small_shapes()
        where = f"CUDA ({torch.cuda.get_device_name()}), CUDA events"
    else:
        where = f"{torch.get_num_threads()} thread(s), CPU"
    if args.only:
        models = {k: v for k, v in models.items() if k.lower().replace("-", "").startswith(args.only[:4])}
    print(f"torch {torch.__version__}, {where}, float32, median of {args.repeats} interleaved repeats\n")
    print("| params | optimizer | baseline | ours (ms) | baseline (ms) | ratio | ratio (min) | target |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for model, shapes in models.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        for name, (base_key, factory, target) in CANDIDATES.items():
            if args.match not in name:
                continue
            base_name, base_factory = BASELINES[base_key]
            t_o, t_b, ratio, ratio_min = measure(shapes, factory, base_factory, args.repeats, device=args.device)
            tgt = f"≤ {target}" if target else "-"
            print(f"| {model} ({n / 1e6:.2f}M) | {name} | {base_name} | {t_o * 1e3:.3f} | {t_b * 1e3:.3f} "
                  f"| {ratio:.2f} | {ratio_min:.2f} | {tgt} |", flush=True)


if __name__ == "__main__":
    main()
