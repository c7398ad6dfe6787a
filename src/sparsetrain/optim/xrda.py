r"""xRDA: extended regularized dual averaging with adaptive (reweighted) ℓ1
(Siegel, Chen, Zhang, Xu; SPEC §3).

Per tensor, step k = 1, 2, ... with step size s_k, averaging parameter α_k ∈ [0, 1],
β_k = e^{−s_k/τ}, γ_k = e^{−s_k/τ_b}; state z₀ = w₀, v₀ = 0, a₀ = 0, T₀ = 0:

.. math::
    g_k &= ∇f(w_{k-1}) + \mathrm{wd}\cdot w_{k-1} \\
    a_k &= γ_k a_{k-1} + (1-γ_k)\, m(w_{k-1}) \qquad m = |w| \text{ or the group mean of } |w| \\
    b_k &= c_G\, M ε_k/(a_k + ε_k), \qquad ε_k = \max(a_k)/(M-1) \\
    T_k &= α_k T_{k-1} + s_k b_k \\
    v_k &= β_k v_{k-1} + (1-β_k) g_k \\
    z_k &= α_k z_{k-1} + (1-α_k) w_{k-1} - s_k v_k \\
    w_k &= S_{λ T_k}(z_k)

``b ∝ 1/(a + ε)`` is the derivative of log(|w| + ε): the reweighting is a log penalty,
re-linearised every step around a running average of |w|. With ``reweight=False``, b ≡ c_G.
α ≡ 0 is proximal SGD with EMA momentum; α ≡ 1 is ℓ1-RDA anchored at w₀.

Modes (4-D conv weights; 2-D and smaller tensors always use the elementwise mode):
``"normal"`` elementwise (c_G = 1); ``"kernel"`` groups w[o, i] (c_G = √(kh·kw));
``"channel"`` groups w[o] (c_G = √(Cin·kh·kw)). The prox stays elementwise, the structure comes
from the shared per-group threshold (a and T are stored per group; without reweighting T is
one float per tensor). If max(a) = 0 (an all-zero tensor) ε is clamped to the smallest normal
float, giving b = c_G·M, never NaN.

Schedules (``schedule=``): ``"cosine"`` s_k = ½ s₀(1 + cos(πk/K)), α_k = ½(1 − cos(πk/K)) with
K = ``total_steps`` (default when ``total_steps`` is given; k is clamped to K, so steps past K
do not move w); ``"step"`` halves s and moves α
halfway to 1 at each of ``milestones`` (α = 1 − 2^{−j} after j milestones); ``"constant"``
s_k = s₀ (default without ``total_steps``). s₀ is the group's ``lr``, so LR schedulers scale it.
``alpha=`` (a number, or a callable ``k -> α_k``) overrides the schedule's α.

The penalty λ lives in each param group under ``"lam"`` (``get_lam``/``set_lam`` use it).
Groups with ``penalize=False`` -- also groups built by :func:`sparsetrain.param_groups` with
``reg=None`` (biases, norms) -- are never thresholded; since then w = z always, they take
the α-free step w ← w − s v without a z buffer. A group whose ``reg`` is an :class:`L1` takes
its initial ``lam`` from ``reg.lam`` unless it sets ``lam`` itself; a ``reg.lam`` that differs
from the ``lam=`` argument, and any other regularizer (XRDA's penalty is its own reweighted ℓ1;
group sparsity comes from ``mode``), are errors rather than silently ignored. With the cosine
schedule, stepping past ``total_steps`` is an error (s = 0 there: nothing would change).
"""
from __future__ import annotations

import ctypes
import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from .. import native
from ..errors import UsageError, choice
from ..regularizers import L1, is_null
from . import fused_cuda
from ._base import SparseOptimizer, _softshrink, check_number

__all__ = ["XRDA", "xrda", "xrda_schedule", "reweight_factor"]

SCHEDULES = ("cosine", "step", "constant")
MODES = ("normal", "kernel", "channel")


def xrda_schedule(k: int, *, lr: float, schedule: str, total_steps: int | None = None,
                  milestones=(), alpha=None) -> tuple[float, float]:
    """(s_k, α_k) for step k ≥ 1 (see the module docstring)."""
    if schedule == "cosine":
        c = math.cos(math.pi * min(k, total_steps) / total_steps)
        s, a = 0.5 * lr * (1 + c), 0.5 * (1 - c)
    elif schedule == "step":
        j = sum(1 for m in milestones if k >= m)
        s, a = lr * 0.5 ** j, 1 - 0.5 ** j
    else:
        s, a = lr, 0.0
    if alpha is not None:
        a = float(alpha(k)) if callable(alpha) else float(alpha)
    return s, a


def reweight_factor(a: Tensor, max_factor: float, c_group: float = 1.0) -> Tensor:
    """b = c_G·M·ε/(a + ε), ε = max(a)/(M − 1): 1·c_G at the largest entry, M·c_G at zeros."""
    eps = a.amax().div_(max_factor - 1).clamp_min_(torch.finfo(a.dtype).tiny)
    return (c_group * max_factor) * eps / (a + eps)


def _grouping(shape, mode: str) -> tuple[tuple[int, ...] | None, int]:
    """(reduced dims, group size n) of a tensor in ``mode``; (None, 1) for elementwise."""
    if mode == "normal" or len(shape) < 3:
        return None, 1
    dims = tuple(range(2 if mode == "kernel" else 1, len(shape)))
    return dims, math.prod(shape[d] for d in dims)


class XRDA(SparseOptimizer):
    r"""Extended RDA with adaptive reweighted ℓ1 thresholds.

    Args:
        params: parameters or param groups.
        lr: s₀, the base step size (paper CIFAR setting: 1).
        lam: λ, the penalty (paper CIFAR: ≈1e-6; T accumulates s·b with b up to M·c_G).
        tau: momentum time scale τ (β_k = e^{−s_k/τ}; default 9.5).
        tau_b: reweighting time scale τ_b (γ_k = e^{−s_k/τ_b}; default 9.5).
        max_factor: M ≥ 1, the largest reweighting factor (default 500; M = 1 is the limit
            ε → ∞, b ≡ c_G: plain ℓ1, the same as ``reweight=False``).
        reweight: adaptive reweighting on (default) or plain ℓ1 (b ≡ c_G).
        schedule: ``"cosine"`` | ``"step"`` | ``"constant"`` (default: cosine if
            ``total_steps`` is given, else constant).
        total_steps: K of the cosine schedule.
        milestones: steps at which the step schedule halves s and moves α halfway to 1.
        alpha: fixed α (number or callable ``k -> α``), overriding the schedule's α.
        mode: ``"normal"`` | ``"kernel"`` | ``"channel"``.
        weight_decay: L2 term added to the gradient (paper: 5e-4).
        maximize: ascend the objective instead (default False).
        foreach: multi-tensor path (default) or ``False`` for the single-tensor loop.

    Momentum convention: an exponential moving average v ← βv + (1−β)g with β = e^{−s/τ}
    (dampened, unlike ``torch.optim.SGD``'s b ← βb + g): s₀ = 1, τ = 9.5 (β ≈ 0.9) gives about the
    effective step of SGD(lr=0.1, momentum=0.9).
    """

    lam_key = "lam"

    def __init__(self, params, lr: float, lam: float, *, tau: float = 9.5, tau_b: float = 9.5,
                 max_factor: float = 500.0, reweight: bool = True, schedule: str | None = None,
                 total_steps: int | None = None, milestones=(), alpha: float | Callable | None = None,
                 mode: str = "normal", weight_decay: float = 0.0, maximize: bool = False,
                 foreach: bool | None = None) -> None:
        if schedule is None:
            schedule = "cosine" if total_steps else "constant"
        defaults = dict(lr=lr, lam=lam, tau=tau, tau_b=tau_b, max_factor=max_factor, reweight=reweight,
                        schedule=schedule, total_steps=total_steps, milestones=list(milestones),
                        alpha=alpha, mode=mode, weight_decay=weight_decay, maximize=maximize, penalize=True,
                        foreach=foreach)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.__dict__.pop("_max_a_hints", None)   # predictions about the replaced a / w: recomputed

    def add_param_group(self, param_group: dict) -> None:
        if "reg" in param_group:  # a group from param_groups(): reg=None means unpenalised
            param_group = dict(param_group)
            reg = param_group.pop("reg")
            param_group.setdefault("penalize", not is_null(reg))
            where = f"param group {len(self.param_groups)}"
            if not is_null(reg) and not isinstance(reg, L1):
                raise UsageError(f"reg: XRDA applies its own reweighted ℓ1 penalty, so {where}'s "
                                 f"{type(reg).__name__} would be ignored; allowed: L1 or None (group sparsity: "
                                 f"mode='kernel' or 'channel')")
            if not is_null(reg) and "lam" not in param_group:
                # one λ per group: the regularizer's, which must then agree with the lam= argument
                if float(reg.lam) != float(self.defaults["lam"]):
                    raise UsageError(f"lam: XRDA got lam={self.defaults['lam']!r} but {where}'s L1 carries "
                                     f"λ={reg.lam!r}; allowed: the same value in both, or a 'lam' key in the "
                                     f"group (which wins over both)")
                param_group["lam"] = reg.lam
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        check_number(g["lr"], "lr")
        check_number(g["lam"], "lam")
        check_number(g["tau"], "tau", strict=True)
        check_number(g["tau_b"], "tau_b", strict=True)
        check_number(g["max_factor"], "max_factor", low=1.0)
        choice(g["schedule"], "schedule", SCHEDULES)
        choice(g["mode"], "mode", MODES)
        if g["schedule"] == "cosine" and not (isinstance(g["total_steps"], numbers.Integral)
                                              and g["total_steps"] > 0):
            raise UsageError(f"total_steps: must be an int > 0 for the cosine schedule, got {g['total_steps']!r}")
        if g["alpha"] is not None and not callable(g["alpha"]):
            check_number(g["alpha"], "alpha", high=1.0)

    @torch.no_grad()
    def _update_group(self, group: dict) -> None:
        """One xRDA step on one param group."""
        penalize, mode = group["penalize"], group["mode"]
        reweight = group["reweight"] and group["max_factor"] > 1  # M = 1: b ≡ c_G (plain ℓ1)
        buckets: dict[int, list] = {}  # params at the same step k share (s_k, α_k)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["schedule"] == "cosine" and state["step"] >= group["total_steps"]:
                raise UsageError(f"total_steps: XRDA was stepped more than total_steps={group['total_steps']} "
                                 f"times; its cosine step size is 0 from there on, so nothing would change; "
                                 f"allowed: total_steps >= the number of steps taken")
            if penalize and "z" not in state:
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                state["T"] = 0.0  # a float while b is uniform (no reweighting)
            if penalize and reweight and "a" not in state:
                dims, _ = _grouping(p.shape, mode)
                a = torch.zeros_like(p) if dims is None else p.new_zeros(
                    [1 if d in dims else n for d, n in enumerate(p.shape)])
                state["a"], state["T"] = a, torch.full_like(a, float(state["T"]))
            state["step"] += 1
            buckets.setdefault(state["step"], []).append((p, state))
        for k, items in buckets.items():
            s, alpha = xrda_schedule(k, lr=float(group["lr"]), schedule=group["schedule"],
                                     total_steps=group["total_steps"], milestones=group["milestones"],
                                     alpha=group["alpha"])
            params = [p for p, _ in items]
            hints = gamma_next = None
            if penalize and reweight:  # max(a) predictions for the one-pass native step (not state)
                s_next, _ = xrda_schedule(k + 1, lr=float(group["lr"]), schedule=group["schedule"],
                                          total_steps=group["total_steps"], milestones=group["milestones"],
                                          alpha=group["alpha"])
                gamma_next = math.exp(-s_next / group["tau_b"])
                table = self.__dict__.setdefault("_max_a_hints", {})
                hints = [table.setdefault(p, {}) for p in params]
            streams = ([p.grad for p in params], [st["v"] for _, st in items], [st.get("z") for _, st in items],
                       [st.get("a") for _, st in items], [st.get("T") for _, st in items])
            kw = dict(s=s, alpha=alpha, beta=math.exp(-s / group["tau"]), gamma=math.exp(-s / group["tau_b"]),
                      lam=float(group["lam"]), max_factor=float(group["max_factor"]),
                      weight_decay=group["weight_decay"], reweight=reweight, mode=mode, penalize=penalize)
            Ts = None
            cache = self._fused_cache()
            if fused_cuda.xrda_applicable([params, *streams], group, cache, self._applied_keys):
                Ts = fused_cuda.xrda(params, *streams, **kw, gamma_next=gamma_next, cache=cache)
            if Ts is None:
                Ts = xrda(params, *streams, **kw, foreach=self._use_foreach(group), hints=hints,
                          gamma_next=gamma_next)
            if penalize:
                for (_, st), T in zip(items, Ts):
                    st["T"] = T


def _reweight_(p: Tensor, a: Tensor, T: Tensor, *, s: float, alpha: float, gamma: float,
               max_factor: float, mode: str) -> None:
    """a ← γa + (1−γ)m(w);  T ← αT + s·b,  b = c_G·M·ε/(a+ε),  ε = max(a)/(M−1).

    Uses ``p`` (holding w_{k−1}) as scratch memory: the caller overwrites it with w_k next."""
    dims, n = _grouping(p.shape, mode)
    m = p.abs_()
    if dims is not None:  # group mean of |w|: the grouped dims are the trailing ones
        m = (m.reshape(-1, n) @ m.new_full((n,), 1.0 / n)).reshape(a.shape)
    a.lerp_(m, 1 - gamma)
    eps = a.amax().div_(max_factor - 1).clamp_min_(torch.finfo(a.dtype).tiny)  # no 0/0 on zeros
    denom = torch.add(a, eps, out=p if dims is None else m)
    if alpha != 1.0:
        T.mul_(alpha)
    T.addcdiv_(eps, denom, value=s * math.sqrt(n) * max_factor)


def _threshold_(p: Tensor, z: Tensor, T, lam: float) -> None:
    """w ← S_{λT}(z) = sign(z)·max(|z| − λT, 0), written into p (T: tensor, per entry or per
    group, or a float)."""
    if not torch.is_tensor(T):
        _softshrink(z, lam * T, out=p)
        return
    torch.abs(z, out=p).sub_(T, alpha=lam).clamp_min_(0).copysign_(z)


def _native_ok(p: Tensor, g: Tensor, v: Tensor, z: Tensor, a, T) -> bool:
    """The fused kernels apply: contiguous float32 CPU tensors (and the library loaded)."""
    return p.dtype == torch.float32 and native.usable(p, g, v, z, a, T if torch.is_tensor(T) else None)


def _xrda_native(p: Tensor, g: Tensor, v: Tensor, z: Tensor, a, T, *, s: float, alpha: float, beta: float,
                 gamma: float, lam: float, max_factor: float, weight_decay: float, reweight: bool, mode: str,
                 hint: dict | None = None, gamma_next: float | None = None):
    """One xRDA step of one tensor in fused passes (``native/kernels.c``): v, z, a and max(a) in
    the first, T and w = S_{λT}(z) in the second. Returns the new T.

    Elementwise reweighting needs ε = max(a_k)/(M−1) before T can be updated; ``hint`` (a dict
    kept per tensor) carries max(a_k) as the previous step predicted it for γ_k = ``gamma``, which
    makes the step a single pass (``st_xrda_fused``); the pass returns the true max(a_k), and a
    wrong prediction (w or a changed outside the optimizer) is repaired at once. Each step then
    predicts the next one's for ``gamma_next``."""
    so, P = native.lib(), native.ptr
    gsize = _grouping(p.shape, mode)[1]
    if reweight and gsize == 1 and hint is not None:
        return _xrda_native_elementwise(p, g, v, z, a, T, s=s, alpha=alpha, beta=beta, gamma=gamma, lam=lam,
                                        max_factor=max_factor, weight_decay=weight_decay, hint=hint,
                                        gamma_next=gamma_next)
    n = p.numel()
    groups = n // gsize
    step = (1 - beta, (1 - beta) * weight_decay, s, alpha, 1 - gamma)
    bounds = native.split(groups, 4 * n)                 # in groups; entries are lo*gsize ... hi*gsize
    if not reweight:                                      # a uniform threshold: one elementwise pass
        T = alpha * T + s * math.sqrt(gsize)
        native.parallel_for(bounds, lambda lo, hi: so.st_xrda_plain(
            (hi - lo) * gsize, P(p, lo * gsize), P(g, lo * gsize), P(v, lo * gsize), P(z, lo * gsize),
            *step[:4], lam * T), n)
        return T
    if gsize == 1:
        amax = max(native.parallel_for(bounds, lambda lo, hi: so.st_xrda_pass1(
            hi - lo, P(p, lo), P(g, lo), P(v, lo), P(z, lo), P(a, lo), *step), n))
    else:
        amax = max(native.parallel_for(bounds, lambda lo, hi: so.st_xrda_group_pass1(
            hi - lo, gsize, P(p, lo * gsize), P(g, lo * gsize), P(v, lo * gsize), P(z, lo * gsize), P(a, lo),
            *step), n))
    eps = max(amax / (max_factor - 1), torch.finfo(torch.float32).tiny)
    coef = s * math.sqrt(gsize) * max_factor
    if gsize == 1:
        native.parallel_for(bounds, lambda lo, hi: so.st_xrda_pass2(
            hi - lo, P(p, lo), P(z, lo), P(a, lo), P(T, lo), alpha, coef, eps, lam), n)
    else:
        native.parallel_for(bounds, lambda lo, hi: so.st_xrda_group_pass2(
            hi - lo, gsize, P(p, lo * gsize), P(z, lo * gsize), P(a, lo), P(T, lo), alpha, coef, eps, lam), n)
    return T


def _xrda_native_elementwise(p, g, v, z, a, T, *, s, alpha, beta, gamma, lam, max_factor, weight_decay, hint,
                             gamma_next):
    """:func:`_xrda_native` for an elementwise reweighted tensor, with the max(a) prediction."""
    so, P, n = native.lib(), native.ptr, p.numel()
    tiny = torch.finfo(torch.float32).tiny
    step = (1 - beta, (1 - beta) * weight_decay, s, alpha, 1 - gamma)
    coef, g_next = s * max_factor, 1 - (gamma if gamma_next is None else gamma_next)
    bounds = native.split(n, 4 * n)
    if hint.get("gamma1") == 1 - gamma:                   # one pass with the predicted ε
        eps_used = max(hint["amax"] / (max_factor - 1), tiny)

        def fused(lo, hi):
            pred = ctypes.c_float()
            amax = so.st_xrda_fused(hi - lo, P(p, lo), P(g, lo), P(v, lo), P(z, lo), P(a, lo), P(T, lo), *step,
                                    coef, eps_used, lam, g_next, ctypes.byref(pred))
            return amax, pred.value
        out = native.parallel_for(bounds, fused, n)
        amax, pred = max(o[0] for o in out), max(o[1] for o in out)
        if amax != hint["amax"]:                          # the prediction missed: repair T and w
            pred = _repair(p, z, a, T, amax, hint["amax"], coef=coef, lam=lam, max_factor=max_factor,
                           gamma1_next=g_next)
    else:                                                 # two passes, then a prediction
        amax = max(native.parallel_for(bounds, lambda lo, hi: so.st_xrda_pass1(
            hi - lo, P(p, lo), P(g, lo), P(v, lo), P(z, lo), P(a, lo), *step), n))
        eps = max(amax / (max_factor - 1), tiny)
        native.parallel_for(bounds, lambda lo, hi: so.st_xrda_pass2(
            hi - lo, P(p, lo), P(z, lo), P(a, lo), P(T, lo), alpha, coef, eps, lam), n)
        pred = max(native.parallel_for(bounds, lambda lo, hi: so.st_xrda_predict(
            hi - lo, P(p, lo), P(a, lo), g_next), n))
    hint.update(gamma1=g_next, amax=pred)
    return T


def _repair(p, z, a, T, amax: float, amax_used: float, *, coef: float, lam: float, max_factor: float,
            gamma1_next: float) -> float:
    """After a fused step with the wrong max(a): swap ε in T, redo w; returns the new prediction."""
    so, P, tiny = native.lib(), native.ptr, torch.finfo(torch.float32).tiny
    eps, eps_used = (max(m / (max_factor - 1), tiny) for m in (amax, amax_used))
    return max(native.parallel_for(native.split(p.numel(), 4 * p.numel()), lambda lo, hi: so.st_xrda_repair(
        hi - lo, P(p, lo), P(z, lo), P(a, lo), P(T, lo), coef, eps_used, eps, lam, gamma1_next), p.numel()))


def _xrda_native_multi(ps, gs, vs, zs, as_, Ts, hints, *, s, alpha, beta, gamma, lam, max_factor, weight_decay,
                       gamma_next) -> None:
    """The one-pass step of several elementwise tensors, all with a valid max(a) prediction, in one
    native call (``st_xrda_fused_multi``; for small networks the per-call overhead dominates)."""
    k, tiny = len(ps), torch.finfo(torch.float32).tiny
    ptrs = (lambda ts: (ctypes.c_void_p * k)(*[t.data_ptr() for t in ts]))
    amax, pred = (ctypes.c_float * k)(), (ctypes.c_float * k)()
    coef, g_next = s * max_factor, 1 - gamma_next
    native.lib().st_xrda_fused_multi(
        k, (ctypes.c_int64 * k)(*[p.numel() for p in ps]), ptrs(ps), ptrs(gs), ptrs(vs), ptrs(zs), ptrs(as_),
        ptrs(Ts), (ctypes.c_float * k)(*[max(h["amax"] / (max_factor - 1), tiny) for h in hints]), 1 - beta,
        (1 - beta) * weight_decay, s, alpha, 1 - gamma, coef, lam, g_next, amax, pred)
    for i, h in enumerate(hints):
        new = pred[i] if amax[i] == h["amax"] else _repair(ps[i], zs[i], as_[i], Ts[i], amax[i], h["amax"],
                                                           coef=coef, lam=lam, max_factor=max_factor,
                                                           gamma1_next=g_next)
        h.update(gamma1=g_next, amax=new)


def xrda(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], zs: list, as_: list, Ts: list,
         *, s: float, alpha: float, beta: float, gamma: float, lam: float, max_factor: float,
         weight_decay: float, reweight: bool, mode: str, penalize: bool, foreach: bool = True,
         hints: list | None = None, gamma_next: float | None = None) -> list:
    """Functional xRDA update for tensors at the same step k, in place on every tensor; returns
    the new thresholds T (float entries -- uniform thresholds -- cannot be updated in place).

    Penalised contiguous float32 CPU tensors take the fused native kernels when they are available
    (:mod:`sparsetrain.native`); the others, the torch ops of :func:`_xrda_torch` (the same
    formulas). ``hints`` (one dict per tensor, kept between steps) and ``gamma_next`` (γ of the
    next step) let the native elementwise step run in one pass (see :func:`_xrda_native`)."""
    kw = dict(s=s, alpha=alpha, beta=beta, gamma=gamma, lam=lam, max_factor=max_factor,
              weight_decay=weight_decay, reweight=reweight)
    # plain ℓ1 after a reweighted phase keeps per-entry thresholds T: only the torch ops handle those
    plain_tensor_T = not reweight and any(torch.is_tensor(T) for T in Ts)
    fused = [_native_ok(*t) for t in zip(params, grads, vs, zs, as_, Ts)] if penalize and not plain_tensor_T else []
    if not any(fused):
        return _xrda_torch(params, grads, vs, zs, as_, Ts, **kw, mode=mode, penalize=penalize, foreach=foreach)
    rest = [i for i, f in enumerate(fused) if not f]
    pick = (lambda xs: [xs[i] for i in rest])
    new_Ts = list(Ts)
    if rest:
        for i, T in zip(rest, _xrda_torch(pick(params), pick(grads), pick(vs), pick(zs), pick(as_), pick(Ts),
                                          **kw, mode=mode, penalize=penalize, foreach=foreach)):
            new_Ts[i] = T
    todo = [i for i, f in enumerate(fused) if f]
    if reweight and hints is not None and gamma_next is not None:  # the common case: one native call
        multi = [i for i in todo if _grouping(params[i].shape, mode)[1] == 1
                 and hints[i].get("gamma1") == 1 - gamma]
        work = 4 * sum(params[i].numel() for i in multi)
        if len(multi) > 1 and len(native.split(work, work)) == 2:   # small enough for one thread
            pick = (lambda xs: [xs[i] for i in multi])
            _xrda_native_multi(pick(params), pick(grads), pick(vs), pick(zs), pick(as_), pick(Ts), pick(hints),
                               s=s, alpha=alpha, beta=beta, gamma=gamma, lam=lam, max_factor=max_factor,
                               weight_decay=weight_decay, gamma_next=gamma_next)
            done = set(multi)
            todo = [i for i in todo if i not in done]
    for i in todo:
        new_Ts[i] = _xrda_native(params[i], grads[i], vs[i], zs[i], as_[i], Ts[i], **kw, mode=mode,
                                 hint=None if hints is None else hints[i], gamma_next=gamma_next)
    return new_Ts


def _xrda_torch(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], zs: list, as_: list, Ts: list,
                *, s: float, alpha: float, beta: float, gamma: float, lam: float, max_factor: float,
                weight_decay: float, reweight: bool, mode: str, penalize: bool, foreach: bool = True) -> list:
    """:func:`xrda` in torch ops (single-tensor or ``foreach``)."""
    # v ← βv + (1−β)(g + wd·w)
    if foreach:
        torch._foreach_lerp_(vs, grads, 1 - beta)
        if weight_decay:
            torch._foreach_add_(vs, params, alpha=(1 - beta) * weight_decay)
    else:
        for v, g, p in zip(vs, grads, params):
            v.lerp_(g, 1 - beta)
            if weight_decay:
                v.add_(p, alpha=(1 - beta) * weight_decay)
    if not penalize:  # w = z always: z ← αz + (1−α)w − s v = w − s v
        if foreach:
            torch._foreach_add_(params, vs, alpha=-s)
        else:
            for p, v in zip(params, vs):
                p.add_(v, alpha=-s)
        return Ts
    # z ← αz + (1−α)w − s v
    if alpha == 0.0:
        for z, p, v in zip(zs, params, vs):
            torch.add(p, v, alpha=-s, out=z)
    elif foreach:
        if alpha != 1.0:
            torch._foreach_lerp_(zs, params, 1 - alpha)
        torch._foreach_add_(zs, vs, alpha=-s)
    else:
        for z, p, v in zip(zs, params, vs):
            if alpha != 1.0:
                z.lerp_(p, 1 - alpha)
            z.add_(v, alpha=-s)
    # T ← αT + s·b, then w ← S_{λT}(z)
    new_Ts = []
    for p, z, a, T in zip(params, zs, as_, Ts):
        if reweight:
            _reweight_(p, a, T, s=s, alpha=alpha, gamma=gamma, max_factor=max_factor, mode=mode)
        else:
            c_group = math.sqrt(_grouping(p.shape, mode)[1])
            T = T.mul_(alpha).add_(s * c_group) if torch.is_tensor(T) else alpha * T + s * c_group
        _threshold_(p, z, T, lam)
        new_Ts.append(T)
    return new_Ts
