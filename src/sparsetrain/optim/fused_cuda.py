r"""Fused GPU optimizer steps (Triton): ProxSGD, LinBreg (± momentum), AdaBreg and xRDA (every mode).

Each step is one pass over the memory of a whole param group: a *multi-tensor* kernel reads a
table of the group's tensor addresses (one row per stream: w, g, v, ...) and a block table
(program j works on entries ``start_j … start_j + BLOCK`` of tensor ``t_j``), so a network of many
small tensors costs one launch per step, not one per tensor and op. The formulas are those of the
torch reference paths (``proxsgd.py``, ``linbreg.py``, ``adabreg.py``, ``xrda.py``), in fp32.

When it is used (:func:`applicable`): every tensor of the group is a float32 contiguous tensor on
a CUDA device (or any device when forced, see below), Triton imports, and the group's settings
are ones a kernel implements -- regularizer ``L1`` or none, and every group key either known to
the kernel (with a supported value) or switched off (``None``/``False``/``0``). An option added
to an optimizer later therefore falls back to the torch path by itself until a kernel learns it.

``SPARSETRAIN_FUSED`` (environment): ``auto`` (default: CUDA tensors only), ``force`` (also CPU
tensors -- with ``TRITON_INTERPRET=1`` the kernels then run in Triton's interpreter, which is how
the CPU test suite checks them against the reference), ``off`` (never).

Reweighted elementwise xRDA needs ε_k = max(a_k)/(M−1) before T_k can be updated. One pass uses a
*predicted* max(a_k): the kernel of step k−1 computes max(γ_k a_{k−1} + (1−γ_k)|w_{k−1}|) on the
fly, which is max(a_k) exactly unless w or a changed outside the optimizer (or γ changed). The
kernel of step k also records the true max(a_k); a second, nearly free launch compares the two on
the device and, where they differ, swaps ε in T and recomputes w (T += c·(ε/(a+ε) − ε'/(a+ε'))).
No host synchronisation. The first step always takes the repair.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

from ..regularizers import L1, is_null

try:  # Triton is optional: without it every optimizer keeps its torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = ["available", "applicable", "proxsgd", "linbreg", "adabreg", "xrda", "ENV"]

ENV = "SPARSETRAIN_FUSED"
BLOCK = 2048
_TINY = torch.finfo(torch.float32).tiny


def available() -> bool:
    """Triton imports."""
    return triton is not None


def _mode() -> str:
    return os.environ.get(ENV, "auto").strip().lower()


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and strides (dimensions of size 1 have no meaningful stride)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _tensors_ok(streams) -> bool:
    """float32, dense (contiguous or channels_last), on CUDA unless forced, and every state tensor
    laid out like its parameter (so that one flat index means the same entry in all of them)."""
    forced = _mode() == "force"
    for i, p in enumerate(streams[0]):
        for s in streams:
            t = s[i] if len(s) == len(streams[0]) else None
            if not torch.is_tensor(t):
                continue
            if t.dtype != torch.float32 or not _dense(t) or not (t.is_cuda or forced):
                return False
            if t.numel() == p.numel() and not _same_layout(t, p):
                return False
    return True


def _addresses(streams) -> tuple:
    """data_ptr() of every entry of every stream (−1 for a non-tensor: a float T, a missing z)."""
    out: list = []
    for s in streams:
        try:
            out += list(map(Tensor.data_ptr, s))   # C-level loop: the common all-tensor stream
        except TypeError:
            out += [t.data_ptr() if isinstance(t, Tensor) else -1 for t in s]
    return tuple(out)


def _tensors_ok_cached(streams, cache: dict | None) -> bool:
    """:func:`_tensors_ok`, remembered per set of addresses (every tensor of every stream): a
    training loop passes the same memory step after step, and checking ~6 attributes of every
    tensor each step would cost more host time than the fused step saves."""
    if cache is None:
        return _tensors_ok(streams)
    addrs = _addresses(streams)
    key = (_mode(),) + addrs
    seen = cache.setdefault("checked", {})
    ok = seen.get(key)
    if ok is None:
        if len(seen) > 64:
            seen.clear()
        ok = seen[key] = _tensors_ok(streams)
    cache["addrs"] = (id(streams[0]), addrs)   # reused by the launch that follows on the same lists
    return ok


def applicable(streams, group: dict, known: dict, cache: dict | None = None, applied=()) -> bool:
    """Whether the fused path implements this step: Triton present, not switched off, float32
    dense tensors on CUDA (any device when forced; ``streams``: the lists of parameters, gradients,
    states), the group's regularizer L1 or none, and every other group key either in ``known``
    (a predicate on its value), in ``applied`` (already applied to the gradients the kernel reads,
    e.g. ``maximize`` by :class:`~sparsetrain.optim._base.SparseOptimizer`) or switched off.
    ``cache``: the optimizer's, to check the tensors once per set of addresses."""
    if triton is None or _mode() in ("off", "0", "false"):
        return False
    reg = group.get("reg")
    if not (is_null(reg) or type(reg) is L1):
        return False
    known = {**_COMMON, **known}
    for key, value in group.items():
        if key in ("params", "reg") or key in applied or key.startswith("bregman_state"):
            continue
        if key in known:
            if not known[key](value):
                return False
        elif value not in (None, False, 0):   # an option no kernel knows: the torch path
            return False
    return _tensors_ok_cached(streams, cache)


#: group keys every optimizer has and no kernel needs to know (LR schedulers add ``initial_lr``)
_COMMON = {key: (lambda x: True) for key in ("lr", "initial_lr", "foreach", "name")}


# ------------------------------------------------------------------ tables of addresses and blocks
class _Tables:
    """Device tables of one list of tensors: addresses per stream, block → (tensor, start), sizes.
    Cached per layout (sizes) and per address set, so a steady training loop uploads nothing."""

    def __init__(self):
        self.layouts: dict = {}
        self.ptrs: dict = {}

    def get(self, streams: list[list[Tensor]], addrs: tuple | None = None):
        first = streams[0]
        device = first[0].device
        sizes = tuple(t.numel() for t in first)
        lay = self.layouts.get((device, sizes))
        if lay is None:
            bt, bo = [], []
            for i, n in enumerate(sizes):
                starts = range(0, n, BLOCK)
                bt.extend([i] * len(starts))
                bo.extend(starts)
            lay = (torch.tensor(bt, dtype=torch.int32, device=device),
                   torch.tensor(bo, dtype=torch.int64, device=device),
                   torch.tensor(sizes, dtype=torch.int64, device=device), len(bt))
            self.layouts[(device, sizes)] = lay
        if addrs is None:
            addrs = _addresses(streams)
        entry = self.ptrs.get(addrs)
        if entry is None:
            if len(self.ptrs) > 16:
                self.ptrs.clear()
            aligned = all(a % 16 == 0 for a in addrs) and all(n % 4 == 0 for n in sizes)
            entry = self.ptrs[addrs] = (torch.tensor(addrs, dtype=torch.int64, device=device), aligned)
        return entry[0], lay, entry[1]


def _tables(cache: dict) -> _Tables:
    return cache.setdefault("tables", _Tables())


if triton is not None:
    @triton.jit
    def _locate(blk_t, blk_o, numels, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        """(tensor index, first entry, entries, mask) of this program. ALIGNED: every address is a
        multiple of 16 bytes and every size of 4 entries -- said to the compiler, which then moves
        the streams in 16-byte vectors."""
        j = tl.program_id(0)
        t = tl.load(blk_t + j)
        start = tl.load(blk_o + j)
        n = tl.load(numels + t)
        if ALIGNED:
            start = tl.multiple_of(start, BLOCK)
            n = tl.multiple_of(n, 4)
        offs = start + tl.arange(0, BLOCK)
        return t, start, offs, offs < n

    @triton.jit
    def _addr(ptrs, row, ntens, t, ALIGNED: tl.constexpr):
        p = tl.load(ptrs + row * ntens + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _shrink(x, thr):
        """S_thr(x) = sign(x)·max(|x| − thr, 0)."""
        return tl.where(x > thr, x - thr, tl.where(x < -thr, x + thr, 0.0))

    @triton.jit
    def _lerp(x, y, w):
        """torch.lerp's formula (the same rounding as the reference)."""
        return tl.where(w < 0.5, x + w * (y - x), y - (y - x) * (1.0 - w))

    @triton.jit
    def _proxsgd_kernel(ptrs, ntens, blk_t, blk_o, numels, step, wd, w_mom, thr,
                        HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, HAS_PROX: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp = _addr(ptrs, 0, ntens, t, ALIGNED)
        gp = _addr(ptrs, 1, ntens, t, ALIGNED)
        p = tl.load(pp + offs, mask=mask)
        d = tl.load(gp + offs, mask=mask)
        if HAS_WD:
            d = d + wd * p
        if HAS_MOM:
            bp = _addr(ptrs, 2, ntens, t, ALIGNED)
            d = _lerp(tl.load(bp + offs, mask=mask), d, w_mom)
            tl.store(bp + offs, d, mask=mask)
        p = p - step * d
        if HAS_PROX:
            p = _shrink(p, thr)
        tl.store(pp + offs, p, mask=mask)

    @triton.jit
    def _bregman_prox(v, lam, delta, HAS_PROX: tl.constexpr):
        """w = δ·prox_J(v): δ·S_λ(v) for L1, δ·v without a penalty."""
        if HAS_PROX:
            v = _shrink(v, lam)
        return v * delta

    @triton.jit
    def _linbreg_kernel(ptrs, ntens, blk_t, blk_o, numels, lr, w_mom, rescale, lam, delta,
                        MOM: tl.constexpr, HAS_PROX: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # MOM: 0 none, 1 buf ← lerp(buf, g, 1−β) (scale unchanged), 2 buf ← buf·βc/lr + (1−β)g
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp = _addr(ptrs, 0, ntens, t, ALIGNED)
        g = tl.load(_addr(ptrs, 1, ntens, t, ALIGNED) + offs, mask=mask)
        vp = _addr(ptrs, 2, ntens, t, ALIGNED)
        v = tl.load(vp + offs, mask=mask)
        if MOM == 0:
            v = v - lr * g
        else:
            bp = _addr(ptrs, 3, ntens, t, ALIGNED)
            b = tl.load(bp + offs, mask=mask)
            if MOM == 1:
                b = _lerp(b, g, w_mom)
            else:
                b = b * rescale + w_mom * g
            tl.store(bp + offs, b, mask=mask)
            v = v - lr * b
        tl.store(vp + offs, v, mask=mask)
        tl.store(pp + offs, _bregman_prox(v, lam, delta, HAS_PROX), mask=mask)

    @triton.jit
    def _adabreg_kernel(ptrs, ntens, blk_t, blk_o, numels, w1, beta2, w2, step_size, bias2_sqrt, eps,
                        lam, delta, HAS_PROX: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp = _addr(ptrs, 0, ntens, t, ALIGNED)
        g = tl.load(_addr(ptrs, 1, ntens, t, ALIGNED) + offs, mask=mask)
        vp = _addr(ptrs, 2, ntens, t, ALIGNED)
        mp = _addr(ptrs, 3, ntens, t, ALIGNED)
        up = _addr(ptrs, 4, ntens, t, ALIGNED)
        m = _lerp(tl.load(mp + offs, mask=mask), g, w1)
        u = tl.load(up + offs, mask=mask) * beta2 + w2 * g * g
        v = tl.load(vp + offs, mask=mask) + step_size * m / (tl.sqrt(u) / bias2_sqrt + eps)
        tl.store(mp + offs, m, mask=mask)
        tl.store(up + offs, u, mask=mask)
        tl.store(vp + offs, v, mask=mask)
        tl.store(pp + offs, _bregman_prox(v, lam, delta, HAS_PROX), mask=mask)

    @triton.jit
    def _xrda_vz(p, g, v, z, w_beta, wd_term, s, alpha, HAS_WD: tl.constexpr, ALPHA: tl.constexpr):
        """v ← lerp(v, g, 1−β) + (1−β)·wd·w;  z ← αz + (1−α)w − s v (ALPHA: 0 α=0, 1 α=1, 2 other)."""
        v = _lerp(v, g, w_beta)
        if HAS_WD:
            v = v + wd_term * p
        if ALPHA == 0:
            z = p - s * v
        elif ALPHA == 1:
            z = z - s * v
        else:
            z = _lerp(z, p, 1.0 - alpha) - s * v
        return v, z

    @triton.jit
    def _xrda_vz_step(ptrs, ntens, t, offs, mask, w_beta, wd_term, s, alpha,
                      HAS_WD: tl.constexpr, ALPHA: tl.constexpr, ALIGNED: tl.constexpr):
        """The v, z update (:func:`_xrda_vz`) of this program's entries of a table with rows
        w, g, v, z: loads them, stores v and z; returns (address of w, w, z)."""
        pp = _addr(ptrs, 0, ntens, t, ALIGNED)
        vp = _addr(ptrs, 2, ntens, t, ALIGNED)
        zp = _addr(ptrs, 3, ntens, t, ALIGNED)
        p = tl.load(pp + offs, mask=mask)
        v, z = _xrda_vz(p, tl.load(_addr(ptrs, 1, ntens, t, ALIGNED) + offs, mask=mask), tl.load(vp + offs, mask=mask),
                        tl.load(zp + offs, mask=mask), w_beta, wd_term, s, alpha, HAS_WD, ALPHA)
        tl.store(vp + offs, v, mask=mask)
        tl.store(zp + offs, z, mask=mask)
        return pp, p, z

    @triton.jit
    def _xrda_free_kernel(ptrs, ntens, blk_t, blk_o, numels, w_beta, wd_term, s,
                          HAS_WD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """Unpenalised tensors: v update, then w ← w − s v."""
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp = _addr(ptrs, 0, ntens, t, ALIGNED)
        vp = _addr(ptrs, 2, ntens, t, ALIGNED)
        p = tl.load(pp + offs, mask=mask)
        v = _lerp(tl.load(vp + offs, mask=mask), tl.load(_addr(ptrs, 1, ntens, t, ALIGNED) + offs, mask=mask), w_beta)
        if HAS_WD:
            v = v + wd_term * p
        tl.store(vp + offs, v, mask=mask)
        tl.store(pp + offs, p - s * v, mask=mask)

    @triton.jit
    def _xrda_plain_kernel(ptrs, ntens, blk_t, blk_o, numels, w_beta, wd_term, s, alpha, thr,
                           HAS_WD: tl.constexpr, ALPHA: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """A uniform threshold thr = λT: v, z, w = S_thr(z) in one pass."""
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp, p, z = _xrda_vz_step(ptrs, ntens, t, offs, mask, w_beta, wd_term, s, alpha, HAS_WD, ALPHA, ALIGNED)
        tl.store(pp + offs, _shrink(z, thr), mask=mask)

    @triton.jit
    def _eps(amax, m1, tiny):
        return tl.maximum(amax / m1, tiny)

    @triton.jit
    def _predicted(slot, ntens, t):
        """The max(a_k) predicted for this step: by the previous step's repair where it ran, else by
        its main kernel (rows of a ring slot: 0 prediction, 1 true max, 2 repaired prediction,
        3 repair flag)."""
        repaired = tl.load(slot + 3 * ntens + t)
        return tl.where(repaired != 0.0, tl.load(slot + 2 * ntens + t), tl.load(slot + t))

    @triton.jit
    def _xrda_reweight_kernel(ptrs, ntens, blk_t, blk_o, numels, cur, nxt,
                              w_beta, wd_term, s, alpha, w_gamma, w_gamma_next, coef, lam, m1, tiny,
                              HAS_WD: tl.constexpr, ALPHA: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """Elementwise reweighted xRDA in one pass with the predicted max(a_k); records the true
        max(a_k) (``cur`` row 1) and the prediction for the next step (``nxt`` row 0)."""
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        pp, p, z = _xrda_vz_step(ptrs, ntens, t, offs, mask, w_beta, wd_term, s, alpha, HAS_WD, ALPHA, ALIGNED)
        ap = _addr(ptrs, 4, ntens, t, ALIGNED)
        Tp = _addr(ptrs, 5, ntens, t, ALIGNED)
        a = _lerp(tl.load(ap + offs, mask=mask), tl.abs(p), w_gamma)
        tl.atomic_max(cur + ntens + t, tl.max(tl.where(mask, a, 0.0), axis=0))
        eps = _eps(_predicted(cur, ntens, t), m1, tiny)
        T = tl.load(Tp + offs, mask=mask)
        if ALPHA != 1:
            T = T * alpha
        T = T + coef * (eps / (a + eps))
        w = tl.maximum(tl.abs(z) - lam * T, 0.0)
        w = tl.where(z < 0, -w, w)
        tl.store(ap + offs, a, mask=mask)
        tl.store(Tp + offs, T, mask=mask)
        tl.store(pp + offs, w, mask=mask)
        nx = _lerp(a, tl.abs(w), w_gamma_next)
        tl.atomic_max(nxt + t, tl.max(tl.where(mask, nx, 0.0), axis=0))

    @triton.jit
    def _xrda_repair_kernel(ptrs, ntens, blk_t, blk_o, numels, cur, nxt, stale, w_gamma_next, coef, lam, m1, tiny,
                            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """Where the prediction missed (true max(a_k) ≠ the one used): swap ε in T, redo w, and
        predict the next step's max(a) from the repaired w (``nxt`` rows 2, 3). Also clears
        ``stale``, the ring slot the next step writes its prediction into."""
        t, start, offs, mask = _locate(blk_t, blk_o, numels, BLOCK, ALIGNED)
        if start == 0:
            for row in tl.static_range(4):
                tl.store(stale + row * ntens + t, 0.0)
        used = _predicted(cur, ntens, t)
        true = tl.load(cur + ntens + t)
        if used != true:
            pp = _addr(ptrs, 0, ntens, t, ALIGNED)
            zp = _addr(ptrs, 3, ntens, t, ALIGNED)
            ap = _addr(ptrs, 4, ntens, t, ALIGNED)
            Tp = _addr(ptrs, 5, ntens, t, ALIGNED)
            a = tl.load(ap + offs, mask=mask)
            e_used = _eps(used, m1, tiny)
            e_true = _eps(true, m1, tiny)
            T = tl.load(Tp + offs, mask=mask) + coef * (e_true / (a + e_true) - e_used / (a + e_used))
            z = tl.load(zp + offs, mask=mask)
            w = tl.maximum(tl.abs(z) - lam * T, 0.0)
            tl.store(Tp + offs, T, mask=mask)
            tl.store(pp + offs, tl.where(z < 0, -w, w), mask=mask)
            nx = _lerp(a, w, w_gamma_next)
            tl.atomic_max(nxt + 2 * ntens + t, tl.max(tl.where(mask, nx, 0.0), axis=0))
            tl.store(nxt + 3 * ntens + t, 1.0)

    @triton.jit
    def _xrda_group_pass1(p_ptr, g_ptr, v_ptr, z_ptr, a_ptr, amax, rows, n, w_beta, wd_term, s, alpha, w_gamma,
                          HAS_WD: tl.constexpr, ALPHA: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Grouped modes, pass 1: v, z per entry; a ← lerp(a, mean_group |w|, 1−γ); max(a)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, COLS)
        rmask = r < rows
        mask = rmask[:, None] & (c[None, :] < n)
        offs = r[:, None] * n + c[None, :]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        v, z = _xrda_vz(p, tl.load(g_ptr + offs, mask=mask), tl.load(v_ptr + offs, mask=mask),
                        tl.load(z_ptr + offs, mask=mask), w_beta, wd_term, s, alpha, HAS_WD, ALPHA)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(z_ptr + offs, z, mask=mask)
        m = tl.sum(tl.abs(p), axis=1) / n
        a = _lerp(tl.load(a_ptr + r, mask=rmask), m, w_gamma)
        tl.store(a_ptr + r, a, mask=rmask)
        tl.atomic_max(amax, tl.max(tl.where(rmask, a, 0.0), axis=0))

    @triton.jit
    def _xrda_group_pass2(p_ptr, z_ptr, a_ptr, T_ptr, amax, rows, n, alpha, coef, lam, m1, tiny,
                          ALPHA: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Grouped modes, pass 2: T ← αT + c·ε/(a+ε) per group; w = S_{λT}(z)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, COLS)
        rmask = r < rows
        mask = rmask[:, None] & (c[None, :] < n)
        offs = r[:, None] * n + c[None, :]
        eps = _eps(tl.load(amax), m1, tiny)
        a = tl.load(a_ptr + r, mask=rmask)
        T = tl.load(T_ptr + r, mask=rmask)
        if ALPHA != 1:
            T = T * alpha
        T = T + coef * (eps / (a + eps))
        tl.store(T_ptr + r, T, mask=rmask)
        z = tl.load(z_ptr + offs, mask=mask)
        w = tl.maximum(tl.abs(z) - lam * T[:, None], 0.0)
        tl.store(p_ptr + offs, tl.where(z < 0, -w, w), mask=mask)


#: whether the alignment hints compile here (a Triton that refuses them: off, with a warning)
_HINTS = {"ok": os.environ.get("SPARSETRAIN_FUSED_HINTS", "1") != "0"}


def _launch(kernel, cache: dict, streams: list[list[Tensor]], *args, **meta):
    owner, addrs = cache.pop("addrs", (None, None))     # the addresses applicable() just read, if these
    if owner != id(streams[0]) or len(addrs) != sum(len(s) for s in streams) or -1 in addrs:
        addrs = None
    table, (bt, bo, sizes, nblocks), aligned = _tables(cache).get(streams, addrs)
    args = (table, len(streams[0]), bt, bo, sizes, *args)
    if aligned and _HINTS["ok"]:
        try:
            kernel[(nblocks,)](*args, ALIGNED=True, BLOCK=BLOCK, **meta)
            return
        except Exception as e:   # a compile error: nothing ran; the kernels without the hints
            _HINTS["ok"] = False
            warnings.warn(f"sparsetrain: fused steps without alignment hints ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})")
    kernel[(nblocks,)](*args, ALIGNED=False, BLOCK=BLOCK, **meta)


def _prox_settings(reg, delta_or_t: float = 1.0) -> tuple[bool, float]:
    """(has prox, L1 threshold) of a regularizer that :func:`applicable` accepted."""
    return (not is_null(reg)), (0.0 if is_null(reg) else float(reg.lam) * delta_or_t)


# ------------------------------------------------------------------ the optimizers' fused steps
PROXSGD_KNOWN = {"momentum": lambda x: True, "weight_decay": lambda x: True}


def proxsgd(params, grads, bufs, *, reg, lr: float, momentum: float, weight_decay: float, cache: dict) -> None:
    """:func:`sparsetrain.optim.proxsgd.proxsgd` in one launch."""
    has_prox, thr = _prox_settings(reg, lr)
    step = lr / (1 - momentum) if momentum > 0 else lr
    streams = [params, grads] + ([bufs] if momentum > 0 else [])
    _launch(_proxsgd_kernel, cache, streams, step, float(weight_decay), 1.0 - momentum, thr,
            HAS_WD=bool(weight_decay), HAS_MOM=momentum > 0, HAS_PROX=has_prox)


#: ``weight_decay`` is applied before the launch by both Bregman optimizers (LinBreg: added to the
#: gradients it passes, AdaBreg: decoupled, to v), so the kernels take it as it comes
BREGMAN_KNOWN = {"lr": lambda x: float(x) > 0, "delta": lambda x: True, "momentum": lambda x: True,
                 "betas": lambda x: True, "eps": lambda x: True, "inactive": lambda x: True,
                 "weight_decay": lambda x: True}


def linbreg(params, grads, vs, bufs, scales, *, reg, lr: float, delta: float, momentum: float,
            cache: dict) -> list[float] | None:
    """:func:`sparsetrain.optim.linbreg.linbreg` in one launch; returns the new momentum scales,
    or None (nothing done) when the tensors' momentum scales differ (the torch path handles it)."""
    has_prox, lam = _prox_settings(reg)
    if momentum == 0:
        _launch(_linbreg_kernel, cache, [params, grads, vs], lr, 0.0, 0.0, lam, float(delta),
                MOM=0, HAS_PROX=has_prox)
        return scales
    if len(set(scales)) != 1:
        return None
    c = scales[0]
    mom, rescale = (1, 0.0) if c == lr else (2, momentum * c / lr)
    _launch(_linbreg_kernel, cache, [params, grads, vs, bufs], lr, 1.0 - momentum, rescale, lam, float(delta),
            MOM=mom, HAS_PROX=has_prox)
    return [lr] * len(params)


def adabreg(params, grads, vs, exp_avgs, exp_avg_sqs, steps, *, reg, lr: float, delta: float,
            beta1: float, beta2: float, eps: float, cache: dict) -> bool:
    """:func:`sparsetrain.optim.adabreg.adabreg` in one launch; False (nothing done) when the
    tensors are at different steps."""
    if len(set(steps)) != 1:
        return False
    k = steps[0]
    has_prox, lam = _prox_settings(reg)
    _launch(_adabreg_kernel, cache, [params, grads, vs, exp_avgs, exp_avg_sqs], 1.0 - beta1, beta2, 1.0 - beta2,
            -lr / (1 - beta1 ** k), (1 - beta2 ** k) ** 0.5, eps, lam, float(delta), HAS_PROX=has_prox)
    return True


XRDA_KNOWN = {key: (lambda x: True) for key in (
    "lr", "lam", "tau", "tau_b", "max_factor", "reweight", "schedule", "total_steps", "milestones",
    "alpha", "mode", "weight_decay", "penalize")}


def xrda_applicable(streams, group: dict, cache: dict | None = None, applied=()) -> bool:
    """:func:`applicable` for xRDA; kernel mode also needs 4-D weights in the default layout, where
    each kernel w[o, i] is a run of consecutive entries (an output channel w[o] is one in
    channels_last too)."""
    if not applicable(streams, group, XRDA_KNOWN, cache, applied):
        return False
    return group["mode"] != "kernel" or all(p.dim() < 3 or p.is_contiguous() for p in streams[0])


def _alpha_mode(alpha: float) -> int:
    return 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2


def xrda(params, grads, vs, zs, as_, Ts, *, s: float, alpha: float, beta: float, gamma: float, lam: float,
         max_factor: float, weight_decay: float, reweight: bool, mode: str, penalize: bool,
         gamma_next: float, cache: dict) -> list | None:
    """:func:`sparsetrain.optim.xrda.xrda` on the GPU; returns the new thresholds T (None: nothing
    done, because a plain-ℓ1 step met per-entry thresholds left by an earlier reweighted phase).

    Elementwise tensors share one launch (plus the repair launch when reweighted); tensors in a
    grouped mode (kernel/channel, 4-D) take two launches each (group mean, then threshold)."""
    from .xrda import _grouping
    s, alpha, lam = float(s), float(alpha), float(lam)   # kernel scalars are fp32, never ints
    common = dict(HAS_WD=bool(weight_decay))
    w_beta, wd_term = 1.0 - beta, (1.0 - beta) * weight_decay
    if not penalize:
        _launch(_xrda_free_kernel, cache, [params, grads, vs], w_beta, wd_term, s, **common)
        return list(Ts)
    am = _alpha_mode(alpha)
    new_Ts = list(Ts)
    if not reweight:  # uniform thresholds: one launch per distinct λT
        if any(isinstance(T, Tensor) for T in Ts):
            return None
        by_thr: dict[float, list[int]] = {}
        for i, (p, T) in enumerate(zip(params, Ts)):
            new_Ts[i] = alpha * T + s * math.sqrt(_grouping(p.shape, mode)[1])
            by_thr.setdefault(lam * new_Ts[i], []).append(i)
        for thr, idx in by_thr.items():
            pick = (lambda xs: [xs[i] for i in idx])
            _launch(_xrda_plain_kernel, cache,
                    [pick(params), pick(grads), pick(vs), pick(zs)], w_beta, wd_term, s, alpha, thr,
                    ALPHA=am, **common)
        return new_Ts
    m1 = max_factor - 1.0
    flat = [i for i, p in enumerate(params) if _grouping(p.shape, mode)[1] == 1]
    if flat:
        pick = (lambda xs: [xs[i] for i in flat])
        streams = [pick(params), pick(grads), pick(vs), pick(zs), pick(as_), pick(Ts)]
        sub = cache.setdefault(("reweight",) + tuple(id(params[i]) for i in flat), {})
        ring = sub.get("ring")
        if ring is None or ring.device != params[0].device:
            ring = sub["ring"] = torch.zeros(3, 4, len(flat), dtype=torch.float32, device=params[0].device)
            sub["k"] = 0
        k = sub["k"]
        cur, nxt, stale = ring[k % 3], ring[(k + 1) % 3], ring[(k + 2) % 3]
        _launch(_xrda_reweight_kernel, sub, streams, cur, nxt, w_beta, wd_term, s, alpha,
                1.0 - gamma, 1.0 - gamma_next, s * max_factor, lam, m1, _TINY, ALPHA=am, **common)
        _launch(_xrda_repair_kernel, sub, streams, cur, nxt, stale, 1.0 - gamma_next, s * max_factor, lam, m1,
                _TINY)
        sub["k"] = k + 1
    grouped = [i for i, p in enumerate(params) if _grouping(p.shape, mode)[1] > 1]
    amaxes = torch.zeros(len(grouped), dtype=torch.float32, device=params[0].device) if grouped else None
    for j, i in enumerate(grouped):
        p = params[i]
        n = _grouping(p.shape, mode)[1]
        rows = p.numel() // n
        cols = triton.next_power_of_2(n)
        nrows = max(1, min(64, BLOCK // cols))
        grid = (triton.cdiv(rows, nrows),)
        amax = amaxes[j:j + 1]
        _xrda_group_pass1[grid](p, grads[i], vs[i], zs[i], as_[i], amax, rows, n, w_beta, wd_term, s, alpha,
                                1.0 - gamma, ALPHA=am, ROWS=nrows, COLS=cols, **common)
        _xrda_group_pass2[grid](p, zs[i], as_[i], Ts[i], amax, rows, n, alpha, s * math.sqrt(n) * max_factor,
                                lam, m1, _TINY, ALPHA=am, ROWS=nrows, COLS=cols)
    return new_Ts
