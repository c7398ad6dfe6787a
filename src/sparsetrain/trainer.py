"""The training loop: one method (a :class:`~sparsetrain.methods.Strategy`), one model, one run
directory.

Run directory ``--out``:
  config.json     the resolved configuration (method options included)
  metrics.jsonl   one line per epoch: epoch, lr, train_loss, test_loss, test_accuracy,
                  sparsity, density, seconds (+ method extras, e.g. λ)
  checkpoint.pt   model, optimizer, scheduler, method state, history — written atomically at the
                  end of every epoch; ``--resume`` continues from it
  summary.json    final test_accuracy in [0, 1], sparsity, density, compression_ratio,
                  per_layer, flops, wall_seconds (+ method extras; target_sparsity and
                  target_met for methods with a target)
  .lock           held while a run writes there (:mod:`sparsetrain.runlock`): one run per directory

Reproducibility: the model is initialised from ``seed``; epoch e's batch order is drawn from
``seed`` and e alone, so a resumed run replays exactly the batches of an uninterrupted one.
Bit-identity holds for one CPU thread count (sums are split by thread): a run fixes its count
(``threads``, recorded in config.json) and ``--resume`` reuses it. Weights and evaluation are
checked for NaN/inf before every checkpoint (FloatingPointError, exit 3): a checkpoint holds
good state only. What ``--resume`` may change: :mod:`sparsetrain.resume`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import numbers
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import metrics, nm, usermodel
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from .data import DATASETS, Loaders, TensorLoader, make_loaders, user_loaders
from .errors import UsageError, check, choice
from .methods import BuildContext, Strategy, get_method
from .models import MODELS, batchnorm_layers, build_model, check_input
from .resume import check_resume_config
from .runlock import RunLock
from . import distributed as dist
from .liveness import DeadNetworkError, LivenessCheck

SCHEDULES = ("cosine", "step", "plateau", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
#: autocast dtype of each --precision (parameters and optimizer state stay fp32)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the training set is kept on the GPU when it takes at most this fraction of the free memory
GPU_DATA_FRACTION = 0.25
CHECKPOINT = "checkpoint.pt"
CHANCE_FACTOR = 1.5     # a final accuracy below 1.5 × 1/classes is reported as at chance
MAX_LR = 1e30                # beyond float32 range once scaled: an overflow, not a divergence
TARGET_TOLERANCE = 0.005     # |achieved − target sparsity| within which a target counts as met


@dataclass
class TrainConfig:
    method: str = "linbreg"
    model: str = "lenet300"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 20
    batch_size: int = 128
    lr: float | None = None               # None: the method's default
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)   # step schedule: fractions of training
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    val_fraction: float = 0.0
    train_subset: int | None = None
    test_subset: int | None = None
    progress: bool = True
    precision: str = "fp32"
    pattern: str | None = None            # N:M structured sparsity, e.g. "2:4"
    threads: int | None = None            # None: torch's count at the start (recorded in config.json)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, custom_data: bool = False, custom_model: bool = False) -> "TrainConfig":
        self._check_types()
        method = get_method(self.method)
        if not custom_model:       # a user's nn.Module: model is its class path (usermodel.py)
            choice(self.model, "--model", MODELS)
        if not custom_data:
            choice(self.data, "--data", DATASETS)
        choice(self.schedule, "--schedule", SCHEDULES)
        check(isinstance(self.epochs, int) and self.epochs > 0, "--epochs", "an integer > 0", self.epochs)
        check(isinstance(self.batch_size, int) and self.batch_size > 0, "--batch-size", "an integer > 0", self.batch_size)
        if self.lr is None:
            self.lr = method.default_lr(self.model)
        check(math.isfinite(self.lr) and 0 < self.lr <= MAX_LR, "--lr", f"a number > 0 and <= {MAX_LR:g} (float32 range)", self.lr)
        check(0 <= self.weight_decay < 1, "--weight-decay", ">= 0 and < 1", self.weight_decay)
        check(0 <= self.seed < 2**32, "--seed", f"an integer in [0, {2**32 - 1}]", self.seed)
        check(self.out is None or str(self.out).strip() != "", "--out", "a directory path (not empty)", self.out)
        check(0 <= self.val_fraction < 1, "--val-fraction", "in [0, 1)", self.val_fraction)
        check(0 < self.gamma <= 1, "--gamma", "in (0, 1]", self.gamma)
        check(all(0 < m < 1 for m in self.milestones), "--milestones", "fractions in (0, 1)", self.milestones)
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            check(v is None or v > 0, "--" + name.replace("_", "-"), "an integer > 0", v)
        check(self.threads is None or (isinstance(self.threads, int) and 0 < self.threads <= 4096), "--threads",
              "an integer in [1, 4096]", self.threads)
        choice(self.device if not self.device.startswith("cuda:") else "cuda", "--device", ("auto", "cpu", "cuda", "mps"))
        choice(self.precision, "--precision", PRECISIONS)
        nm.parse_pattern(self.pattern)
        self.options = method.resolve(self.options, self.model)
        return self

    def _check_types(self) -> None:
        """Python-API values of the wrong type: a one-line error naming the argument (the CLI
        and --config files hand over typed values)."""
        for f in dataclasses.fields(self):
            value, ann = getattr(self, f.name), str(f.type)
            if f.name == "options":
                ok = isinstance(value, dict)
            elif value is None:
                ok = "None" in ann
            elif ann.startswith("tuple"):
                ok = isinstance(value, (tuple, list)) and all(_is_number(v) for v in value)
            else:
                kind = ann.split("|")[0].strip()
                ok = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "float": _is_number,
                      "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool)}[kind](value)
            if not ok:
                raise UsageError(f"{f.name}: must be of type {ann}, got {value!r} ({type(value).__name__})")
            if value is not None and ann.split("|")[0].strip() in ("int", "float"):   # numpy scalars too
                setattr(self, f.name, int(value) if ann.startswith("int") else float(value))
        self.milestones = tuple(float(m) for m in self.milestones)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {name} requested but CUDA is not available; allowed here: auto, cpu")
    if name == "cuda":
        return torch.device("cuda", dist.local_rank())
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise UsageError("--device: mps requested but MPS is not available here; allowed here: auto, cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int,
                   schedule: str | None = None):
    """A per-step scheduler for cosine/step/constant, a per-epoch one for plateau."""
    total = max(1, steps_per_epoch * epochs)
    schedule = schedule or cfg.schedule
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    if schedule == "step":
        marks = [int(m * total) for m in cfg.milestones]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: cfg.gamma ** sum(k >= m for m in marks))
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.gamma, patience=2)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context of ``--precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Conv nets on a GPU run in channels_last (NHWC), the layout cuDNN's fast kernels use."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def keep_on_gpu(loaders: Loaders, device: torch.device) -> bool:
    """Move the loaders' tensors to the GPU when they fit (≤ GPU_DATA_FRACTION of the free
    memory; augmented loaders stay on the CPU): batches are then indexed on the device and
    nothing is copied per step. Returns whether they were moved."""
    if device.type != "cuda":
        return False
    parts = [ld for ld in (loaders.train, loaders.val, loaders.test) if ld is not None]
    if any(getattr(ld, "augment", False) or not hasattr(ld, "x") for ld in parts):
        return False
    size = sum(ld.x.numel() * ld.x.element_size() + ld.y.numel() * ld.y.element_size() for ld in parts)
    free, _ = torch.cuda.mem_get_info(device)
    if size > GPU_DATA_FRACTION * free:
        return False
    for ld in parts:
        ld.x, ld.y = ld.x.to(device), ld.y.to(device)
    return True


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) over ``loader``."""
    was = model.training
    model.eval()
    loss = correct = n = 0
    channels_last = uses_channels_last(model, device)
    for x, y in loader:
        x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x).float()
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was)
    return loss / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, batches: int, precision: str = "fp32",
                          channels_last: bool = False) -> None:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over the first
    ``batches`` batches of ``loader`` (train-mode forward passes, no gradient, weights untouched);
    nothing happens for ``batches`` 0 or a model without BatchNorm. During training the statistics
    are an EMA (momentum 0.1, ≈ the last 10 steps); where a λ controller rescales every weight from
    step to step (xRDA's w = S_λT(z)) they lag the weights, and the lag compounds over stacked
    BatchNorm layers (xRDA on ResNet-20 at 98 %: 42.7 % evaluated with them, 67.6 % recalibrated)."""
    norms = batchnorm_layers(model) if batches > 0 else []
    if not norms:
        return
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                    # a cumulative average over the batches
    model.train()
    try:
        for x, _ in itertools.islice(iter(loader), batches):
            with autocast(device, precision):
                model(to_input(x, device, channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class Trainer:
    """Runs ``cfg`` to completion; see the module docstring for the run directory."""

    def __init__(self, cfg: TrainConfig, loaders: Loaders | None = None, model: nn.Module | None = None,
                 model_args: dict | None = None):
        if model is not None:
            cfg.model = usermodel.class_path(model)
        self.threads_given = cfg.threads is not None      # else --resume takes the saved run's count
        self.cfg = cfg.validate(custom_data=loaders is not None, custom_model=model is not None)
        if cfg.threads is None:
            cfg.threads = torch.get_num_threads()
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size = dist.setup(self.device)
        self.is_main = self.rank == 0
        self.out = Path(cfg.out) if cfg.out else None
        self.lock: RunLock | None = None
        if self.out is not None:   # rank 0 alone touches --out; a failure there stops every rank
            dist.agree(self._prepare_out_dir if self.is_main else None)
        try:
            self._build(cfg, loaders, model, model_args)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg: TrainConfig, loaders: Loaders | None, model: nn.Module | None,
               model_args: dict | None) -> None:
        seed_everything(cfg.seed)
        if loaders is None:        # every rank reads the data (on every node): agree on failures
            box = {}
            dist.agree(lambda: box.setdefault("loaders", make_loaders(
                cfg.data, cfg.data_dir, cfg.batch_size, cfg.seed, cfg.val_fraction, cfg.train_subset,
                cfg.test_subset, rank=self.rank, world_size=self.world_size)))
            loaders = box["loaders"]
        self.loaders = loaders
        info = self.loaders.info
        self.in_shape = tuple(info.in_shape)
        # a user model: model.json records how to rebuild it (class, arguments, architecture)
        self.user_model = None
        if model is not None:
            entry = usermodel.record(model, model_args, info.in_shape, info.num_classes,
                                     describe=self.out is not None and self.is_main)
            self.user_model = entry if self.out is not None else None
        self.model = (model or build_model(cfg.model, info.in_shape, info.num_classes)).to(self.device)
        empty = [f"{n} {tuple(p.shape)}" for n, p in self.model.named_parameters() if p.numel() == 0]
        if empty:   # found now, not after training when its summary divides by its size
            raise UsageError(f"model: zero-size parameter {', '.join(empty[:3])}; allowed: layers with at least "
                             f"one weight")
        check_input(self.model, self.in_shape, info.num_classes, self.device,
                    "--model" if model is None else "model", cfg.model if model is None else type(model).__name__,
                    info.name)
        self.channels_last = uses_channels_last(self.model, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data_on_gpu = keep_on_gpu(self.loaders, self.device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise UsageError(f"--precision: fp16 needs a CUDA device (this run is on {self.device.type}); "
                             f"allowed here: fp32, bf16")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        ctx = BuildContext(cfg, cfg.options, len(self.loaders.train), self.device, self.in_shape)
        self.strategy: Strategy = get_method(cfg.method).build(self.model, ctx)
        self.net = dist.wrap(self.model, self.device)     # DDP in a multi-process run
        if self.out is not None:
            dist.agree(self._check_free_space if self.is_main else None)
        self.epochs = self.strategy.total_epochs(cfg.epochs)
        self.scheduler = make_scheduler(self.strategy.optimizer, cfg, len(self.loaders.train), self.epochs,
                                        "constant" if self.strategy.schedules_lr else None)
        self.liveness = LivenessCheck(self.model, total_steps=self.epochs * len(self.loaders.train))
        self.step = 0
        self.start_epoch = 0
        self.history: list[dict] = []
        self.wall = 0.0

    # ------------------------------------------------------------------ run directory
    def _prepare_out_dir(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: {out} exists and is not a directory; allowed: a new directory or a run directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as e:
            raise UsageError(f"--out: {out} is not writable ({e.strerror or e}); allowed: a writable directory") from None
        self.lock = RunLock(out)                        # held until run() returns or fails
        if (out / CHECKPOINT).exists() and not self.cfg.resume:
            self.release()
            raise UsageError(f"--out: {out} already holds a run; allowed: --resume to continue it, or another --out")
        for name in (CHECKPOINT, "metrics.jsonl", "config.json", "summary.json"):
            for stale in out.glob(f".{name}.*.tmp"):    # left by a write that was killed
                stale.unlink(missing_ok=True)

    def _check_free_space(self) -> None:
        """Refuse to start when --out's disk cannot hold the checkpoints (model, optimizer and
        method state, written next to the previous one)."""
        need = 3 * sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) + 2**20
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise UsageError(f"--out: {self.out} has {free / 2**20:.1f} MiB free but this run's checkpoints "
                             f"need about {need / 2**20:.1f} MiB; allowed: a directory on a disk with room")

    def _write(self, path: Path, fn) -> None:
        """Write a file of the run directory; an OSError (disk full, ...) becomes a one-line error."""
        try:
            fn()
        except OSError as e:
            raise UsageError(f"--out: cannot write {path} ({e.strerror or e}); the last good checkpoint "
                             f"is kept; free space and continue with --resume") from None

    def state_dict(self) -> dict:
        return {"epoch": len(self.history), "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.strategy.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "strategy": self.strategy.state_dict(), "history": self.history, "wall": self.wall,
                "rng": torch.get_rng_state(), "config": self.cfg.to_dict()}

    def load_state_dict(self, ck: dict) -> None:
        try:
            self.model.load_state_dict(ck["model"])
            self.strategy.load_state_dict(ck.get("strategy", {}))
            opt = self.strategy.optimizer   # step counts derived from --epochs: this run's (it may extend)
            fresh = [{k: g[k] for k in ("total_steps", "milestones") if k in g} for g in opt.param_groups]
            opt.load_state_dict(ck["optimizer"])
            for g, keep in zip(opt.param_groups, fresh):
                g.update(keep)
            self.scheduler.load_state_dict(ck["scheduler"])
            self.step, self.history, self.wall = ck["step"], list(ck["history"]), ck.get("wall", 0.0)
            self.start_epoch = ck["epoch"]
            torch.set_rng_state(ck["rng"].cpu())
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            reason = (f"no {e.args[0]!r} entry" if isinstance(e, KeyError) and e.args
                      else (str(e).splitlines() or [type(e).__name__])[0][:160])
            raise UsageError(f"--resume: checkpoint does not match this run ({reason}); allowed: the checkpoint "
                             f"of a run with the same --method, --model and options") from None

    def _maybe_resume(self) -> None:
        if not (self.cfg.resume and self.out is not None):
            return
        box = {}

        def read():   # rank 0 only: the run directory may exist on its node alone
            if not (self.out / CHECKPOINT).exists():   # e.g. killed before its first epoch ended
                print(f"sparsetrain: note: --resume: {self.out} holds no checkpoint yet; starting the run from "
                      f"epoch 1", file=sys.stderr)
                return
            ck = load_checkpoint(self.out / CHECKPOINT, map_location="cpu")
            old = ck.get("config", {})
            check_resume_config(self.cfg, old if isinstance(old, dict) else {}, self.out, self.strategy.inert)
            done = ck.get("epoch")
            if isinstance(done, int) and done > self.epochs:
                raise UsageError(f"--resume: --epochs {self.cfg.epochs} is fewer than the {done} epochs the run in "
                                 f"{self.out} has done; allowed: --epochs >= {done} (a larger value extends the run)")
            box["ck"] = ck

        dist.agree(read if self.is_main else None)
        ck = dist.broadcast_object(box.get("ck"))
        if ck is None:
            return
        saved = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        if not self.threads_given and isinstance(saved.get("threads"), int) and saved["threads"] > 0:
            self.cfg.threads = saved["threads"]
        ck = {k: v if k == "rng" else _to_device(v, self.device) for k, v in ck.items()}
        dist.agree(lambda: self.load_state_dict(ck))

    # ------------------------------------------------------------------ loop
    def evaluate(self, loader: TensorLoader | None = None) -> tuple[float, float]:
        return evaluate(self.model, loader or self.loaders.test, self.device, self.cfg.precision)

    def train_epoch(self, epoch: int) -> float:
        model, strat, opt = self.net, self.strategy, self.strategy.optimizer
        multi = dist.is_multi()
        # parameters the optimizer steps that DDP does not see (e.g. HALO's scales): their
        # gradients are averaged over ranks by hand, so that every rank takes the same step
        in_ddp = {id(p) for p in self.model.parameters()}
        outside_ddp = [p for g in opt.param_groups for p in g["params"] if id(p) not in in_ddp] if multi else []
        per_step_schedule = not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        model.train()
        self.loaders.train.set_epoch(epoch)
        total, n = 0.0, 0
        bar = _progress(self.loaders.train, len(self.loaders.train), f"epoch {epoch + 1}/{self.epochs}",
                        self.cfg.progress and self.is_main)
        for x, y in bar:
            x, y = to_input(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)
            count = len(y)
            with autocast(self.device, self.cfg.precision):
                out = model(x).float()
            if multi:
                # this rank's share of the global batch's mean loss: DDP averages gradients over
                # ranks, which then gives the single-process step even for unequal shards
                ce = F.cross_entropy(out, y, reduction="sum")
                stats = dist.all_reduce_sum(torch.stack([ce.detach().double(), ce.new_tensor(count, dtype=torch.float64)]))
                ce_sum, count = stats.tolist()                  # one transfer for both
                count = int(count)
                loss = ce * (self.world_size / count)
                ce_value = ce_sum / count                       # the global batch's loss, on every rank
            else:
                loss = F.cross_entropy(out, y)
            extra = strat.penalty()
            full = loss if extra is None else loss + extra
            value = full.item() if not multi else ce_value + (0.0 if extra is None else extra.item())
            if not math.isfinite(value):
                err = FloatingPointError(f"loss is {value} at step {self.step} (epoch {epoch + 1}); "
                                         f"the last good checkpoint is kept; try a smaller --lr")
                err.quiet = not self.is_main          # every rank stops here; rank 0 reports it
                raise err
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(full).backward()
            if self.scaler.is_enabled():            # fp16: true gradients for the strategy and the step
                self.scaler.unscale_(opt)
            dist.average_gradients(outside_ddp)
            try:
                self.liveness.observe(self.step)
            except DeadNetworkError as e:
                e.quiet = not self.is_main            # every rank stops here; rank 0 reports it
                raise
            strat.after_backward(self.step)
            self.scaler.step(opt)                   # fp16: skipped on inf/NaN gradients
            self.scaler.update()
            strat.after_step(self.step)
            if per_step_schedule:
                self.scheduler.step()
            self.step += 1
            total += value * count
            n += count
            if hasattr(bar, "set_postfix") and self.step % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
        return total / max(n, 1)

    def release(self) -> None:
        """Give up the lock on ``--out`` (run() does so when it returns or fails)."""
        if self.lock is not None:
            self.lock.release()

    def run(self) -> dict:
        threads = torch.get_num_threads()
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            self.release()

    def _run(self) -> dict:
        self._maybe_resume()
        # results are bit-identical for a given thread count (reductions split by thread): a run
        # uses one count throughout, recorded in config.json and taken over by --resume
        torch.set_num_threads(self.cfg.threads)
        if self.out is not None:
            dist.agree((lambda: self._write(self.out / "config.json", lambda: write_json(
                self.cfg.to_dict(), self.out / "config.json"))) if self.is_main else None)
            if self.user_model is not None:
                dist.agree((lambda: self._write(self.out / usermodel.FILE, lambda: write_json(
                    self.user_model, self.out / usermodel.FILE))) if self.is_main else None)
            if self.history:   # resumed: metrics.jsonl may lag the checkpoint (a kill between the two)
                dist.agree((lambda: self._write(self.out / "metrics.jsonl", self._write_metrics))
                           if self.is_main else None)
        for epoch in range(self.start_epoch, self.epochs):
            t0 = time.perf_counter()
            lr = self.strategy.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch(epoch)
            recalibrate_batchnorm(self.model, self.loaders.train, self.device, self.strategy.bn_recalibration,
                                  self.cfg.precision, self.channels_last)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds = time.perf_counter() - t0
            dist.broadcast_buffers(self.model)   # e.g. BatchNorm statistics: rank 0's, as DDP does
            self.strategy.end_epoch(epoch, self)
            test_loss, test_acc = self.evaluate()
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                val = self.evaluate(self.loaders.val)[1] if self.loaders.val is not None else test_acc
                self.scheduler.step(val)
            seconds = time.perf_counter() - t0
            self.wall += seconds
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "test_loss": test_loss,
                   "test_accuracy": test_acc, "sparsity": metrics.sparsity(self.model),
                   "density": metrics.density(self.model), "seconds": round(seconds, 3),
                   "train_seconds": round(train_seconds, 3), **self.strategy.log()}
            if self.loaders.val is not None:
                row["val_accuracy"] = self.evaluate(self.loaders.val)[1]
            self._check_finite(row)
            self.history.append(row)
            if dist.is_multi():
                dist.check_in_sync(self._state_tensors())
            if self.is_main:
                self._log(row)
            if self.out is not None:
                dist.agree(self._save if self.is_main else None)
        return self.finish()

    def _check_finite(self, row: dict) -> None:
        """A non-finite weight or evaluation stops the run before it is checkpointed (exit 3):
        a checkpoint holds good state only, so --resume and export never start from NaNs."""
        bad = [k for k in ("train_loss", "test_loss") if not math.isfinite(row[k])]
        state = {name: t for name, t in self.model.state_dict().items() if t.is_floating_point()}
        finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).tolist() if state else []
        bad += [f"{name} has non-finite values" for name, ok in zip(state, finite) if not ok][:3]
        if bad:
            what = ", ".join(f"{b} is {row[b]}" if b in row else b for b in bad)
            err = FloatingPointError(f"epoch {row['epoch']}: {what}; the last good checkpoint is kept "
                                     f"(not this epoch); try a smaller --lr")
            err.quiet = not self.is_main
            raise err

    def _save(self) -> None:
        self._write(self.out / CHECKPOINT, lambda: save_checkpoint(self.state_dict(), self.out / CHECKPOINT))
        self._write(self.out / "metrics.jsonl", self._write_metrics)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that must be equal on all ranks: weights and buffers, optimizer and method state."""
        out: dict[str, torch.Tensor] = {}
        for prefix, obj in (("model", self.model.state_dict()), ("optimizer", self.strategy.optimizer.state_dict()),
                            ("strategy", self.strategy.state_dict())):
            _flatten_tensors(prefix, obj, out)
        return out

    def finish(self) -> dict:
        extras = self.strategy.finish(self)
        pattern = nm.parse_pattern(self.cfg.pattern)
        if pattern is not None:   # the exact N:M projection (a no-op for masks pruned in N:M blocks)
            before = self.evaluate()[1]
            extras = {**extras, **nm.project_(self.model, *pattern), "accuracy_before_pattern": before}
        test_loss, test_acc = self.evaluate()
        summary = {"method": self.cfg.method, "model": self.cfg.model, "data": self.cfg.data,
                   "epochs": self.epochs, "test_accuracy": test_acc, "test_loss": test_loss,
                   **metrics.summary(self.model, self.in_shape), "wall_seconds": round(self.wall, 2),
                   "epoch_seconds": _epoch_seconds(self.history), "precision": self.cfg.precision,
                   "options": self.cfg.options, **extras}
        target = self.cfg.options.get("sparsity")
        if target is not None:   # a missed target is reported, not passed off as a result at that target
            summary["target_sparsity"] = target
            summary["target_met"] = abs(summary["sparsity"] - target) <= TARGET_TOLERANCE
            if not summary["target_met"] and self.is_main:
                print(f"sparsetrain: warning: {self.cfg.method} ended at sparsity {summary['sparsity']:.4f}, "
                      f"missing its target {target:g} by more than {TARGET_TOLERANCE:g} (target_met: false in "
                      f"summary.json); more --epochs or another --lr may reach it", file=sys.stderr)
        chance = 1.0 / self.loaders.info.num_classes
        summary["at_chance"] = test_acc < CHANCE_FACTOR * chance
        if summary["at_chance"] and self.is_main:   # a run that learned nothing is not a result
            print(f"sparsetrain: warning: test accuracy {test_acc:.4f} is at chance level (1/{self.loaders.info.num_classes}"
                  f" = {chance:.4f}; at_chance: true in summary.json); try another --lr or more --epochs",
                  file=sys.stderr)
        if self.out is not None:
            dist.agree((lambda: self._write(self.out / "summary.json", lambda: write_json(
                summary, self.out / "summary.json"))) if self.is_main else None)
        # the DDP wrapper goes first: its reducer holds the process group, and a group destroyed
        # later by garbage collection joins gloo threads whose peer has exited (a hang)
        self.net = self.model
        dist.teardown()
        return summary

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.history).encode()
        atomic_write(self.out / "metrics.jsonl", lambda f: f.write(text))

    def _log(self, row: dict) -> None:
        if self.cfg.progress:
            print(f"epoch {row['epoch']:>3}/{self.epochs}  loss {row['train_loss']:.4f}  "
                  f"test acc {row['test_accuracy']:.4f}  sparsity {row['sparsity']:.4f}  "
                  f"({row['seconds']:.1f}s)", flush=True)


def _epoch_seconds(history: list[dict]) -> float | None:
    """Median training time of an epoch (without evaluation; the first epoch, which includes
    kernel compilation and autotuning, only when it is the only one)."""
    times = [r["train_seconds"] for r in history if "train_seconds" in r]
    times = times[1:] if len(times) > 1 else times
    return round(statistics.median(times), 3) if times else None


def _to_device(obj, device: torch.device):
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _flatten_tensors(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten_tensors(f"{prefix}.{k}", v, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_tensors(f"{prefix}.{i}", v, out)


def train(cfg: TrainConfig | None = None, *, loaders: Loaders | None = None, model: nn.Module | None = None,
          train_data=None, test_data=None, model_args: dict | None = None, **kwargs) -> dict:
    """Train and return the summary.

    ``train(method="linbreg", epochs=5, sparsity=0.95, out="runs/x")`` trains on a built-in
    dataset (keywords that are not :class:`TrainConfig` fields are the method's options);
    ``train(train_data=ds_or_loader, test_data=..., model=net, method="adabreg")`` on the user's
    own ``Dataset``/``DataLoader`` objects. With a model object the run directory records its
    class path, ``model_args`` (its constructor's keyword arguments, if given) and its
    architecture in ``model.json``, so that ``sparsetrain inspect`` / ``export`` work on it."""
    if isinstance(model, str):   # a model name, not a module
        kwargs["model"], model = model, None
    if cfg is None:   # keyword arguments that are no TrainConfig field are method options
        fields = set(TrainConfig.__dataclass_fields__)
        options = {**kwargs.pop("options", {}), **{k: kwargs.pop(k) for k in list(kwargs) if k not in fields}}
        cfg = TrainConfig(**kwargs, options=options)
    if train_data is not None:
        if test_data is None:
            raise UsageError("test_data: required when train_data is given (a Dataset or DataLoader)")
        loaders = user_loaders(train_data, test_data, cfg.batch_size, cfg.seed)
        cfg.data = loaders.info.name
    if model_args is not None and model is None:
        raise UsageError("model_args: only with model= (an nn.Module object)")
    return Trainer(cfg, loaders, model, model_args).run()
