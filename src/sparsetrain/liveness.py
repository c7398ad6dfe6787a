"""Dead-network check: a run whose layers receive no gradient stops, it does not finish at chance.

A network is *dead* when some Linear/Conv weight gets an exactly zero gradient at every one of
the first ``steps`` steps, or when, later, no Linear/Conv weight at all gets a nonzero gradient
at ``patience`` checks in a row (one check every ``every`` steps): a run whose steps blew the
units up without a NaN (every ReLU off) — LeNet-5 under LinBreg at lr 1 sat at 10 % for ten
epochs that way and exited 0. The usual cause is an empty layer: a weight that is entirely zero (a
too sparse initialisation, a layer pruned away) makes every activation after it zero, so every
weight gradient before and after it is zero too, and a Bregman method — which only grows
weights whose accumulated gradient is nonzero — can never leave that start. The check runs after
``loss.backward()`` (every step of the first ``steps``, then every ``every`` steps; one host
read each time) and raises :class:`DeadNetworkError` (the CLI exits with code 3) naming the empty
layer, or else the layers without gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from .params import prunable_weights

__all__ = ["DeadNetworkError", "LivenessCheck"]


class DeadNetworkError(RuntimeError):
    """The network cannot train: no gradient reaches some layer (exit code 3)."""


class LivenessCheck:
    def __init__(self, model: nn.Module, steps: int = 5, every: int = 50, patience: int = 3,
                 total_steps: int | None = None):
        """``total_steps``: the run's length; a run shorter than ``steps`` is checked over all of its steps."""
        self.weights = [(n, w) for n, w in prunable_weights(model) if w.requires_grad and w.numel()]
        if total_steps is not None:
            steps = max(1, min(steps, total_steps))
        self.steps, self.every, self.patience = steps, every, patience
        self.alive = [False] * len(self.weights)
        self.silent = 0            # consecutive later checks without any weight gradient

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Call after ``backward()`` at global step ``step``; raises at step ``steps − 1`` (a layer
        never reached) or when ``patience`` later checks in a row saw no weight gradient at all."""
        if step >= self.steps:
            if step % self.every == 0:
                live = self._live()
                if live and not any(live.values()):
                    self.silent += 1
                    if self.silent >= self.patience:
                        raise DeadNetworkError(
                            f"dead network: no Linear/Conv weight received a gradient at steps "
                            f"{step - self.every * (self.patience - 1)}-{step} (every unit is off: the "
                            f"steps blew the activations up); allowed: a smaller --lr")
                else:
                    self.silent = 0
            return
        for i, ok in self._live().items():
            self.alive[i] = self.alive[i] or ok
        if step == self.steps - 1:
            dead = [n for (n, w), ok in zip(self.weights, self.alive) if not ok and w.grad is not None]
            if dead:
                raise DeadNetworkError(self.message(dead))

    def _live(self) -> dict[int, bool]:
        """Weight index -> whether its gradient has a nonzero entry (weights with a gradient)."""
        idx = [i for i, (_, w) in enumerate(self.weights) if w.grad is not None]
        if not idx:
            return {}
        flags = [self.weights[i][1].grad.ne(0).any() for i in idx]
        try:
            values = torch.stack(flags).tolist()
        except RuntimeError:                  # gradients on several devices
            values = [bool(f) for f in flags]
        return dict(zip(idx, values))

    def message(self, dead: list[str]) -> str:
        empty = [n for n, w in self.weights if not bool(w.ne(0).any())]
        more = f" (and {len(dead) - 1} more)" if len(dead) > 1 else ""
        cause = (f"layer {empty[0]} has no nonzero weight, so every activation after it is zero"
                 if empty else "its inputs or its outputs are zero")
        return (f"dead network: no gradient reached {dead[0]}{more} in the first {self.steps} steps ({cause}); "
                f"allowed: a denser start (--init-density, --init-distribution erk) or a smaller --lr")
