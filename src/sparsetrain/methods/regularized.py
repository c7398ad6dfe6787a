"""Regularization methods (SPEC §1-4): ``proxsgd``, ``linbreg``, ``adabreg``, ``xrda``, ``grda``.

Each builds one of :mod:`sparsetrain.optim` over :func:`sparsetrain.param_groups`, so only
Linear/Conv weights carry the regularizer (``--reg``, strength ``--lam``); biases and norms are
trained plainly. ``--exclude REGEX`` keeps matching layers dense (e.g. the last classifier).
Bregman methods start from a sparse initialisation (``--init-density``, SPEC §2).

``--sparsity S`` hands λ to a controller (:mod:`sparsetrain.controller`) that adapts it during
training so the run ends at sparsity S; ``--lam`` is then only the starting value. Given
``--lam`` alone, λ stays fixed (for experts); given neither, the target is ``DEFAULT_SPARSITY``.
The λ trajectory is logged (``lam`` in metrics.jsonl, ``lam_trajectory`` in summary.json).

Defaults, measured on Fashion-MNIST (README): LinBreg lr 0.5 with dampened momentum 0.9 (lr 1
takes the step of SGD lr 0.1 with momentum 0.9 and diverged at small batches), AdaBreg lr 1e-2,
both from a 0.2 % sparse initialisation spread by Erdős–Rényi-kernel with a floor of one weight
per unit, with one λ per layer on an ERK budget (``--distribution erk``); per built-in model
(``model_defaults``, listed by ``train --help``): a 1 % start on the LeNets and MLP-Bregman, LinBreg lr 0.4 and one
global λ on LeNet-5, 0.1 on the ConvNet, 1 on the ResNets and VGG-16. xRDA s₀ = 1,
τ = τ_b = 9.5, M = 500 (the paper's values; s₀ 0.2 on VGG-16, 0.5 on ResNet-56), λ starting at 1e-8 under a target, one
global λ, BatchNorm statistics re-estimated after every epoch (``--bn-recalibrate``). The SGD-based
methods take lr 0.02 on VGG-16 and 0.05 on ResNet-56 (``SGD_LR``)."""
from __future__ import annotations

import math

from torch import nn

from .. import optim
from ..errors import UsageError
from ..init import ALLOCATIONS, sparse_init_
from ..models import MODELS, batchnorm_layers, has_batchnorm
from ..params import param_groups
from ..regularizers import L1, make_regularizer
from ..controller import DISTRIBUTIONS, BudgetController, SparsityController
from ..optim import BregmanOptimizer
from .pruning import distribution_option, int_option
from .base import (SGD_LR, BuildContext, Option, Strategy, fraction, ignored_option, momentum_option,
                   nonnegative, positive, regex_option, register)


DEFAULT_SPARSITY = 0.9
MAX_DELTA = 100.0
MIN_INIT_DENSITY = 1e-4
DEFAULT_LAM = 1e-3
# xRDA's threshold is λ·T, and T accumulates s·b with b up to M (500): a starting λ of 1e-3 removes
# most weights in the first steps, and units whose weights all go to zero die for good (a ReLU
# that never fires gets no gradient); LeNet-5 at 98 % ended at 45 % that way. xRDA starts tiny and
# the controller raises λ (at most 2× per update) as the target density comes down.
XRDA_START_LAM = 1e-8


def _target_sparsity(options: dict, lam_key: str = "lam") -> float | None:
    """The run's target sparsity: ``--sparsity``, else DEFAULT_SPARSITY unless a λ was given (fixed λ)."""
    if options.get("sparsity") is None and options.get(lam_key) is None:
        return DEFAULT_SPARSITY
    return options.get("sparsity")


def _target(options: dict, lam_key: str = "lam", start: float = DEFAULT_LAM) -> dict:
    """Fill in the target sparsity and the (starting) λ: a λ given alone stays fixed."""
    options["sparsity"] = _target_sparsity(options, lam_key)
    if options.get(lam_key) is None:
        options[lam_key] = start
    return options


class Regularized(Strategy):
    """A regularized optimizer, with λ steered to ``--sparsity`` when one is requested."""

    def __init__(self, model, optimizer, ctx: BuildContext, schedules_lr: bool = False, bn_recalibration: int = 0):
        super().__init__(model, optimizer)
        self.schedules_lr, self.bn_recalibration = schedules_lr, bn_recalibration
        target = ctx.options.get("sparsity")
        bregman = isinstance(optimizer, BregmanOptimizer)
        if target is not None and bregman and not BudgetController.supports(optimizer):
            raise UsageError(f"--reg: {ctx.options.get('reg')} has no admission threshold, so {type(optimizer).__name__} "
                             f"cannot be steered to --sparsity {target:g}; allowed: {', '.join(BUDGET_REGS)}, "
                             f"or a fixed --lam without --sparsity")
        kind = BudgetController if bregman else SparsityController
        self.controller = None if target is None else kind(
            optimizer, model, target, ctx.total_steps, ramp=ctx.options.get("ramp", 0.75),
            distribution=ctx.options.get("distribution", "global"))

    def after_step(self, step: int) -> None:
        if self.controller is not None:
            self.controller.update(step)

    def log(self) -> dict:
        lams = [x for x in self.optimizer.get_lam() if x is not None]
        return {"lam": max(lams)} if lams else {}

    def finish(self, trainer) -> dict:
        return {} if self.controller is None else {"lam_trajectory": self.controller.trajectory,
                                                   "target_sparsity": 1 - self.controller.target}

    def state_dict(self) -> dict:
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])


TARGET = fraction("sparsity", None, "target sparsity: adapt λ so the run ends there "
                  f"(default {DEFAULT_SPARSITY}, or a fixed λ when only --lam/--c is given)")

RAMP = fraction("ramp", 0.75, "fraction of training at which the λ controller's density path reaches "
               "--sparsity", "in (0, 1]", lambda v: 0 < v <= 1)

REGS = ("l1", "group", "conv-group", "sparse-group", "nuclear", "none")
BUDGET_REGS = ("l1", "group", "conv-group")   # their activation gives the BudgetController its threshold


def _layer_regularizers(kind: str, lam: float, groups: str, shared: bool = True):
    """``(name, module, param) -> regularizer``: ``conv-group`` puts the group lasso on Conv
    weights (grouped by ``groups``) and ℓ1 on Linear weights, as the Bregman ConvNet does;
    the others use one regularizer kind everywhere (row groups for Linear weights).
    ``shared=False``: a regularizer object of its own for every layer (per-layer λ)."""
    cache: dict = {}

    def get(name, lam_, grouping=None):
        key = (name, grouping)
        if not shared:
            return make_regularizer(name, lam_, groups=grouping)
        if key not in cache:
            cache[key] = make_regularizer(name, lam_, groups=grouping)
        return cache[key]

    def select(_name, module, _param):
        conv = not isinstance(module, nn.Linear)
        if kind == "conv-group":
            return get("group", lam, groups) if conv else get("l1", lam)
        if kind in ("group", "sparse-group"):
            return get(kind, lam, groups if conv else "rows")
        return get(kind, lam)
    return select


def _groups(model, ctx: BuildContext, **extra):
    """Param groups with the method's regularizers; per-layer budgets (``--distribution`` uniform
    or erk) get one group per layer, each with its own regularizer (its own λ)."""
    o = _target(ctx.options)
    per_layer = o.get("distribution", "global") != "global"
    select = _layer_regularizers(o["reg"], o["lam"], o["groups"], shared=not per_layer)
    return param_groups(model, select, exclude=o["exclude"] or None, **extra)


REG_OPTIONS = (
    Option("reg", str, "l1", "regularizer on Linear/Conv weights", choices=REGS),
    nonnegative("lam", None, "regularization strength λ (fixed unless --sparsity is given)"),
    Option("groups", str, "kernels", "conv grouping for group regularizers", choices=("kernels", "filters")),
    regex_option("exclude", "regex of layer names kept dense and unregularized (e.g. 'fc$')"),
    TARGET, RAMP,
)
BREGMAN_OPTIONS = REG_OPTIONS + (
    Option("delta", float, 1.0, "elastic-net parameter δ of J_δ = J + ‖·‖²/(2δ) (w = δ·shrink(v): a δ far above "
           "1 multiplies the step)", f"> 0 and <= {MAX_DELTA:g}", lambda v: 0 < v <= MAX_DELTA),
    # the sparse initialisation scales its weights by 1/√p: below MIN_INIT_DENSITY they start huge
    Option("init_density", float, 0.002, "density p of the sparse initialisation (1 = dense init)",
           f"in [{MIN_INIT_DENSITY:g}, 1]", lambda v: MIN_INIT_DENSITY <= v <= 1),
    Option("init_scale", float, 0.0, "scale r of the sparse initialisation (0 = 1/√p)", ">= 0", lambda v: v >= 0),
    Option("init_bias_scale", float, 1.0, "scale r₀ of the sparse initialisation's biases, U(0, r₀/√fan_in) "
           "(the authors' scripts: 5)", ">= 0", lambda v: 0 <= v < math.inf),
    Option("init_distribution", str, "erk", "how --init-density is spread over layers (uniform | erk); every "
           "output unit gets at least one weight", choices=ALLOCATIONS),
    distribution_option("erk", DISTRIBUTIONS),
)


CONTROLLER_OPTIONS = ("ramp", "distribution")   # shape the λ controller: used only under a target sparsity


def _check_controller(options: dict, explicit: set = frozenset(), model: str | None = None,
                      lam_key: str = "lam") -> None:
    """``--ramp`` / ``--distribution`` shape the λ controller; a fixed λ (no target) has none."""
    given = [k for k in CONTROLLER_OPTIONS if k in explicit]
    if given and _target_sparsity(options, lam_key) is None:
        raise ignored_option(given[0], f"only used with a target sparsity, and this run has a fixed "
                             f"--{lam_key.replace('_', '-')} and no --sparsity", "add --sparsity")


INIT_SHAPE_OPTIONS = ("init_scale", "init_bias_scale", "init_distribution")


def _check_bregman(options: dict, explicit: set = frozenset(), model: str | None = None) -> None:
    _check_controller(options, explicit)
    _check_init_density(options, explicit)
    ignored = [k for k in INIT_SHAPE_OPTIONS if k in explicit]
    if options["init_density"] >= 1 and ignored:
        raise ignored_option(ignored[0], "shapes the sparse initialisation, which --init-density 1 (a dense "
                             "start) does not use", "an --init-density below 1")


def _check_init_density(options: dict, explicit: set = frozenset()) -> None:
    """Bregman iterations grow the support from the sparse initialisation (a λ change re-initialises
    v from the current weights, so every nonzero weight stays active): a start denser than the
    target could never come down to it. A default start (a model's own) is lowered to a fifth of
    the target density instead."""
    target = _target_sparsity(options)
    if target is not None and "init_density" not in explicit and options["init_density"] > 1 - target:
        options["init_density"] = max(MIN_INIT_DENSITY, (1 - target) / 5)
    if target is not None and options["init_density"] > 1 - target + 1e-12:
        raise UsageError(f"--init-density: {options['init_density']:g} is denser than the target density "
                         f"1 − sparsity = {1 - target:g}, which Bregman iterations (they only grow the support) "
                         f"cannot reach; allowed: (0, {1 - target:g}]")


def _sparse_init(model, ctx: BuildContext) -> None:
    o = ctx.options
    if o["init_density"] < 1:
        grouping = {"group": "rows", "conv-group": "kernels"}.get(o["reg"], "entries")
        sparse_init_(model, o["init_density"], scale=o["init_scale"] or None, groups=grouping,
                     allocation=o["init_distribution"], bias_scale=o["init_bias_scale"])


@register("proxsgd", "proximal SGD with momentum on an ℓ1 (or group) penalty", **SGD_LR,
          options=REG_OPTIONS + (momentum_option(0.9), distribution_option("global", DISTRIBUTIONS)),
          check=_check_controller)
def build_proxsgd(model, ctx: BuildContext) -> Strategy:
    opt = optim.ProxSGD(_groups(model, ctx), lr=ctx.cfg.lr, momentum=ctx.options["momentum"],
                        weight_decay=ctx.cfg.weight_decay)
    return Regularized(model, opt, ctx)


# LinBreg's lr (dampened momentum 0.9: lr 1 takes SGD(0.1, momentum 0.9)'s step). lr 1 was best on
# LeNet-300-100 at 98 % (87.6 vs 86.9 % at 0.5, batch 128) but diverged at batch 32 on the MLPs
# (LeNet-300-100 at chance, MLP-Bregman inf at step 81), on the Bregman ConvNet at step 13 and
# on LeNet-5 (10 % for ten epochs): 0.5 by default, 0.1 for the conv nets without BatchNorm,
# 1 for the BatchNorm ResNets (ResNet-20: 70.4 % at lr 1 vs 67.8 % at 0.1; VGG-16-bn alike).
# On LeNet-300-100 and LeNet-5 a 1 % sparse start beats 0.2 % (98 %, seed 0: 87.42 vs 87.18 %; LeNet-5
# with lr 0.4: 84.91 %, vs 82.99 % from 0.2 % at lr 0.1); from 1 % LeNet-5 trains at lr 0.4 (0.1: 81.49 %).
# LeNet-5 takes one global λ (86.96 vs 84.91 % with ERK budgets at 98 %, seed 0): ERK gives its
# 2400-weight conv2 45 weights, where global ℓ1 (like GMP's global magnitude) keeps ≈ 200. Not
# elsewhere: at the quick budget global lost 11 points on ResNet-20 at 98 % and 4 on the ConvNet at 90 %.
# MLP-Bregman (the paper's MNIST MLP, started at p = 0.01 there) takes the 1 % start of LeNet-300-100:
# from 0.2 % (weights scaled by 1/√p ≈ 22) LinBreg's first epoch ended at a loss of 8.0 and 48.7 % at 90 %
# (quick budget), 77.6 % from 1 % (AdaBreg 79.2 → 80.4 %); at 20 epochs the two starts are within 0.2 points.
LINBREG_MODEL_DEFAULTS = {"lenet300": {"init_density": 0.01}, "mlp-bregman": {"init_density": 0.01},
                          "lenet5": {"lr": 0.4, "init_density": 0.01, "distribution": "global"},
                          "convnet": {"lr": 0.1}, "resnet18": {"lr": 1.0}, "resnet20": {"lr": 1.0},
                          "resnet56": {"lr": 1.0}, "vgg16": {"lr": 1.0}}


@register("linbreg", "LinBreg: linearized Bregman iterations, sparse init (Bungert et al.)", lr=0.5,
          options=BREGMAN_OPTIONS + (momentum_option(0.9),), check=_check_bregman,
          model_defaults=LINBREG_MODEL_DEFAULTS)
def build_linbreg(model, ctx: BuildContext) -> Strategy:
    _sparse_init(model, ctx)
    opt = optim.LinBreg(_groups(model, ctx), lr=ctx.cfg.lr, delta=ctx.options["delta"],
                        momentum=ctx.options["momentum"], weight_decay=ctx.cfg.weight_decay)
    return Regularized(model, opt, ctx)


# AdaBreg's lr, measured on Fashion-MNIST (seed 0): 1e-2 over 3e-3 on LeNet-300-100 at 98 % (88.26 vs
# 87.83 %), the ConvNet and ResNet-20 (quick budget, 90 %: 78.0 vs 73.6 %, 73.6 vs 71.4 %); LeNet-5 at
# 98 % best at 2e-2 with a 1 % sparse start (86.48 vs 82.23 % at 3e-3 from 0.2 %; 85.62 at 2e-2 from
# 0.2 %, 83.61 from 2 %). ResNet-18 keeps 3e-3, the value measured on the GPU (93.30 % at 95 %).
ADABREG_MODEL_DEFAULTS = {"lenet300": {"init_density": 0.01}, "mlp-bregman": {"init_density": 0.01},
                          "lenet5": {"lr": 0.02, "init_density": 0.01},
                          "resnet18": {"lr": 3e-3}}


@register("adabreg", "AdaBreg: Adam-type Bregman iterations, sparse init (Bungert et al.)", lr=1e-2,
          options=BREGMAN_OPTIONS, check=_check_bregman, model_defaults=ADABREG_MODEL_DEFAULTS)
def build_adabreg(model, ctx: BuildContext) -> Strategy:
    _sparse_init(model, ctx)
    opt = optim.AdaBreg(_groups(model, ctx), lr=ctx.cfg.lr, delta=ctx.options["delta"],
                        weight_decay=ctx.cfg.weight_decay)
    return Regularized(model, opt, ctx)


# xRDA's s₀ on VGG-16-bn (Fashion-MNIST, 2000 images, 3 epochs, batch 32, 98 %): s₀ = 1 (≈ SGD lr 0.1)
# blew up in the first epoch as dense SGD at lr 0.1 does (loss 4.40, 12.8 %); at 0.05 and 0.1 (also
# with M = 1 or 10) the λ controller's climb left no unit alive (final training loss 2.2, chance);
# 0.2 reached 67.6 % (GMP 66.5 %) with the BatchNorm recalibration. ResNet-56, whose SGD lr 0.1 starts
# badly (SGD_LR), gave 28.5 % at s₀ = 1, 48.0 % at 0.5, 35.1 % at 0.25 (same budget, 98 %; seed 1:
# 11.0 % at 1, 37.5 % at 0.5): s₀ 0.5.
XRDA_MODEL_DEFAULTS = {"vgg16": {"lr": 0.2}, "resnet56": {"lr": 0.5}}
BN_RECALIBRATION = 10    # batches, after every epoch (``--bn-recalibrate``)


def _no_batchnorm(model: str) -> UsageError:
    return ignored_option("bn_recalibrate", f"re-estimates BatchNorm statistics, and model {model} has no "
                          f"BatchNorm layer that keeps running statistics", "0")


def _check_xrda(options: dict, explicit: set, model: str | None) -> None:
    """A built-in model is checked for BatchNorm here, before anything trains (``compare`` plans
    every run first); a user's model when it is built (:func:`_bn_recalibration`)."""
    _check_controller(options, explicit)
    if options["bn_recalibrate"] and model in MODELS and not has_batchnorm(model):
        raise _no_batchnorm(model)


@register("xrda", "extended RDA with adaptively reweighted ℓ1 (Siegel et al.)", lr=1.0,
          options=(
              nonnegative("lam", None, "regularization strength λ (fixed unless --sparsity is given)"),
              Option("mode", str, "normal", "reweighting groups", choices=("normal", "kernel", "channel")),
              positive("max_factor", 500.0, "maximum reweighting factor M (1 = plain ℓ1)"),
              positive("tau", 9.5, "momentum time scale τ (β = exp(−s/τ))"),
              positive("tau_b", 9.5, "reweighting time scale τ_b"),
              Option("averaging", str, "cosine", "schedule of s and α (step: halve s, move α halfway to 1 "
                     "at --milestones)", choices=("cosine", "step")),
              regex_option("exclude", "regex of layer names kept dense and unregularized"),
              TARGET, RAMP,
              distribution_option("global", DISTRIBUTIONS),
              int_option("bn_recalibrate", None, "training batches over which BatchNorm running statistics are "
                         f"re-estimated after every epoch, at most one epoch's (default {BN_RECALIBRATION} on a model "
                         "with BatchNorm; 0 = off)"),
          ), check=_check_xrda, model_defaults=XRDA_MODEL_DEFAULTS)
def build_xrda(model, ctx: BuildContext) -> Strategy:
    o = _target(ctx.options, start=XRDA_START_LAM)
    reg = L1(o["lam"]) if o["distribution"] == "global" else (lambda *_: L1(o["lam"]))
    groups = param_groups(model, reg, exclude=o["exclude"] or None)
    opt = optim.XRDA(groups, lr=ctx.cfg.lr, lam=o["lam"], max_factor=o["max_factor"], tau=o["tau"],
                     tau_b=o["tau_b"], schedule=o["averaging"], mode=o["mode"],
                     total_steps=ctx.total_steps, weight_decay=ctx.cfg.weight_decay,
                     milestones=[int(m * ctx.total_steps) for m in ctx.cfg.milestones])
    # s_k, α_k follow XRDA's own schedule
    has_norms = bool(batchnorm_layers(model))
    strategy = Regularized(model, opt, ctx, schedules_lr=True, bn_recalibration=_bn_recalibration(ctx, has_norms))
    if not has_norms:    # the count does nothing here (a run saved before 0 became the default holds 10)
        strategy.inert = frozenset({"bn_recalibrate"})
    return strategy


def _bn_recalibration(ctx: BuildContext, has_norms: bool) -> int:
    """``--bn-recalibrate``, filled in (config.json records it): BN_RECALIBRATION batches on a model
    with BatchNorm, 0 on one without, where an explicit count would do nothing and is refused."""
    options = ctx.options
    given = options["bn_recalibrate"]
    if given and not has_norms:
        raise _no_batchnorm(ctx.cfg.model)
    options["bn_recalibrate"] = (BN_RECALIBRATION if has_norms else 0) if given is None else given
    return options["bn_recalibrate"]


@register("grda", "generalized RDA (Chao et al., directional pruning)", **SGD_LR,
          options=(
              positive("c", None, "threshold constant c (fixed unless --sparsity is given)"),
              Option("mu", float, 0.51, "threshold exponent μ", "in (0.5, 1)", lambda v: 0.5 < v < 1),
              regex_option("exclude", "regex of layer names kept dense and unregularized"),
              TARGET, RAMP,
          ), check=lambda options, explicit, model: _check_controller(options, explicit, model, "c"))
def build_grda(model, ctx: BuildContext) -> Strategy:
    o = _target(ctx.options, "c")
    groups = param_groups(model, L1(o["c"]), exclude=o["exclude"] or None)
    return Regularized(model, optim.GRDA(groups, lr=ctx.cfg.lr, c=o["c"], mu=o["mu"],
                                                      weight_decay=ctx.cfg.weight_decay), ctx)
