"""``halo``: the hierarchical adaptive lasso (Seto, Wells, Zhang; SPEC §5).

Loss = CE + HALO penalty (:class:`sparsetrain.penalties.HALO`), weights and per-weight scales
trained jointly by SGD with momentum; the scales live in their own param group (lr
``--scale-lr`` × the schedule, weight decay ``--scale-weight-decay``, 0 by default: the ψ term is
their prior). HALO makes no exact
zeros. ``--halo-prune gradual`` (the default) reaches ``--sparsity`` while the penalty trains: the
penalised weights are pruned by global magnitude on GMP's cubic schedule between
``--prune-start`` and ``--prune-end`` (fractions of training) and stay zero, so the run ends at its
target without a cliff (one-shot pruning a network whose penalty has not yet concentrated the
weights lost 10-60 points on LeNet-5 at 98 %). ``--halo-prune final`` is the paper's protocol:
train with the penalty for ``--epochs`` epochs, then prune once to ``--sparsity`` (accuracy
before and after the prune are reported); ``--finetune-epochs`` N > 0 then fine-tunes N more
epochs with the mask fixed and no penalty, the LR schedule restarted at ``--finetune-lr`` × lr.

Defaults are for small networks with mean-reduced cross-entropy (LeNet-300-100 on
Fashion-MNIST). The paper's CIFAR VGG-16-bn setting is ``--model vgg16 --data cifar10 --xi 1e-8
--psi 1e-8 --scale-lr 0.1 --weight-decay 1e-4 --scale-weight-decay 1e-4 --lr 0.1 --schedule step
--milestones 0.5,0.75 --epochs 160`` (the authors' code trains the scales with the same SGD
settings as the weights, weight decay included; with ξ = ψ = 1e-8 that weight decay, not ψ, is
what pulls the scales down).
"""
from __future__ import annotations

from ..errors import UsageError
from ..penalties import HALO, PENALIZED, VARIANTS
from .base import (SGD_LR, BuildContext, Option, fraction, ignored_option, momentum_option, nonnegative,
                   positive, register, sparsity_option)
from .pruning import GMP, PhaseLR, int_option

import math

import torch


class HALOStrategy(GMP):
    """HALO's penalty on the loss; the mask follows GMP's schedule (``gradual``) or comes once
    at the end of training (``final``: the schedule is switched off)."""
    saved = ("before", "after", "current", "updates")

    def __init__(self, model, optimizer, ctx, halo: HALO, sparsity: float, finetune_epochs: int,
                 finetune_lr: float, gradual: bool, start: float, end: float, every: int):
        super().__init__(model, optimizer, ctx, sparsity, 0.0, start, end, every, "global")
        self.gradual = gradual
        if not gradual:                 # GMP's schedule never fires: one prune after --epochs
            self.t0 = self.t1 = math.inf
        self.halo = halo
        self.sparsity = sparsity
        self.train_epochs = ctx.cfg.epochs
        self.finetune_epochs = finetune_epochs
        self.before = self.after = None
        self.penalty_value = 0.0
        if finetune_epochs:
            self.lr_phases = PhaseLR(optimizer, ctx.cfg, ctx.steps_per_epoch,
                                     [(self.train_epochs, 1.0), (finetune_epochs, finetune_lr)])

    def total_epochs(self, epochs: int) -> int:
        return epochs + self.finetune_epochs

    @property
    def pruned(self) -> bool:
        """Whether the final mask is in place (the penalty and the scales are then done)."""
        return self.mask is not None and self.current >= self.sparsity

    def penalty(self):
        if self.pruned:
            return None
        p = self.halo()
        self.penalty_value = p.detach()         # read in log(): no host sync per step
        return p

    def end_epoch(self, epoch, trainer) -> None:
        if self.lr_phases is not None:
            self.lr_phases.apply(trainer.step)            # the next epoch's lr (for the log)
        if self.gradual and self.pruned and self.after is None:
            # the epoch in which the schedule reached the target: accuracy across it
            self.before = trainer.history[-1]["test_accuracy"] if trainer.history else None
            self.after = trainer.evaluate()[1]
            self._freeze_scales()
        if epoch + 1 == self.train_epochs:
            if not self.pruned:
                self.prune(trainer)
            if self.lr_phases is not None:            # (gradual: pruned before; the phase starts all the same)
                self.lr_phases.restart(trainer, trainer.step)

    def prune(self, trainer) -> None:
        self.before = trainer.evaluate()[1]
        self.prune_to(self.sparsity, "global")
        self.current = self.sparsity
        self._freeze_scales()
        self.after = trainer.evaluate()[1]

    def _freeze_scales(self) -> None:
        for lam in self.halo.scales:                 # the scales are done: no more updates
            lam.requires_grad_(False)

    def log(self) -> dict:
        out = {**super().log(), **self.halo.scale_stats()}
        if not self.pruned:
            out["penalty"] = float(self.penalty_value)
        return out

    def finish(self, trainer) -> dict:
        if not self.pruned:                          # (only if end_epoch was never reached)
            self.prune(trainer)
        return {"accuracy_before_prune": self.before, "accuracy_after_prune": self.after,
                "halo_prune": "gradual" if self.gradual else "final", "finetune_epochs": self.finetune_epochs,
                "total_epochs": self.train_epochs + self.finetune_epochs,
                "halo_variant": self.halo.variant, **self.halo.scale_stats()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "halo": self.halo.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "halo" in state:
            self.halo.load_state_dict(state["halo"])
        if self.pruned:
            self._freeze_scales()


GRADUAL_OPTIONS = ("prune_start", "prune_end", "prune_every")    # GMP's schedule: --halo-prune gradual only
SCALE_OPTIONS = ("scale_lr", "scale_weight_decay", "min_scale")    # the trainable scales: not lasso / mcp
BUDGET_OPTIONS = ("halo_budget", "halo_squared")                  # the ψ|Σ|λ| − P| term: halo / shared only
NO_BUDGET = ("lasso", "mcp", "shared-sq")


def _check_options(o: dict, explicit: set = frozenset(), model: str | None = None) -> None:
    """Refuse options this run would ignore (given explicitly, they would have no effect)."""
    variant = o["halo_variant"]
    for k in GRADUAL_OPTIONS:
        if k in explicit and o["halo_prune"] == "final":
            raise ignored_option(k, "shapes the gradual prune schedule, which --halo-prune final (one prune "
                                 "after --epochs) does not use", "--halo-prune gradual")
    if "finetune_lr" in explicit and o["finetune_epochs"] == 0:
        raise ignored_option("finetune_lr", "sets the lr of the fine-tuning phase, and --finetune-epochs is 0",
                             "--finetune-epochs >= 1")
    for k in SCALE_OPTIONS:
        if k in explicit and variant in ("lasso", "mcp"):
            raise ignored_option(k, f"acts on the trainable HALO scales, which --halo-variant {variant} does "
                                 "not have", "--halo-variant halo, shared or shared-sq")
    for k in BUDGET_OPTIONS:
        if k in explicit and variant in NO_BUDGET:
            raise ignored_option(k, f"shapes the ψ budget of the scales, which --halo-variant {variant} does "
                                 "not have", "--halo-variant halo or shared")


@register("halo", "hierarchical adaptive lasso (HALO): trainable per-weight penalty scales, then a global "
          "magnitude prune to --sparsity", **SGD_LR,
          options=(sparsity_option(),
                   positive("xi", 3e-6, "HALO ξ: weight of Σ|w|/λ² (halo; mcp variant: the MCP λ)"),
                   positive("psi", 1e-4, "HALO ψ: weight of the scale budget |Σ|λ| − P| (halo; mcp: γ)"),
                   nonnegative("halo_budget", 0.0, "HALO P in ψ|Σ|λ| − P| (halo)"),
                   Option("halo_squared", bool, False, "use ψ(Σ|λ| − P)² instead of ψ|Σ|λ| − P| (halo)"),
                   Option("halo_variant", str, "halo", "halo | shared (one trainable scale, ψ|nλ − P|) | "
                          "shared-sq (one trainable scale, ψλ²: the authors' baseline) | lasso (scales frozen "
                          "at 1) | mcp (halo)", choices=VARIANTS),
                   Option("halo_penalize", str, "weights", "what the penalty covers: weights (every Linear/Conv "
                          "weight) | conv (Conv weights and biases, no Linear layer: the authors' CIFAR code); "
                          "the prune is over every Linear/Conv weight either way (halo)", choices=PENALIZED),
                   positive("scale_lr", 1.0, "learning rate of the HALO scales (follows the LR schedule) (halo)"),
                   nonnegative("scale_weight_decay", 0.0, "weight decay of the HALO scales (halo; the authors' "
                               "code applies the run's weight decay to them too)"),
                   positive("min_scale", 1e-3, "HALO clamps |λ| to at least this in 1/λ² (halo)"),
                   int_option("finetune_epochs", 0, "epochs of fine-tuning with the mask fixed after the prune "
                              "(halo)"),
                   positive("finetune_lr", 0.1, "fine-tuning lr as a fraction of --lr (halo)"),
                   Option("halo_prune", str, "gradual", "gradual: prune on GMP's cubic schedule while the "
                          "penalty trains; final: one global prune after --epochs (the paper) (halo)",
                          choices=("gradual", "final")),
                   fraction("prune_start", 0.25, "fraction of training at which pruning starts (gmp, halo)"),
                   fraction("prune_end", 0.6, "fraction of training at which the target sparsity is "
                            "reached (gmp, halo)"),
                   int_option("prune_every", 50, "steps between mask updates (gmp, halo)", 1),
                   momentum_option(0.9)), check=_check_options)
def build(model, ctx: BuildContext):
    o = ctx.options
    try:
        halo = HALO(model, o["xi"], o["psi"], P=o["halo_budget"], squared=o["halo_squared"],
                    variant=o["halo_variant"], min_scale=o["min_scale"], penalize=o["halo_penalize"])
    except ValueError as e:                    # (the options are checked: only the model can be wrong)
        raise UsageError(f"--halo-penalize: {e}") from None
    groups = [{"params": list(model.parameters())}]
    if len(halo.scales):
        groups.append({"params": list(halo.scales.parameters()), "lr": o["scale_lr"],
                       "weight_decay": o["scale_weight_decay"]})
    opt = torch.optim.SGD(groups, lr=ctx.cfg.lr, momentum=o["momentum"], weight_decay=ctx.cfg.weight_decay)
    if o["prune_end"] < o["prune_start"]:
        raise UsageError(f"--prune-end: must be >= --prune-start ({o['prune_start']}), got {o['prune_end']}")
    return HALOStrategy(model, opt, ctx, halo, o["sparsity"], o["finetune_epochs"], o["finetune_lr"],
                        o["halo_prune"] == "gradual", o["prune_start"], o["prune_end"], o["prune_every"])
