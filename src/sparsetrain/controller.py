r"""λ controllers: end a regularized run at a requested sparsity.

Users ask for a sparsity, not for a λ. Both controllers follow the target density trajectory
of gradual magnitude pruning (Zhu & Gupta), from the density d₀ measured at the first step to
the requested d_T = 1 − sparsity:

    density*(t) = d_T + (d₀ − d_T)·(1 − t / (ramp·T))³   for t < ramp·T,   d_T afterwards.

**Budgets** (``distribution``): ``"global"`` steers one λ shared by every regularized layer
towards the overall density (ℓ1 then decides which layers keep their weights — on LeNet-300-100
it starves the small classifier); ``"uniform"`` / ``"erk"`` give every regularized layer its own
λ and its own final density d_T,l (the same in every layer, or the Erdős–Rényi-kernel densities
of RigL, see :func:`sparsetrain.pruning.layer_densities`), each followed on its own cubic ramp.
Layer budgets need one param group per layer with its own regularizer object
(``param_groups(model, lambda *a: L1(lam))`` makes that).

:class:`SparsityController` (ProxSGD, xRDA, gRDA — methods that start dense and *remove*
weights): every ``every`` steps it multiplies a budget's λ (``opt.scale_lam``) by
``exp(clip(gain · log(density / density*(t)), −c, c))``, where the cap c (at most
log max_factor) halves whenever the error changes sign and grows back by 20 % while it does not.

:class:`BudgetController` (LinBreg, AdaBreg — inverse scale space methods that start sparse and
*add* weights): a zero entry of a Bregman method becomes nonzero when its accumulated
subgradient v crosses the threshold λ (``|v| > λ`` for ℓ1, ``‖v_g‖ > λ√n_g`` for a group), so
λ can be *computed*: every ``every`` steps it is set so that exactly the entries the budget
``density*(t)`` allows — those with the largest ``|v|/λ`` — are admitted, and so that none are
admitted while the network is at its budget. During the first ``warmup`` steps, while momentum
builds up and the gradients grow (v accelerates), it also checks the steps in between: where the
entries about to cross λ would take a budget past its *final* density (which Bregman iterations
could never come down from), λ is raised so that they cannot. When fewer candidates carry evidence (|v| > 0)
than the budget allows, λ is not lowered past them (it never collapses to 0) and the rest are
grown by gradient magnitude, as RigL grows: for ℓ1, the zero entries with the largest |∂L/∂w|
get v = −sign(∂L/∂w)·λ(1 + 10⁻³), i.e. they enter at ≈ 0 and move along −∂L/∂w.
The groups are switched to ``inactive="keep"``: on a change of λ the subgradient is
re-initialised from the current weights where they are nonzero (no jump) and zero entries keep
their accumulated v.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UsageError, check, choice
from .optim import BregmanOptimizer
from .params import prunable_weights
from .regularizers import L1

DISTRIBUTIONS = ("global", "uniform", "erk")
GROW_MARGIN = 1e-3
START_TOLERANCE = 0.005     # a BudgetController's start may exceed the target density by this much
# steps at the start in which the BudgetController also guards the final budget between its updates:
# on ResNet-56 at 98 % the first five steps took the density from 0.7 to 2.25 % (target 2 %)
WARMUP_STEPS = 20
GUARD_MARGIN = 2.0     # the guard's one-step look-ahead misses acceleration; passing the final budget is for good


class _Budget:
    """One λ and the weights it governs: ``groups`` (param-group indices whose λ moves together),
    ``params`` (the tensors counted), the final density ``target`` and the controller state."""

    def __init__(self, groups: list[int], params: list[torch.Tensor], target: float):
        self.groups, self.params, self.target = groups, params, target
        self.numel = sum(p.numel() for p in params)
        self.start: float | None = None
        self.cap: float | None = None
        self.last_err = 0.0
        self.last_v: list[torch.Tensor] = []

    @torch.no_grad()
    def density(self) -> float:
        return _densities([self])[0]


@torch.no_grad()
def _densities(budgets: list[_Budget]) -> list[float]:
    """The density of every budget, read from the device in one transfer (one sync on a GPU)."""
    counts = [torch.count_nonzero(p) for b in budgets for p in b.params]
    if not counts:
        return [0.0] * len(budgets)
    try:
        flat = torch.stack(counts).tolist()
    except RuntimeError:                      # params on several devices
        flat = [int(c) for c in counts]
    out, i = [], 0
    for b in budgets:
        out.append(sum(flat[i:i + len(b.params)]) / max(b.numel, 1))
        i += len(b.params)
    return out

class SparsityController:
    def __init__(self, optimizer, model: nn.Module, sparsity: float, total_steps: int, *,
                 every: int = 5, ramp: float = 0.75, gain: float = 1.0, max_factor: float = 2.0,
                 min_lam: float = 1e-12, distribution: str = "global"):
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
        self.distribution = choice(distribution, "--distribution", DISTRIBUTIONS)
        self.budgets = self._make_budgets(sparsity)
        self.trajectory: list[tuple[int, float, float]] = []   # (step, λ, density)

    # ---------------------------------------------------------------- budgets
    def _make_budgets(self, sparsity: float) -> list[_Budget]:
        weights = prunable_weights(self.model)
        regularized = [i for i, g in enumerate(self.optimizer.param_groups) if self._is_regularized(g)]
        if self.distribution == "global":   # one λ; the density of every Linear/Conv weight
            return [_Budget(regularized, [w for _, w in weights], self.target)]
        from .pruning import layer_densities                # lazy: pruning imports the metrics
        names = {id(w): n for n, w in weights}
        budgets, seen_regs = [], set()
        for i in regularized:
            g = self.optimizer.param_groups[i]
            # λ lives in the group (lam_key) or in its regularizer, which groups may share
            reg_id = i if getattr(self.optimizer, "lam_key", None) else id(g.get("reg"))
            if len(g["params"]) != 1 or id(g["params"][0]) not in names or reg_id in seen_regs:
                raise UsageError(f"--distribution: {self.distribution} budgets need one param group per "
                                 f"Linear/Conv weight with its own regularizer; allowed: global for these groups")
            seen_regs.add(reg_id)
            budgets.append(_Budget([i], g["params"], 0.0))
        own = {id(b.params[0]) for b in budgets}
        shapes = {n: w.shape for n, w in weights if w.numel()}
        dens = layer_densities(shapes, sparsity, self.distribution,
                               dense=[n for n, w in weights if id(w) not in own and w.numel()])
        for b in budgets:
            b.target = dens.get(names[id(b.params[0])], 1.0)
        return budgets

    def _is_regularized(self, g: dict) -> bool:
        fn = getattr(self.optimizer, "is_regularized", None)
        return fn(g) if fn is not None else g.get("reg") is not None

    @property
    def start_density(self) -> float | None:
        return self.budgets[0].start if self.budgets else None

    @start_density.setter
    def start_density(self, value: float | None) -> None:
        for b in self.budgets:
            b.start = value

    def target_density(self, step: int, budget: _Budget | None = None) -> float:
        b = budget or self.budgets[0]
        d0 = b.start if b.start is not None else b.target
        t = min(1.0, step / (self.ramp * self.total_steps))
        return b.target + (d0 - b.target) * (1.0 - t) ** 3

    def lam(self) -> float:
        """The largest λ over the regularized groups (what the log shows)."""
        lams = [x for x in self.optimizer.get_lam() if x is not None]
        return max(lams) if lams else 0.0

    def _scale(self, b: _Budget, factor: float) -> None:
        """Multiply the λ of budget ``b``'s groups (a regularizer they share, once)."""
        self.optimizer.scale_lam(factor, groups=b.groups)

    # ---------------------------------------------------------------- control
    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after every optimizer step; acts every ``every`` steps."""
        if step % self.every:
            return
        dens = _densities(self.budgets)
        if self.budgets and self.budgets[0].start is None:
            for b, d in zip(self.budgets, dens):
                b.start = d
            self._check_start()
        self._adjust_all(step, dens)
        if step % (self.every * 20) == 0:       # (λ changes move no weight: dens still holds)
            total = sum(b.numel for b in self.budgets) or 1
            self.trajectory.append((step, self.lam(), sum(d * b.numel for b, d in zip(self.budgets, dens)) / total))

    def _check_start(self) -> None:
        """Called once, when the start densities are measured (the budget controller refuses a
        start it cannot come down from)."""

    def _adjust_all(self, step: int, dens: list[float]) -> None:
        lams = self.optimizer.get_lam()
        for b, d in zip(self.budgets, dens):
            lam = max((lams[i] for i in b.groups if lams[i] is not None), default=0.0)
            self._adjust(step, d, b, lam)

    def _adjust(self, step: int, d: float, b: _Budget, lam: float) -> None:
        err = math.log(max(d, 1e-9) / max(self.target_density(step, b), 1e-9))
        # Rprop-style step cap (log space): shrink it when the error changes sign (the density
        # can respond steeply to λ), let it grow back while the sign holds
        top = math.log(self.max_factor)
        cap = top if b.cap is None else b.cap
        if err * b.last_err < 0:
            cap = max(1e-3, cap * 0.5)
        elif err != 0:
            cap = min(top, cap * 1.2)
        b.cap, b.last_err = cap, err
        factor = math.exp(max(-cap, min(cap, self.gain * err)))
        if lam * factor < self.min_lam:       # λ = 0 stays 0 under scaling: restart it
            self.optimizer.set_lam([self.min_lam if i in b.groups else None
                                    for i in range(len(self.optimizer.param_groups))])
        elif factor != 1.0:
            self._scale(b, factor)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"trajectory": [list(t) for t in self.trajectory],
                "budgets": [{"start": b.start, "cap": b.cap, "last_err": b.last_err, "last_v": list(b.last_v)}
                            for b in self.budgets]}

    def load_state_dict(self, state: dict) -> None:
        self.trajectory = [tuple(t) for t in state.get("trajectory", [])]
        for b, s in zip(self.budgets, state.get("budgets", [])):
            b.start, b.cap, b.last_err = s.get("start"), s.get("cap"), s.get("last_err", 0.0)
            b.last_v = list(s.get("last_v", []))


class BudgetController(SparsityController):
    """λ computed from the Bregman subgradients so the density follows its budget exactly."""

    def __init__(self, optimizer, model: nn.Module, sparsity: float, total_steps: int, *,
                 every: int = 5, ramp: float = 0.75, margin: float = 1.05, start_lam: float = 1.0,
                 distribution: str = "global", warmup: int = WARMUP_STEPS):
        super().__init__(optimizer, model, sparsity, total_steps, every=every, ramp=ramp,
                         distribution=distribution)
        self.margin, self.warmup = margin, warmup
        for g in optimizer.param_groups:
            g["inactive"] = "keep"
        # start high, so that nothing is admitted before the first budget update computes λ
        optimizer.scale_lam(max(1.0, start_lam / max(self.lam(), 1e-12)))

    def _check_start(self) -> None:
        total = sum(b.numel for b in self.budgets) or 1
        start = sum(b.start * b.numel for b in self.budgets) / total
        target = sum(b.target * b.numel for b in self.budgets) / total
        if start > target + START_TOLERANCE:    # (one layer may start above its own: the init floor)
            raise UsageError(f"BudgetController: the network starts at density {start:.4f}, denser than "
                             f"the target {target:.4f}; Bregman iterations only add weights, so it cannot "
                             f"come down to it; allowed: a sparse start (sparse_init_ with a density <= "
                             f"{target:g})")

    @torch.no_grad()
    def update(self, step: int) -> None:
        super().update(step)
        if step % self.every and step < self.warmup and self.budgets and self.budgets[0].start is not None:
            self._hold_final_budget(step)

    def _hold_final_budget(self, step: int) -> None:
        """Between two updates: raise λ of every budget whose zero entries about to cross it (v one
        step ahead, at its velocity since the last update) would take it past its final density.
        Reads the state only (the look-ahead of the updates is unchanged), so a run in which no
        budget is at risk takes the same steps as without this guard."""
        dens, plans, stats = _densities(self.budgets), [], []
        since = step % self.every           # steps since the last update, which read last_v
        for b, d in zip(self.budgets, dens):
            room = int(round(b.target * b.numel)) - int(round(d * b.numel))
            scores = [torch.where(p == 0, g["reg"].activation(v + (v - last) / since), v.new_full((), -1.0)).flatten()
                      for (p, g, v), last in zip(self._tensors(b), b.last_v) if last.shape == v.shape]
            if not scores:
                continue
            scores = torch.cat(scores)
            m = min(max(room, 0) + 1, scores.numel())
            stats.append(torch.stack([(scores > 1).sum().to(scores.dtype), torch.topk(scores, m).values[-1]]))
            plans.append((b, room, m))
        for (b, room, m), (crossing, cut) in zip(plans, torch.stack(stats).tolist() if stats else []):
            if crossing > max(room, 0) and m > max(room, 0) and cut > 0:
                self._scale(b, cut * GUARD_MARGIN)     # the (room+1)-th strongest stays out, with room to spare

    def _tensors(self, b: _Budget):
        """(param, group, v) of budget ``b``'s regularized tensors that have a Bregman state."""
        for gi in b.groups:
            g = self.optimizer.param_groups[gi]
            for p in g["params"]:
                v = self.optimizer.state.get(p, {}).get("v")
                if v is not None:
                    yield p, g, v

    @staticmethod
    def supports(optimizer) -> bool:
        """Whether every regularized group's regularizer has per-entry activation scores."""
        regs = [g.get("reg") for g in optimizer.param_groups if g.get("reg") is not None]
        return bool(regs) and all(r.activation(torch.ones(1, 1)) is not None for r in regs)

    def _candidates(self, b: _Budget):
        """Per regularized tensor of budget ``b``: (param, group, zero mask, scores), the scores
        being |v|/λ of the zero entries with v extrapolated over the next ``every`` steps from its
        change since the last update (Adam-type steps move all candidates at once, so the
        admission must look ahead) and −1 at the nonzero entries (no boolean indexing: no sync)."""
        out, last = [], []
        for i, (p, g, v) in enumerate(self._tensors(b)):
            prev = b.last_v[i] if i < len(b.last_v) and b.last_v[i].shape == v.shape else v
            zero = p == 0
            act = g["reg"].activation(2 * v - prev)
            out.append((p, g, zero, torch.where(zero, act, act.new_full((), -1.0))))
            last.append(b.last_v[i].copy_(v) if prev is not v else v.clone())
        b.last_v = last
        return out

    def _adjust_all(self, step: int, dens: list[float]) -> None:
        """Every budget's few order statistics are computed on the device and read in one
        transfer: the largest score, the k-th and (k+1)-th largest, how many of the top k+1
        carry evidence (> 0) and the smallest of those."""
        plans, stats = [], []
        for b, d in zip(self.budgets, dens):
            zeros = int(round((1.0 - d) * b.numel))
            if zeros == 0:
                continue
            cands = self._candidates(b)
            if not cands:
                continue
            scores = torch.cat([c[3].flatten() for c in cands])
            need = int(round(self.target_density(step, b) * b.numel)) - int(round(d * b.numel))
            k = min(need, zeros, scores.numel()) if need > 0 else 0
            m = min(max(k, 1) + 1, scores.numel())
            top = torch.topk(scores, m, sorted=False).values
            low = torch.topk(top, min(2, m), largest=False).values      # ascending
            kth, next_ = (low[1], low[0]) if m == k + 1 and m >= 2 else (low[0], low.new_full((), -1.0))
            positive = top > 0
            stats.append(torch.stack([top.max(), kth, next_, positive.sum().to(top.dtype),
                                      torch.where(positive, top, top.new_full((), math.inf)).min()]))
            plans.append((b, cands, k))
        if not plans:
            return
        for (b, cands, k), (best, kth, next_, n_pos, min_pos) in zip(plans, torch.stack(stats).tolist()):
            self._decide(b, cands, k, best, kth, next_, int(n_pos), min_pos)

    def _decide(self, b: _Budget, cands, k: int, best: float, kth: float, next_: float, n_pos: int,
                min_pos: float) -> None:
        """Scale λ of budget ``b`` so that its ``k`` strongest candidates are admitted (k = 0: none)."""
        if best < 0:                   # no zero entry among the candidates
            return
        missing = 0
        if k > 0:   # admit the k strongest candidates: factor between k-th and (k+1)-th score
            if kth <= 0:               # fewer candidates with evidence than the budget allows
                factor = min_pos * (1 - 1e-6) if n_pos else 1.0
                missing = k - n_pos
            elif next_ >= 0 and kth > next_:
                factor = (kth + next_) / 2
            else:  # a tie at the boundary (Adam-type steps), or fewer candidates than allowed
                factor = kth * (1 - 1e-6)
            # λ falls at most by max_factor per update: candidates that only start to receive
            # gradients (newly connected units) must not all be let in at once
            factor = max(factor, 1.0 / self.max_factor)
        else:          # at the budget: nobody new until the next update
            factor = max(1.0, best * self.margin)
        if factor > 0 and factor != 1.0:
            self._scale(b, factor)
        if missing > 0:
            self._grow_by_gradient(cands, missing)

    @torch.no_grad()
    def _grow_by_gradient(self, cands, count: int) -> None:
        """Admit ``count`` zero ℓ1 entries without evidence (v = 0) by gradient magnitude."""
        pool = []
        for p, g, zero, _ in cands:
            reg, v = g["reg"], self.optimizer.state[p]["v"]
            if p.grad is None or not isinstance(reg, L1):
                continue
            free = zero & (v == 0)
            pool.append((p, g, free, p.grad.abs() * free))
        if not pool:
            return
        flat = torch.cat([s.flatten() for *_, s in pool])
        k = min(count, int(torch.count_nonzero(flat)))
        if k == 0:
            return
        cut = torch.topk(flat, k).values[-1]
        for p, g, free, s in pool:
            v = self.optimizer.state[p]["v"]
            entry = -torch.sign(p.grad) * (float(g["reg"].lam) * (1 + GROW_MARGIN))
            v.copy_(torch.where((s >= cut) & (s > 0), entry, v))
