"""The pruning baselines (SPEC §6): ``magnitude``, ``gmp``, ``imp``, ``rigl``.

All prune the Linear/Conv weights (``params.prunable_weights``) to an exact number of zeros and
keep pruned weights, their gradients and their optimizer state at zero with a
:class:`~sparsetrain.pruning.Mask`. SGD with (heavy-ball) momentum, ``--weight-decay`` on all
parameters.

Every method takes ``--distribution``: ``global`` (one magnitude threshold over all layers, the
default of magnitude/gmp/imp), ``uniform`` (layer-wise: the same sparsity in every layer) or
``erk`` (Erdős–Rényi-kernel layer densities; RigL's default).

``magnitude``  train dense for ``--prune-at`` (0.5) × epochs, prune once (global magnitude),
               fine-tune for the rest of the epochs with the mask fixed. The run's LR schedule
               spans all epochs (the fine-tuning continues it). Reports the accuracy right before
               and after the prune.
``gmp``        gradual magnitude pruning (Zhu & Gupta 2017): every ``--prune-every`` steps (50)
               between ``--prune-start`` (0.1) and ``--prune-end`` (0.5), fractions of training,
               the sparsity follows ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t1 − t0))³``
               (``--initial-sparsity`` s_i, 0); pruned weights stay zero; the rest of training
               fine-tunes at the target. On LeNet-300-100 / Fashion-MNIST, 20 epochs, lr 0.1 cosine,
               ``--sparsity 0.98`` reaches ≈ 88.9 % test accuracy (dense: 89.7 %).
``imp``        iterative magnitude pruning with weight rewinding (lottery ticket, Frankle et al.):
               ``--levels`` L (5) rounds of ``--epochs`` E epochs each (L × E epochs in total,
               reported as ``total_epochs``, with each round's accuracy under ``levels``). After rounds 1 … L−1 the surviving weights are pruned by a
               rate ``1 − (1 − s)^{1/(L−1)}`` (so the last round trains at the target), rewound to
               their values at ``--rewind-step`` (default: the end of the first epoch), the
               optimizer state is reset and the LR schedule restarts.
``rigl``       RigL (Evci et al. 2020) at fixed sparsity: a random mask with the layer densities of
               ``--distribution`` (``erk`` by default; ``uniform`` = the same sparsity in every
               layer). Every ``--update-every`` ΔT (100) steps until ``--update-end`` (0.75) of
               training, per layer, drop the fraction α_t = α/2 (1 + cos(π t / t_end))
               (``--drop-fraction`` α, 0.3) of active weights with the
               smallest magnitude and grow as many inactive ones with the largest dense-gradient
               magnitude; new weights start at 0 with zero momentum. Layer densities stay exactly
               constant. The RigL paper keeps the first layer dense in its ``uniform`` runs
               (ResNet-50, whose first layer is tiny); here every layer is sparse by default
               (in LeNet-300-100 the first layer holds 88 % of the weights, so keeping it dense
               cannot reach high sparsity); ``--dense-first true`` restores the paper's convention.
"""
from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..nm import keep_per_block, nm_mask, parse_pattern
from ..pruning import Mask, cosine_decay, gmp_sparsity, magnitude_masks, random_masks, rigl_update
from .base import (SGD_LR, BuildContext, Option, Strategy, fraction, momentum_option, positive,
                   register, sparsity_option)

DISTRIBUTION_HELP = ("how --sparsity is spread over layers: global (one magnitude threshold, or one λ for all "
                     "layers), uniform (the same sparsity in every layer), erk (Erdős–Rényi-kernel layer "
                     "densities); regularized methods steer one λ per layer for uniform and erk")


def distribution_option(default: str, choices: tuple[str, ...]) -> Option:
    return Option("distribution", str, default, DISTRIBUTION_HELP, choices=choices)


MAX_LEVELS = 100      # IMP rounds (each --epochs long)


def int_option(name, default, help, minimum=0, maximum=None):
    if maximum is None:
        return Option(name, int, default, help, f"an integer >= {minimum}", lambda v: v >= minimum)
    return Option(name, int, default, help, f"an integer in [{minimum}, {maximum}]", lambda v: minimum <= v <= maximum)


# ---------------------------------------------------------------------------------------- helpers
def schedule_fn(cfg, steps_per_epoch: int, epochs: int):
    """The run's LR multiplier k -> factor for a schedule of ``epochs`` epochs (None: plateau)."""
    from ..trainer import make_scheduler                # lazy: trainer imports the methods
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(dummy, cfg, steps_per_epoch, epochs)
    return sched.lr_lambdas[0] if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) else None


class PhaseLR:
    """Restarts the run's LR schedule at phase boundaries (IMP levels, HALO's fine-tuning).

    ``phases`` = [(epochs, lr scale), ...]. The trainer's scheduler spans all phases; this object
    overrides every param group's lr right before each optimizer step (from ``after_backward``)
    with ``base_lr × scale × schedule(step − phase start)`` — a pure function of the global step,
    so ``--resume`` needs no extra state. With ``--schedule plateau`` the lr is reset to
    ``base × scale`` and the plateau scheduler's counters are reset at each boundary instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, phases):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.spe = steps_per_epoch
        self.phases = [(int(e), float(s)) for e, s in phases]
        self.starts = []
        t = 0
        for e, _ in self.phases:
            self.starts.append(t)
            t += e * steps_per_epoch
        self.fns = [schedule_fn(cfg, steps_per_epoch, e) for e, _ in self.phases]

    def phase(self, step: int) -> int:
        i = 0
        while i + 1 < len(self.starts) and step >= self.starts[i + 1]:
            i += 1
        return i

    def factor(self, step: int) -> float | None:
        i = self.phase(step)
        fn = self.fns[i]
        return None if fn is None else self.phases[i][1] * fn(step - self.starts[i])

    def apply(self, step: int) -> None:
        f = self.factor(step)
        if f is not None:
            for g, b in zip(self.optimizer.param_groups, self.base):
                g["lr"] = b * f

    def restart(self, trainer, next_step: int) -> None:
        """At a boundary (from ``end_epoch``): lr for the next step, plateau counters reset."""
        f = self.factor(next_step)
        if f is None:
            f = self.phases[self.phase(next_step)][1]
            sched = trainer.scheduler
            if hasattr(sched, "_reset"):
                sched._reset()
        for g, b in zip(self.optimizer.param_groups, self.base):
            g["lr"] = b * f


def sgd(model, ctx: BuildContext, momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=ctx.cfg.lr, momentum=momentum,
                           weight_decay=ctx.cfg.weight_decay)


class MaskedStrategy(Strategy):
    """A strategy with an optional :class:`Mask` (None until something is pruned) and optional
    LR phases. Grads are masked after backward, weights after every step."""

    def __init__(self, model, optimizer, ctx: BuildContext):
        super().__init__(model, optimizer)
        self.ctx = ctx
        self.mask: Mask | None = None
        self.lr_phases: PhaseLR | None = None

    def ensure_mask(self) -> Mask:
        if self.mask is None:
            self.mask = Mask(self.model)
        return self.mask

    def prune_to(self, sparsity: float, distribution: str = "global") -> None:
        mask = self.ensure_mask()
        pattern = parse_pattern(self.ctx.cfg.pattern)
        if pattern is not None:   # N:M blocks: from M kept per block down to N at the target sparsity
            n, m = pattern
            keep = keep_per_block(sparsity, self.ctx.options.get("sparsity", sparsity), n, m)
            new = {k: nm_mask(w, m, keep, current=mask.masks[k]) for k, w in mask.params.items()}
            new = {k: v for k, v in new.items() if v is not None}   # rows not a multiple of M: unchanged
        else:
            new = magnitude_masks(mask.params, sparsity, distribution, current=mask.masks)
        mask.update(new, self.optimizer)

    def after_backward(self, step: int) -> None:
        if self.lr_phases is not None:
            self.lr_phases.apply(step)
        if self.mask is not None:
            self.mask.mask_grads()

    def after_step(self, step: int) -> None:
        if self.mask is not None:
            self.mask.apply()

    def log(self) -> dict:
        return {} if self.mask is None else {"mask_sparsity": self.mask.sparsity()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mask": None if self.mask is None else self.mask.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("mask") is not None:
            self.ensure_mask().load_state_dict(state["mask"])


# ---------------------------------------------------------------------------------------- magnitude
class OneShotMagnitude(MaskedStrategy):
    saved = ("before", "after")

    def __init__(self, model, optimizer, ctx, sparsity, prune_epoch, distribution):
        super().__init__(model, optimizer, ctx)
        self.sparsity, self.prune_epoch, self.distribution = sparsity, prune_epoch, distribution
        self.before = self.after = None
        if prune_epoch == 0:
            self.prune_to(sparsity, distribution)

    def end_epoch(self, epoch, trainer) -> None:
        if epoch + 1 == self.prune_epoch:
            self.before = trainer.evaluate()[1]
            self.prune_to(self.sparsity, self.distribution)
            self.after = trainer.evaluate()[1]

    def finish(self, trainer) -> dict:
        if self.mask is None:               # never reached the prune epoch (cannot happen: guard)
            self.prune_to(self.sparsity, self.distribution)
        return {"prune_epoch": self.prune_epoch, "accuracy_before_prune": self.before,
                "accuracy_after_prune": self.after, "distribution": self.distribution}


PRUNE_DISTRIBUTION = distribution_option("global", ("global", "uniform", "erk"))


@register("magnitude", "train dense, prune once by magnitude (--prune-at), fine-tune with the mask fixed",
          **SGD_LR, options=(sparsity_option(), fraction("prune_at", 0.5, "fraction of --epochs trained dense before the "
                                                        "one-shot prune (magnitude)"),
                           PRUNE_DISTRIBUTION, momentum_option(0.9)))
def build_magnitude(model, ctx: BuildContext) -> Strategy:
    o = ctx.options
    prune_epoch = int(o["prune_at"] * ctx.cfg.epochs)
    return OneShotMagnitude(model, sgd(model, ctx, o["momentum"]), ctx, o["sparsity"], prune_epoch,
                            o["distribution"])


# ---------------------------------------------------------------------------------------- gmp
class GMP(MaskedStrategy):
    saved = ("current", "updates")

    def __init__(self, model, optimizer, ctx, sparsity, initial, start, end, every, distribution):
        super().__init__(model, optimizer, ctx)
        total = ctx.total_steps
        self.final, self.initial, self.every, self.distribution = sparsity, initial, every, distribution
        self.t0 = int(start * total)
        self.t1 = max(self.t0, int(end * total))
        self.current = 0.0
        self.updates = 0

    def target(self, step: int) -> float:
        return gmp_sparsity(step, self.final, self.t0, self.t1, self.initial)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if step >= self.t0 and (step >= self.t1 or (step - self.t0) % self.every == 0):
            s = self.target(step)
            if s > self.current or (self.mask is None and s > 0):
                self.prune_to(s, self.distribution)
                self.current = s
                self.updates += 1

    def log(self) -> dict:
        return {**super().log(), "target_sparsity": self.current}

    def finish(self, trainer) -> dict:
        if self.current < self.final:        # safety net; t1 < total steps always reaches s_f
            self.prune_to(self.final, self.distribution)
            self.current = self.final
        return {"prune_start_step": self.t0, "prune_end_step": self.t1, "prune_updates": self.updates,
                "distribution": self.distribution}


@register("gmp", "gradual magnitude pruning (Zhu & Gupta): cubic sparsity schedule to --sparsity",
          **SGD_LR, options=(sparsity_option(), fraction("initial_sparsity", 0.0, "sparsity s_i when GMP starts (gmp)"),
                           fraction("prune_start", 0.1, "fraction of training at which pruning starts (gmp)"),
                           fraction("prune_end", 0.5, "fraction of training at which the target sparsity is "
                                                      "reached (gmp)"),
                           int_option("prune_every", 50, "steps between mask updates (gmp)", 1),
                           PRUNE_DISTRIBUTION, momentum_option(0.9)))
def build_gmp(model, ctx: BuildContext) -> Strategy:
    o = ctx.options
    if o["prune_end"] < o["prune_start"]:
        raise UsageError(f"--prune-end: must be >= --prune-start ({o['prune_start']}), got {o['prune_end']}")
    if o["initial_sparsity"] > o["sparsity"]:
        raise UsageError(f"--initial-sparsity: must be <= --sparsity ({o['sparsity']}), got {o['initial_sparsity']}")
    return GMP(model, sgd(model, ctx, o["momentum"]), ctx, o["sparsity"], o["initial_sparsity"],
               o["prune_start"], o["prune_end"], o["prune_every"], o["distribution"])


# ---------------------------------------------------------------------------------------- imp
class IMP(MaskedStrategy):
    saved = ("level", "history")

    def __init__(self, model, optimizer, ctx, sparsity, levels, rewind_step, distribution):
        super().__init__(model, optimizer, ctx)
        self.sparsity, self.levels, self.distribution = sparsity, levels, distribution
        self.epochs = ctx.cfg.epochs
        self.rewind_step = rewind_step
        self.level = 0
        self.rewind: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.lr_phases = PhaseLR(optimizer, ctx.cfg, ctx.steps_per_epoch, [(self.epochs, 1.0)] * levels)
        if rewind_step == 0:
            self.save_rewind()

    def level_sparsity(self, level: int) -> float:
        if self.levels <= 1:
            return self.sparsity
        return 1.0 - (1.0 - self.sparsity) ** (level / (self.levels - 1))

    def total_epochs(self, epochs: int) -> int:
        return self.levels * epochs

    @torch.no_grad()
    def save_rewind(self) -> None:
        self.rewind = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.rewind is None and step + 1 == self.rewind_step:
            self.save_rewind()

    def end_epoch(self, epoch, trainer) -> None:
        self.lr_phases.apply(trainer.step)                # the next epoch's lr (for the log)
        if (epoch + 1) % self.epochs or self.level >= self.levels - 1:
            return
        acc = trainer.evaluate()[1]
        self.history.append({"level": self.level, "sparsity": self.level_sparsity(self.level),
                             "test_accuracy": acc})
        self.level += 1
        if self.rewind is None:              # rewind step beyond the first round: use now
            self.save_rewind()
        mask = self.ensure_mask()
        new = magnitude_masks(mask.params, self.level_sparsity(self.level), self.distribution,
                              current=mask.masks)
        self.model.load_state_dict(self.rewind)           # copy_ in place: rewind every tensor
        self.optimizer.state.clear()                      # fresh momentum
        mask.update(new, self.optimizer)
        self.lr_phases.restart(trainer, trainer.step)

    def log(self) -> dict:
        return {**super().log(), "level": self.level}

    def finish(self, trainer) -> dict:
        acc = trainer.evaluate()[1]
        levels = self.history + [{"level": self.level, "sparsity": self.level_sparsity(self.level),
                                  "test_accuracy": acc}]
        return {"total_epochs": self.levels * self.epochs, "levels": levels, "rewind_step": self.rewind_step,
                "distribution": self.distribution}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rewind": self.rewind}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("rewind") is not None:
            self.rewind = {k: v.to(self.ctx.device) for k, v in state["rewind"].items()}


@register("imp", "iterative magnitude pruning with weight rewinding (lottery ticket); runs --levels × --epochs "
          "epochs", **SGD_LR,
          options=(sparsity_option(), int_option("levels", 5, "IMP rounds of --epochs each; the last trains at "
                                                 "--sparsity (imp)", 2, MAX_LEVELS),
                   int_option("rewind_step", -1, "optimizer step whose weights IMP rewinds to (imp; "
                                                 "-1: the end of the first epoch; 0: the initialisation)", -1),
                   PRUNE_DISTRIBUTION, momentum_option(0.9)))
def build_imp(model, ctx: BuildContext) -> Strategy:
    o = ctx.options
    rewind = ctx.steps_per_epoch if o["rewind_step"] == -1 else o["rewind_step"]
    if rewind > ctx.total_steps:
        raise UsageError(f"--rewind-step: must be <= the steps of one round ({ctx.total_steps}), got {rewind}")
    return IMP(model, sgd(model, ctx, o["momentum"]), ctx, o["sparsity"], o["levels"], rewind, o["distribution"])


# ---------------------------------------------------------------------------------------- rigl
class RigL(MaskedStrategy):
    saved = ("updates", "changed")

    def __init__(self, model, optimizer, ctx, sparsity, distribution, dense_first, every, alpha, end, seed):
        super().__init__(model, optimizer, ctx)
        mask = self.ensure_mask()
        names = list(mask.params)
        dense = names[:1] if dense_first else ()
        g = torch.Generator().manual_seed(seed + 7919)
        try:
            masks = random_masks(mask.params, sparsity, distribution, dense, generator=g)
        except ValueError as e:
            raise UsageError(f"--dense-first: {e}") from None
        mask.update(masks)
        self.every, self.alpha = every, alpha
        self.t_end = int(end * ctx.total_steps)
        self.updates = 0
        self.changed = 0
        self.distribution, self.dense_first = distribution, dense_first

    def after_backward(self, step: int) -> None:
        if self.lr_phases is not None:
            self.lr_phases.apply(step)
        if 0 < step < self.t_end and step % self.every == 0:
            frac = cosine_decay(step, self.t_end, self.alpha)
            self.changed = sum(rigl_update(self.mask, frac, self.optimizer).values())
            self.updates += 1
        self.mask.mask_grads()

    def log(self) -> dict:
        return {**super().log(), "rigl_updates": self.updates, "rigl_last_changed": self.changed}

    def finish(self, trainer) -> dict:
        return {"rigl_updates": self.updates, "distribution": self.distribution, "dense_first": self.dense_first,
                "layer_mask_density": self.mask.layer_density()}


@register("rigl", "RigL dynamic sparse training at fixed sparsity (drop by magnitude, grow by gradient)",
          **SGD_LR, options=(sparsity_option(), distribution_option("erk", ("erk", "uniform")),
                           Option("dense_first", bool, False, "keep the first layer dense (rigl; the paper's "
                                  "uniform convention)"),
                           int_option("update_every", 100, "steps between RigL mask updates ΔT (rigl)", 1),
                           Option("drop_fraction", float, 0.3, "initial RigL update fraction α, cosine-decayed "
                                  "(rigl)", "in (0, 1]", lambda v: 0 < v <= 1),
                           fraction("update_end", 0.75, "fraction of training after which RigL stops updating "
                                                        "the mask (rigl)", "in (0, 1]", lambda v: 0 < v <= 1),
                           momentum_option(0.9)))
def build_rigl(model, ctx: BuildContext) -> Strategy:
    o = ctx.options
    return RigL(model, sgd(model, ctx, o["momentum"]), ctx, o["sparsity"], o["distribution"], o["dense_first"],
                o["update_every"], o["drop_fraction"], o["update_end"], ctx.cfg.seed)
