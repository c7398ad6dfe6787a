r"""A λ-controller: ends a regularized run at a requested sparsity.

Users ask for a sparsity, not for a λ. Every ``every`` steps the controller compares the
density of the Linear/Conv weights with a target trajectory and multiplies the optimizer's
penalty strength (``opt.scale_lam``) by

    factor = clip(exp(gain · log(density / density*(t))), 1/max_factor, max_factor)

so λ grows while the network is denser than planned and shrinks while it is sparser. The target
trajectory is the cubic ramp of gradual magnitude pruning (Zhu & Gupta),

    density*(t) = d_T + (d_0 − d_T)·(1 − t / (ramp·T))³   for t < ramp·T,   d_T afterwards,

from the density d_0 measured at the first step to the requested d_T = 1 − sparsity. For
the Bregman methods (which start sparse and *add* weights) d_0 < d_T and the same law holds λ
back until the network has grown to its budget; for ProxSGD/xRDA/gRDA (which start dense and
*remove* weights) it raises λ along the ramp. Changing λ re-initialises the Bregman
subgradient from the current weights (the optimizers do this on their next step).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import check
from .metrics import density


class SparsityController:
    def __init__(self, optimizer, model: nn.Module, sparsity: float, total_steps: int, *,
                 every: int = 5, ramp: float = 0.75, gain: float = 0.5, max_factor: float = 2.0,
                 min_lam: float = 1e-12):
        check(0 <= sparsity < 1, "--sparsity", "in [0, 1)", sparsity)
        check(0 < ramp <= 1, "ramp", "in (0, 1]", ramp)
        self.optimizer, self.model = optimizer, model
        self.target = 1.0 - sparsity
        self.total_steps, self.every, self.ramp = max(1, total_steps), every, ramp
        self.gain, self.max_factor, self.min_lam = gain, max_factor, min_lam
        self.start_density: float | None = None
        self.trajectory: list[tuple[int, float, float]] = []   # (step, λ, density)

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
        want = self.target_density(step)
        err = math.log(max(d, 1e-9) / max(want, 1e-9))
        factor = min(self.max_factor, max(1.0 / self.max_factor, math.exp(self.gain * err)))
        if self.lam() * factor < self.min_lam:       # λ = 0 stays 0 under scaling: restart it
            self.optimizer.set_lam(self.min_lam)
        elif factor != 1.0:
            self.optimizer.scale_lam(factor)
        if step % (self.every * 10) == 0:
            self.trajectory.append((step, self.lam(), d))

    def state_dict(self) -> dict:
        return {"start_density": self.start_density, "trajectory": [list(t) for t in self.trajectory]}

    def load_state_dict(self, state: dict) -> None:
        self.start_density = state.get("start_density")
        self.trajectory = [tuple(t) for t in state.get("trajectory", [])]
