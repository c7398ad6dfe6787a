r"""λ controllers: end a regularized run at a requested sparsity.

Users ask for a sparsity, not for a λ. Both controllers follow the target density trajectory
of gradual magnitude pruning (Zhu & Gupta), from the density d₀ measured at the first step to
the requested d_T = 1 − sparsity:

    density*(t) = d_T + (d₀ − d_T)·(1 − t / (ramp·T))³   for t < ramp·T,   d_T afterwards.

:class:`SparsityController` (ProxSGD, xRDA, gRDA — methods that start dense and *remove*
weights): every ``every`` steps it multiplies the optimizer's λ (``opt.scale_lam``) by
``exp(clip(gain · log(density / density*(t)), −c, c))``, where the cap c (at most
log max_factor) halves whenever the error changes sign and grows back by 20 % while it does not.

:class:`BudgetController` (LinBreg, AdaBreg — inverse scale space methods that start sparse and
*add* weights): a zero entry of a Bregman method becomes nonzero when its accumulated
subgradient v crosses the threshold λ (``|v| > λ`` for ℓ1, ``‖v_g‖ > λ√n_g`` for a group), so
λ can be *computed*: every ``every`` steps it is set so that exactly the entries the budget
``density*(t)`` allows — those with the largest ``|v|/λ`` — are admitted, and so that none are
admitted while the network is at its budget. The groups are switched to ``inactive="keep"``: on
a change of λ the subgradient is re-initialised from the current weights where they are
nonzero (no jump) and zero entries keep their accumulated v.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UsageError, check
from .metrics import density
from .optim import BregmanOptimizer
from .params import prunable_weights

START_TOLERANCE = 0.005     # a BudgetController's start may exceed the target density by this much


class SparsityController:
    def __init__(self, optimizer, model: nn.Module, sparsity: float, total_steps: int, *,
                 every: int = 5, ramp: float = 0.75, gain: float = 1.0, max_factor: float = 2.0,
                 min_lam: float = 1e-12):
        check(0 <= sparsity < 1, "--sparsity", "in [0, 1)", sparsity)
        check(0 < ramp <= 1, "ramp", "in (0, 1]", ramp)
        if isinstance(optimizer, BregmanOptimizer) and not isinstance(self, BudgetController):
            raise UsageError(f"optimizer: a SparsityController scales λ of methods that remove weights; "
                             f"{type(optimizer).__name__} adds weights (a larger λ only stops admitting "
                             f"them); allowed: BudgetController for LinBreg/AdaBreg")
        self.optimizer, self.model = optimizer, model
        self.target = 1.0 - sparsity
        self.total_steps, self.every, self.ramp = max(1, total_steps), every, ramp
        self.gain, self.max_factor, self.min_lam = gain, max_factor, min_lam
        self.start_density: float | None = None
        self.trajectory: list[tuple[int, float, float]] = []   # (step, λ, density)
        self._cap, self._last_err = math.log(max_factor), 0.0

    def target_density(self, step: int) -> float:
        d0 = self.start_density if self.start_density is not None else self.target
        t = min(1.0, step / (self.ramp * self.total_steps))
        return self.target + (d0 - self.target) * (1.0 - t) ** 3

    def lam(self) -> float:
        """The largest λ over the regularized groups (what the log shows)."""
        lams = [x for x in self.optimizer.get_lam() if x is not None]
        return max(lams) if lams else 0.0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after every optimizer step; acts every ``every`` steps."""
        if step % self.every:
            return
        d = density(self.model)
        if self.start_density is None:
            self.start_density = d
        self._adjust(step, d)
        if step % (self.every * 20) == 0:
            self.trajectory.append((step, self.lam(), d))

    def _adjust(self, step: int, d: float) -> None:
        err = math.log(max(d, 1e-9) / max(self.target_density(step), 1e-9))
        # Rprop-style step cap (log space): shrink it when the error changes sign (the density
        # can respond steeply to λ), let it grow back while the sign holds
        if err * self._last_err < 0:
            self._cap = max(1e-3, self._cap * 0.5)
        elif err != 0:
            self._cap = min(math.log(self.max_factor), self._cap * 1.2)
        self._last_err = err
        factor = math.exp(max(-self._cap, min(self._cap, self.gain * err)))
        if self.lam() * factor < self.min_lam:       # λ = 0 stays 0 under scaling: restart it
            self.optimizer.set_lam(self.min_lam)
        elif factor != 1.0:
            self.optimizer.scale_lam(factor)

    def state_dict(self) -> dict:
        return {"start_density": self.start_density, "trajectory": [list(t) for t in self.trajectory],
                "cap": self._cap, "last_err": self._last_err}

    def load_state_dict(self, state: dict) -> None:
        self.start_density = state.get("start_density")
        self.trajectory = [tuple(t) for t in state.get("trajectory", [])]
        self._cap, self._last_err = state.get("cap", self._cap), state.get("last_err", 0.0)


class BudgetController(SparsityController):
    """λ computed from the Bregman subgradients so the density follows its budget exactly."""

    def __init__(self, optimizer, model: nn.Module, sparsity: float, total_steps: int, *,
                 every: int = 5, ramp: float = 0.75, margin: float = 1.05, start_lam: float = 1.0):
        super().__init__(optimizer, model, sparsity, total_steps, every=every, ramp=ramp)
        self.margin = margin
        self._last: list[torch.Tensor] = []
        self.total = sum(w.numel() for _, w in prunable_weights(model))
        for g in optimizer.param_groups:
            g["inactive"] = "keep"
        # start high, so that nothing is admitted before the first budget update computes λ
        optimizer.scale_lam(max(1.0, start_lam / max(self.lam(), 1e-12)))

    def state_dict(self) -> dict:   # the v snapshots drive the look-ahead: a resume needs them
        return {**super().state_dict(), "last_v": list(self._last)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._last = list(state.get("last_v", []))

    @staticmethod
    def supports(optimizer) -> bool:
        """Whether every regularized group's regularizer has per-entry activation scores."""
        regs = [g.get("reg") for g in optimizer.param_groups if g.get("reg") is not None]
        return bool(regs) and all(r.activation(torch.ones(1, 1)) is not None for r in regs)

    def _scores(self) -> torch.Tensor:
        """|v|/λ (or the group analogue) of every zero entry of the regularized weights, with v
        extrapolated over the next ``every`` steps from its change since the last update (Adam-
        type steps move all candidates at once, so the admission must look ahead)."""
        out, last = [], []
        i = 0
        for g in self.optimizer.param_groups:
            reg = g.get("reg")
            if reg is None:
                continue
            for p in g["params"]:
                v = self.optimizer.state.get(p, {}).get("v")
                if v is None:
                    continue
                prev = self._last[i] if i < len(self._last) and self._last[i].shape == v.shape else v
                out.append(reg.activation(2 * v - prev)[p == 0])
                last.append(v.clone())
                i += 1
        self._last = last
        return torch.cat(out) if out else torch.zeros(0)

    def _adjust(self, step: int, d: float) -> None:
        if self.start_density > self.target + START_TOLERANCE:
            raise UsageError(f"BudgetController: the network starts at density {self.start_density:.4f}, "
                             f"denser than the target {self.target:.4f}; Bregman iterations only add weights, "
                             f"so it cannot come down to it; allowed: a sparse start (sparse_init_ with a "
                             f"density <= {self.target:g})")
        scores = self._scores()
        if scores.numel() == 0:
            return
        need = int(round(self.target_density(step) * self.total)) - int(round(d * self.total))
        if need > 0:   # admit the `need` strongest candidates: factor between k-th and (k+1)-th score
            k = min(need, scores.numel())
            top = torch.topk(scores, min(k + 1, scores.numel())).values
            if k < top.numel() and top[k - 1] > top[k]:
                factor = float(top[k - 1] + top[k]) / 2
            else:  # a tie at the boundary (Adam-type steps), or fewer candidates than allowed
                factor = float(top[k - 1]) * (1 - 1e-6)
            # λ falls at most by max_factor per update: candidates that only start to receive
            # gradients (newly connected units) must not all be let in at once
            factor = max(factor, 1.0 / self.max_factor)
        else:          # at the budget: nobody new until the next update
            factor = max(1.0, float(scores.max()) * self.margin)
        if factor > 0 and factor != 1.0:
            self.optimizer.scale_lam(factor)
