"""Dead-network check: a run whose layers receive no gradient stops, it does not finish at chance.

A network is *dead* when some Linear/Conv weight gets an exactly zero gradient at every one of
the first ``steps`` steps. The usual cause is an empty layer: a weight that is entirely zero (a
too sparse initialisation, a layer pruned away) makes every activation after it zero, so every
weight gradient before and after it is zero too, and a Bregman method — which only grows
weights whose accumulated gradient is nonzero — can never leave that start. The check runs after
``loss.backward()`` for the first ``steps`` steps only, and raises :class:`DeadNetworkError`
(the CLI exits with code 3) naming the empty layer, or else the layers without gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from .params import prunable_weights

__all__ = ["DeadNetworkError", "LivenessCheck"]


class DeadNetworkError(RuntimeError):
    """The network cannot train: no gradient reaches some layer (exit code 3)."""


class LivenessCheck:
    def __init__(self, model: nn.Module, steps: int = 5):
        self.weights = [(n, w) for n, w in prunable_weights(model) if w.requires_grad and w.numel()]
        self.steps = steps
        self.alive = [False] * len(self.weights)

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Call after ``backward()`` at global step ``step``; raises at step ``steps − 1``."""
        if step >= self.steps:
            return
        for i, (_, w) in enumerate(self.weights):
            if not self.alive[i] and w.grad is not None and bool(w.grad.ne(0).any()):
                self.alive[i] = True
        if step == self.steps - 1:
            dead = [n for (n, w), ok in zip(self.weights, self.alive) if not ok and w.grad is not None]
            if dead:
                raise DeadNetworkError(self.message(dead))

    def message(self, dead: list[str]) -> str:
        empty = [n for n, w in self.weights if not bool(w.ne(0).any())]
        more = f" (and {len(dead) - 1} more)" if len(dead) > 1 else ""
        cause = (f"layer {empty[0]} has no nonzero weight, so every activation after it is zero"
                 if empty else "its inputs or its outputs are zero")
        return (f"dead network: no gradient reached {dead[0]}{more} in the first {self.steps} steps ({cause}); "
                f"allowed: a denser start (--init-density, --init-distribution erk) or a smaller --lr")
