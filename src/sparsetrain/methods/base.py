"""The method registry: how a training method plugs into the trainer without touching it.

A *method* (``dense``, ``linbreg``, ``gmp``, ``halo`` ...) is registered with :func:`register`
as a builder ``build(model, ctx) -> Strategy``, a help line, a default learning rate and its own
:class:`Option` s (each becomes a ``--flag`` of ``sparsetrain train``). A :class:`Strategy` owns
the optimizer and hooks into the plain training loop of :mod:`sparsetrain.trainer`:

    for epoch in range(strategy.total_epochs(cfg.epochs)):
        for step, (x, y) in batches:
            loss = criterion(model(x), y) + strategy.penalty()      # e.g. HALO's penalty
            loss.backward(); strategy.after_backward(step)          # e.g. RigL reads dense grads
            strategy.optimizer.step(); strategy.after_step(step)    # e.g. masks, GMP pruning
        strategy.end_epoch(epoch, trainer)                          # e.g. prune, rewind (IMP)
    summary |= strategy.finish(trainer)

Everything a strategy must carry over a ``--resume`` goes into ``state_dict()`` (tensors and
plain Python values only: checkpoints load with ``weights_only=True``).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import UsageError, choice

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import TrainConfig, Trainer


@dataclass(frozen=True)
class Option:
    """A method's option: ``--{name with dashes}`` on the command line, ``name`` in Python.

    ``valid`` checks a value; ``allowed`` describes the valid values in the error message.
    """
    name: str
    type: type
    default: Any
    help: str
    allowed: str = ""
    valid: Callable[[Any], bool] | None = None
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        if value is None:
            return value
        kind = {int: numbers.Integral, float: numbers.Real}.get(self.type, self.type)
        if not isinstance(value, kind) or (self.type is not bool and isinstance(value, bool)):
            # only Python callers can get here (flags and --config values are typed): name the argument
            raise UsageError(f"{self.name}: must be of type {self.type.__name__}, got {value!r} "
                             f"({type(value).__name__})")
        if self.type in (int, float):
            value = self.type(value)                    # numpy scalars become plain numbers
        if self.choices is not None:
            choice(value, self.flag, self.choices)
        if self.type is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UsageError(f"{self.flag}: must be a finite number{' ' + self.allowed if self.allowed else ''}, "
                             f"got {value!r}")
        if self.valid is not None and not self.valid(value):
            raise UsageError(f"{self.flag}: must be {self.allowed}, got {value!r}")
        return value


# Reusable option definitions (methods share flags with the same meaning and type).
def positive(name, default, help, type=float):
    return Option(name, type, default, help, "> 0", lambda v: v > 0)


def nonnegative(name, default, help, type=float):
    return Option(name, type, default, help, ">= 0", lambda v: v >= 0)


def fraction(name, default, help, allowed="in [0, 1)", valid=lambda v: 0 <= v < 1):
    return Option(name, float, default, help, allowed, valid)


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def regex_option(name, help):
    return Option(name, str, "", help, "a valid regular expression (Python re), e.g. 'fc$'", _is_regex)


def sparsity_option(default=0.9):
    return fraction("sparsity", default, "target fraction of zero weights (Linear/Conv weights)")


def momentum_option(default):
    return fraction("momentum", default, "momentum β")


@dataclass
class BuildContext:
    """What a method's builder gets besides the model."""
    cfg: "TrainConfig"
    options: dict[str, Any]
    steps_per_epoch: int
    device: torch.device
    in_shape: tuple[int, ...]

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


class Strategy:
    """Default hooks of a method: plain optimizer steps, nothing else.

    ``schedules_lr = True`` tells the trainer that the optimizer follows its own step-size
    schedule (xRDA), so the trainer's learning-rate schedule stays constant. ``bn_recalibration
    = N > 0``: after every epoch the trainer re-estimates the BatchNorm statistics over N training
    batches (:func:`sparsetrain.trainer.recalibrate_batchnorm`). ``inert``: options whose value
    does nothing on this model (``--resume`` does not compare them with the saved run's)."""

    schedules_lr = False
    bn_recalibration = 0
    inert: frozenset[str] = frozenset()
    saved: tuple[str, ...] = ()      # plain attributes that state_dict() checkpoints and load_state_dict() restores

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def total_epochs(self, epochs: int) -> int:
        """Epochs the trainer runs in all (e.g. training + fine-tuning)."""
        return epochs

    def penalty(self) -> torch.Tensor | None:
        """Extra term added to the loss (None: nothing)."""
        return None

    def after_backward(self, step: int) -> None:
        """Called after ``loss.backward()``, before the optimizer step."""

    def after_step(self, step: int) -> None:
        """Called after the optimizer step (``step`` counts from 0 over the whole run)."""

    def end_epoch(self, epoch: int, trainer: "Trainer") -> None:
        """Called after epoch ``epoch`` (0-based), before it is evaluated and checkpointed."""

    def log(self) -> dict:
        """Extra fields for this epoch's line of metrics.jsonl (plain numbers)."""
        return {}

    def finish(self, trainer: "Trainer") -> dict:
        """Called once after the last epoch; returns extra fields for summary.json."""
        return {}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.saved}

    def load_state_dict(self, state: dict) -> None:
        for k in self.saved:
            if k in state:
                setattr(self, k, state[k])


@dataclass
class Method:
    name: str
    help: str
    build: Callable[[nn.Module, BuildContext], Strategy]
    lr: float = 0.1
    options: tuple[Option, ...] = field(default_factory=tuple)
    check: Callable[[dict[str, Any], set, str | None], None] | None = None   # checks across options (UsageError)
    # per built-in model: defaults that differ from the method's own ({"lr": ..., option: ...})
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def default_lr(self, model: str | None = None) -> float:
        return self.model_defaults.get(model, {}).get("lr", self.lr)

    def resolve(self, given: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        """This method's options: given values (checked) over defaults (``model``'s where it has
        its own). Options that belong to other methods only are refused with the list of this
        method's options."""
        own = {o.name: o for o in self.options}
        for k, v in given.items():
            if v is not None and k not in own:
                names = ", ".join(o.flag for o in self.options) or "none"
                raise UsageError(f"--{k.replace('_', '-')}: not an option of method {self.name} (its options: {names})")
        defaults = {**{k: o.default for k, o in own.items()}, **{
            k: v for k, v in self.model_defaults.get(model, {}).items() if k in own}}
        resolved = {k: o.check(given[k]) if given.get(k) is not None else defaults[k] for k, o in own.items()}
        if self.check is not None:
            self.check(resolved, {k for k, v in given.items() if v is not None}, model)
        return resolved


METHODS: dict[str, Method] = {}

# The learning rate of every method that trains with SGD + momentum (dense, the pruning baselines,
# HALO, ProxSGD, gRDA): ``@register(..., **SGD_LR)``. lr 0.1, except on VGG-16-bn, where it diverged
# in the first steps: dense on Fashion-MNIST ends its first epoch at a loss of 4.39 (batch 32) / 4.14
# (batch 128), above the ln 10 = 2.30 of a uniform guess, and stays at chance (13.4 % at the quick
# budget: 2000 images, 3 epochs). At lr 0.02 (same budget, 98 % for the
# sparse ones): dense 50.9 %, GMP 66.5 % (13.5 % at 0.1), HALO 52.6 % (12.8 %). ResNet-56 (as He et al.
# warmed up their deepest ResNet) started badly at lr 0.1: first-epoch loss 2.89 (batch 128, 6000 images;
# 1.86 at 0.05), dense 25.3 vs 67.2 % after 2 epochs; quick budget: dense 41.6 vs 61.4 %, HALO at 98 %
# 19.2 / 10.9 / 28.1 % vs 38.3 / 60.6 / 46.3 % (seeds 0-2), GMP 25.1 vs 60.9 % (seed 1): lr 0.05.
SGD_LR = {"lr": 0.1, "model_defaults": {"vgg16": {"lr": 0.02}, "resnet56": {"lr": 0.05}}}


def register(name: str, help: str, lr: float = 0.1, options: tuple[Option, ...] = (), check=None,
             model_defaults: dict[str, dict[str, Any]] | None = None):
    """Decorator: register ``build(model, ctx) -> Strategy`` as method ``name`` (``check``: a
    function of the resolved options, the set of names given explicitly and the model's name
    that raises a UsageError for a bad combination, and may adjust a default that does not fit
    the others;
    ``model_defaults``: built-in model name -> defaults of its own, ``lr`` and options)."""
    def deco(build):
        METHODS[name] = Method(name, help, build, lr, tuple(options), check, dict(model_defaults or {}))
        return build
    return deco


def model_defaults_text() -> str:
    """The per-model defaults of every method, one line each (for ``train --help``)."""
    lines = []
    for name, m in sorted(METHODS.items()):
        for model, d in m.model_defaults.items():
            lines.append(f"  {name} on {model}: " + ", ".join(
                f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                for k, v in d.items()))
    return "\n".join(lines)


def ignored_option(key: str, why: str, allowed: str) -> UsageError:
    """The error for an option given explicitly that this run would not use: ``--key: why;
    allowed: ALLOWED, or leave --key out``."""
    flag = "--" + key.replace("_", "-")
    return UsageError(f"{flag}: {why}; allowed: {allowed}, or leave {flag} out")


def get_method(name: str) -> Method:
    return METHODS[choice(name, "--method", sorted(METHODS), "method")]


def all_options() -> dict[str, Option]:
    """Every method's options by name (the first definition of a shared name wins for help/type)."""
    out: dict[str, Option] = {}
    for m in METHODS.values():
        for o in m.options:
            if o.name in out and out[o.name].type is not o.type:
                raise TypeError(f"option {o.name} declared with two types")
            out.setdefault(o.name, o)
    return out
