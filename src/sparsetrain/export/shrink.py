"""Structural shrink: make row / filter sparsity physical, outputs unchanged.

For every Linear / Conv layer P (the *producer*) of a Sequential whose output reaches the next
Linear / Conv layer C (the *consumer*) only through channel-wise modules (BatchNorm, activations,
dropout, pooling, one ``Flatten``), an output unit u of P (a neuron, or a filter = channel) is
removed when

* its incoming weights ``P.weight[u]`` are all zero: the unit then outputs a constant (its bias,
  or BatchNorm's shift, through the activation: e.g. ``relu(b_u)``) which still reaches C. That
  constant's exact contribution is computed (in float64, by running the modules between P and C
  on it) and folded into C's bias — or, when C is a zero-padded convolution, where a constant
  channel's contribution differs at the borders, into a :class:`~sparsetrain.export.arch.BiasMap`
  (a fixed C_out × H × W bias) inserted after C; or
* its outgoing weights (C's input columns / kernels for u, all positions after a Flatten) are all
  zero: its value is never used.

P's rows, the BatchNorm entries and C's columns are cut to match; passes repeat until nothing
changes (removing columns can empty a later row). The network's last layer and its input are
never cut. Residual blocks: only the inside of a block's body is shrunk (e.g. the channels between
a BasicBlock's conv1 and conv2); channels that meet the residual add (conv2, the shortcut, the
stem) are kept, since cutting them would need the same cut on every branch. Grouped and depth-wise
convolutions are not shrunk. A BiasMap ties the model to the input size it was shrunk for.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn

from ..errors import UsageError
from .arch import BiasMap, Residual, canonical

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout,
                nn.Identity)
_CHANNELWISE = _ELEMENTWISE + (nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                               nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                               BiasMap)


def record_shapes(model: nn.Module, in_shape) -> dict[int, tuple[tuple, tuple]]:
    """id(module) -> (input shape, output shape) of every module for one input of ``in_shape``."""
    shapes: dict[int, tuple[tuple, tuple]] = {}

    def hook(mod, inp, out) -> None:
        if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
            shapes.setdefault(id(mod), (tuple(inp[0].shape), tuple(out.shape)))

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    p = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape, dtype=p.dtype if p is not None else torch.float32))
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"in_shape: {tuple(in_shape)} does not fit the model "
                         f"({str(e).splitlines()[0][:120]})") from None
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _units_mask(keep: torch.Tensor, repeat: int) -> torch.Tensor:
    return keep.repeat_interleave(repeat) if repeat > 1 else keep


def _cut_param(module: nn.Module, name: str, index) -> None:
    t = getattr(module, name)
    if t is None:
        return
    new = t.detach()[index].clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def _add_bias(layer: nn.Module, comp: torch.Tensor) -> None:
    comp = comp.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(comp.clone())
    else:
        layer.bias = nn.Parameter(layer.bias.detach() + comp)


def _shrink_pair(mods: list[nn.Module], i: int, shapes: dict) -> tuple[list[nn.Module], int] | None:
    """Cut the removable units of producer ``mods[i]``; returns (new module list, #units removed)."""
    p = mods[i]
    if isinstance(p, (nn.Conv1d, nn.Conv2d)) and p.groups != 1:
        return None
    if id(p) not in shapes:
        return None
    out_shape = shapes[id(p)][1]
    is_conv = not isinstance(p, nn.Linear)
    if not is_conv and len(out_shape) != 2:
        return None
    units = p.weight.shape[0]
    chain: list[nn.Module] = []
    flat_at, spatial = None, 1
    j = i + 1
    while j < len(mods) and not isinstance(mods[j], LAYERS):
        m = mods[j]
        if type(m) is nn.Flatten:
            if flat_at is not None or m.start_dim != 1 or m.end_dim != -1 or id(m) not in shapes:
                return None
            if is_conv:
                flat_at, spatial = len(chain), math.prod(shapes[id(m)][0][2:])
        elif not isinstance(m, _CHANNELWISE if is_conv and flat_at is None else _ELEMENTWISE + (nn.BatchNorm1d,)):
            return None
        chain.append(m)
        j += 1
    if j == len(mods):
        return None                       # the output of this Sequential (or of a residual branch)
    c = mods[j]
    if isinstance(c, nn.Linear):
        if is_conv and flat_at is None:
            return None
        if c.in_features != units * spatial or id(c) not in shapes or len(shapes[id(c)][0]) != 2:
            return None
        w_out = c.weight.detach().reshape(c.out_features, units, spatial)
        dead_out = (w_out == 0).all(2).all(0)
    else:
        if not is_conv or flat_at is not None or type(c) is not type(p) or c.groups != 1 or c.in_channels != units:
            return None
        dead_out = (c.weight.detach().transpose(0, 1).reshape(units, -1) == 0).all(1)
    dead_in = (p.weight.detach().reshape(units, -1) == 0).all(1)
    remove = dead_in | dead_out
    if bool(remove.all()):
        remove[0] = False                 # keep one unit: zero-width layers are not worth the trouble
    if not bool(remove.any()):
        return None
    keep = ~remove
    new_mods = list(mods)

    const = dead_in & ~dead_out & remove
    if bool(const.any()):
        # the removed constant units' exact contribution to C, computed in float64
        bias = p.bias.detach().double() if p.bias is not None else torch.zeros(units, dtype=torch.float64)
        y = torch.zeros((1,) + tuple(out_shape[1:]), dtype=torch.float64)
        view = (1, units) + (1,) * (len(out_shape) - 2)
        y = torch.where(const.view(view), bias.view(view), y)
        with torch.no_grad():
            z = y
            for m in chain:
                z = copy.deepcopy(m).double().eval()(z)
            zmask = const.view(view) if flat_at is None else _units_mask(const, spatial).view(1, -1)
            z = torch.where(zmask, z, torch.zeros((), dtype=z.dtype))
            w = c.weight.detach().double()
            if isinstance(c, nn.Linear):
                _add_bias(c, (z.reshape(1, -1) @ w.t())[0])
            else:
                comp = c._conv_forward(z, w, None)[0]
                flatc = comp.reshape(comp.shape[0], -1)
                spread = (flatc.amax(1) - flatc.amin(1)).abs().max()
                if float(spread) <= 1e-12 * max(1.0, float(flatc.abs().max())):
                    _add_bias(c, flatc[:, 0])
                elif j + 1 < len(new_mods) and type(new_mods[j + 1]) is BiasMap:
                    bm = new_mods[j + 1]
                    bm.bias = bm.bias + comp.to(bm.bias.dtype)
                else:
                    bm = BiasMap(comp.shape)
                    bm.bias = comp.to(c.weight.dtype).clone()
                    new_mods.insert(j + 1, bm)

    # cut P's rows, the channel-wise modules between, C's columns
    _cut_param(p, "weight", keep)
    _cut_param(p, "bias", keep)
    n_keep = int(keep.sum())
    if is_conv:
        p.out_channels = n_keep
    else:
        p.out_features = n_keep
    for k, m in enumerate(chain):
        idx = keep if flat_at is None or k < flat_at else _units_mask(keep, spatial)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _cut_param(m, name, idx)
            m.num_features = int(idx.sum())
        elif isinstance(m, BiasMap):
            m.bias = m.bias[idx].clone()
    if isinstance(c, nn.Linear):
        w = c.weight.detach().reshape(c.out_features, units, spatial)[:, keep].reshape(c.out_features, -1)
        c.weight = nn.Parameter(w.clone(), requires_grad=c.weight.requires_grad)
        c.in_features = w.shape[1]
    else:
        c.weight = nn.Parameter(c.weight.detach()[:, keep].clone(), requires_grad=c.weight.requires_grad)
        c.in_channels = n_keep
    return new_mods, int(remove.sum())


def _pass(seq: nn.Sequential, shapes: dict, removed: dict[int, int]) -> bool:
    changed = False
    for m in seq:
        if isinstance(m, Residual):
            changed |= _pass(m.body, shapes, removed)
            changed |= _pass(m.shortcut, shapes, removed)
    mods = list(seq)
    i = 0
    while i < len(mods):                  # len(mods) grows when a BiasMap is inserted
        if isinstance(mods[i], LAYERS):
            res = _shrink_pair(mods, i, shapes)
            if res is not None:
                mods, n = res
                removed[id(mods[i])] = removed.get(id(mods[i]), 0) + n
                changed = True
        i += 1
    if changed:
        seq._modules = OrderedDict((str(k), m) for k, m in enumerate(mods))
    return changed


def needs_in_shape(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())


def default_in_shape(model: nn.Module) -> tuple | None:
    """The input shape of a model shrunk without ``in_shape``: its first Linear's input width
    (None: no Linear layer, nothing to shrink); a model with conv layers needs ``in_shape``."""
    if needs_in_shape(model):
        raise UsageError("in_shape: required to shrink a model with conv layers (e.g. [1, 28, 28])")
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    return (first.in_features,) if first is not None else None


def shrink(model: nn.Module, in_shape=None, *, max_passes: int = 20) -> tuple[nn.Sequential, list[dict]]:
    """A smaller dense ``nn.Sequential`` computing the same function as ``model`` (see the module
    docstring) and one report row per Linear/Conv layer: name, units before / after.

    ``in_shape`` (C, H, W) is needed for models with conv layers; for MLPs it may be left out.
    Models that :func:`~sparsetrain.export.arch.canonical` cannot describe are traced with
    torch.fx instead (graph_shrink.py) and come back as a ``torch.fx.GraphModule``.
    """
    try:
        seq = canonical(model).eval()
    except UsageError:
        from .graph_shrink import shrink_graph
        return shrink_graph(model, in_shape)
    if in_shape is None:
        in_shape = default_in_shape(seq)
        if in_shape is None:
            return seq, []
    before = {id(m): m.weight.shape[0] for m in seq.modules() if isinstance(m, LAYERS)}
    removed: dict[int, int] = {}
    for _ in range(max_passes):
        if not _pass(seq, record_shapes(seq, in_shape), removed):
            break
    report = [{"layer": name, "units": before[id(m)], "kept": m.weight.shape[0]}
              for name, m in seq.named_modules() if isinstance(m, LAYERS)]
    return seq, report
