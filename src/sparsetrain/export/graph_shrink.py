"""Structural shrink of any torch.fx-traceable model (shrink.py's rules, on a graph).

The model is traced (graph.py) and every Linear / Conv layer P is paired with the layer C its
output reaches: P's output must flow to C along a *chain* — each node's only user is the next
one (a ``x.size(0)`` read of the batch size aside) — of channel-wise steps (BatchNorm, pooling,
activations, dropout, one flatten; as modules, functions such as ``F.relu`` / ``torch.flatten``
or methods such as ``x.view(x.size(0), -1)``). Such a pair is cut exactly as in shrink.py (the
same code: :func:`~sparsetrain.export.shrink._shrink_pair`): dead units of P removed, their
constant outputs folded into C's bias or a BiasMap inserted after C.

A channel concatenation (``torch.cat(..., dim=1)``, before any flatten) may sit on the chain:
P's channels are then a known range of the concatenation, the modules after it (BatchNorm,
BiasMap) and C's input columns are restricted to that range, cut by the same code and joined
back; the other inputs of the concatenation are untouched (inception / dense-net blocks).

Where it is not safe, nothing is cut: a unit whose value reaches a residual addition, the
model's output, more than one consumer (a concatenation used twice included) or any other
operation is kept (cutting it would need the same cut on every branch that meets it). The
inside of residual blocks (e.g. the channels between a block's two convolutions) is shrunk; the
channels of the residual stream are not. Grouped convolutions and layers called more than once
are skipped.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UsageError
from .arch import BiasMap
from .graph import trace
from .shrink import LAYERS, _add_bias, _cut_param, _shrink_pair, default_in_shape


def _as_module(node: fx.Node, gm: fx.GraphModule, source: fx.Node) -> nn.Module | None:
    """The channel-wise module equivalent to ``node`` applied to ``source`` (its first argument),
    or None when ``node`` is something else (or uses ``source`` other than as its input)."""
    args, kw = node.args, node.kwargs
    if not args or args[0] is not source or any(a is source for a in list(args[1:]) + list(kw.values())):
        return None
    rest = [a for a in list(args[1:]) + list(kw.values()) if isinstance(a, fx.Node)]
    if node.op == "call_module":
        return gm.get_submodule(node.target) if not rest and len(args) == 1 else None
    if node.op == "call_function":
        fn = node.target
        if rest:
            return None
        try:
            if fn in (F.relu, torch.relu):
                return nn.ReLU()
            if fn is torch.sigmoid:
                return nn.Sigmoid()
            if fn is torch.tanh:
                return nn.Tanh()
            if fn is F.gelu:
                return nn.GELU(**kw)
            if fn is F.silu:
                return nn.SiLU()
            if fn is F.relu6:
                return nn.ReLU6()
            if fn is F.leaky_relu:
                return nn.LeakyReLU(*args[1:], **kw)
            if fn is F.dropout:
                return nn.Identity()          # eval mode (exports are inference models)
            if fn is torch.flatten and tuple(args[1:]) in ((1,), (1, -1)) and not kw:
                return nn.Flatten()
            if fn is F.adaptive_avg_pool2d:
                return nn.AdaptiveAvgPool2d(*args[1:], **kw)
            if fn is F.adaptive_avg_pool1d:
                return nn.AdaptiveAvgPool1d(*args[1:], **kw)
            if fn is F.max_pool2d and not kw.get("return_indices", False):
                return nn.MaxPool2d(*args[1:], **kw)
            if fn is F.avg_pool2d:
                return nn.AvgPool2d(*args[1:], **kw)
        except TypeError:
            return None
        return None
    if node.op == "call_method":
        if node.target in ("relu",) and len(args) == 1:
            return nn.ReLU()
        if node.target == "flatten" and tuple(args[1:]) in ((1,), (1, -1)) and not kw:
            return nn.Flatten()
        if node.target in ("view", "reshape") and len(args) == 3 and args[2] == -1 and not kw:
            b = args[1]                       # x.view(x.size(0), -1)
            if (isinstance(b, fx.Node) and b.op == "call_method" and b.target == "size"
                    and b.args[:2] == (source, 0)):
                return nn.Flatten()
        if node.target == "contiguous" and len(args) == 1:
            return nn.Identity()
    return None


def _batch_size_read(node: fx.Node, source: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size" and tuple(node.args) == (source, 0)


def _cat_offset(u: fx.Node, cur: fx.Node):
    """(offset, total) channels of ``cur`` in ``u = torch.cat([...], dim=1)``, else None."""
    if u.op != "call_function" or u.target is not torch.cat or not u.args:
        return None
    dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
    parts = u.args[0]
    if dim != 1 or not isinstance(parts, (list, tuple)) or sum(t is cur for t in parts) != 1:
        return None
    if any(a is cur for a in list(u.args[1:]) + list(u.kwargs.values())):
        return None
    shapes = [getattr(t.meta.get("tensor_meta"), "shape", None) if isinstance(t, fx.Node) else None for t in parts]
    out = getattr(u.meta.get("tensor_meta"), "shape", None)
    if out is None or any(sh is None or len(sh) < 2 for sh in shapes):
        return None
    k = next(i for i, t in enumerate(parts) if t is cur)
    return sum(int(sh[1]) for sh in shapes[:k]), int(out[1])


def _chain(gm: fx.GraphModule, p: fx.Node, calls: dict):
    """(modules, nodes, cat) from P's output to the consumer layer C inclusive (plus a BiasMap
    right after C), or None where the value goes anywhere else. ``cat``: None, or (index in
    modules where the path passes a channel concatenation, offset of P's channels, total)."""
    mods, nodes, cur, cat = [], [], p, None
    while True:
        users = [u for u in cur.users if not _batch_size_read(u, cur)]
        size_reads = [u for u in cur.users if _batch_size_read(u, cur)]
        if len(users) != 1:
            return None
        u = users[0]
        # the x.size(0) read must feed only the flatten that follows
        if any(set(s.users) != {u} for s in size_reads):
            return None
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), LAYERS):
            if calls[u.target] != 1 or len(u.args) != 1 or u.kwargs or u.args[0] is not cur:
                return None
            mods.append(gm.get_submodule(u.target))
            nodes.append(u)
            after = list(u.users)
            if (cat is None and len(after) == 1 and after[0].op == "call_module"
                    and type(gm.get_submodule(after[0].target)) is BiasMap):
                mods.append(gm.get_submodule(after[0].target))
                nodes.append(after[0])
            return mods, nodes, cat
        place = _cat_offset(u, cur) if cat is None and not any(type(m) is nn.Flatten for m in mods) else None
        if place is not None:             # P's channels are [offset, offset + units) of the concatenation
            cat = (len(mods),) + place
            cur = u
            continue
        m = _as_module(u, gm, cur)
        if m is None or (u.op == "call_module" and calls[u.target] != 1):
            return None
        mods.append(m)
        nodes.append(u)
        cur = u


def _shapes(mods: list, nodes: list) -> dict:
    """id(module) -> (input shape, output shape) of each module called by the node beside it, as
    ShapeProp recorded them (what :func:`~sparsetrain.export.shrink.record_shapes` gives shrink.py)."""
    shapes = {}
    for m, node in zip(mods, nodes):
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        out = node.meta.get("tensor_meta")
        inp = src.meta.get("tensor_meta") if src is not None else None
        if hasattr(out, "shape") and hasattr(inp, "shape"):
            shapes[id(m)] = (tuple(inp.shape), tuple(out.shape))
    return shapes


def _pass(gm: fx.GraphModule, in_shape, removed: dict) -> bool:
    p0 = next(gm.parameters(), None)
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *in_shape, dtype=p0.dtype if p0 is not None else torch.float32))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"in_shape: {tuple(in_shape)} does not fit the model ({str(e).splitlines()[0][:120]})"
                         ) from None
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    changed = False
    for p in list(gm.graph.nodes):
        if p.op != "call_module" or not isinstance(gm.get_submodule(p.target), LAYERS) or calls[p.target] != 1:
            continue
        found = _chain(gm, p, calls)
        if found is None:
            continue
        mods, nodes, cat = found
        if cat is not None:
            n_removed = _shrink_through_cat(gm, p, mods, nodes, cat)
            if n_removed:
                removed[p.target] = removed.get(p.target, 0) + n_removed
                gm.graph.lint()
                gm.recompile()
                return True                   # the concatenation's offsets changed: shapes again
            continue
        all_mods = [gm.get_submodule(p.target)] + mods
        res = _shrink_pair(all_mods, 0, _shapes(all_mods, [p] + nodes))
        if res is None:
            continue
        new_mods, n_removed = res
        removed[p.target] = removed.get(p.target, 0) + n_removed
        changed = True
        inserted = [m for m in new_mods if not any(m is old for old in all_mods)]
        for bm in inserted:                   # a BiasMap after C: a new node right after C
            _insert_after(gm, nodes[[k for k, m in enumerate(mods) if isinstance(m, LAYERS)][0]], bm)
        if inserted:
            gm.graph.lint()
            gm.recompile()
            return True                       # node list changed: propagate shapes again
    if changed:
        gm.recompile()
    return changed


def _insert_after(gm: fx.GraphModule, c_node: fx.Node, bm: nn.Module) -> None:
    """A new call of ``bm`` (a BiasMap) on ``c_node``'s output, replacing it for its users."""
    name = f"{c_node.target.replace('.', '_')}_biasmap"
    k = 0
    while hasattr(gm, name + (str(k) if k else "")):
        k += 1
    name += str(k) if k else ""
    gm.add_module(name, bm)
    with gm.graph.inserting_after(c_node):
        new = gm.graph.call_module(name, (c_node,))
    c_node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


def _slice_channels(m: nn.Module, lo: int, hi: int) -> nn.Module:
    """A copy of a BatchNorm / BiasMap restricted to channels [lo, hi)."""
    proxy = copy.deepcopy(m)
    if isinstance(m, BiasMap):
        proxy.bias = m.bias[lo:hi].clone()
        return proxy
    for name in ("weight", "bias", "running_mean", "running_var"):
        _cut_param(proxy, name, slice(lo, hi))
    proxy.num_features = hi - lo
    return proxy


def _join_channels(real: nn.Module, proxy: nn.Module, lo: int, hi: int) -> None:
    """Put ``proxy``'s (cut) channels back into ``real`` in place of channels [lo, hi)."""
    if isinstance(real, BiasMap):
        real.bias = torch.cat([real.bias[:lo], proxy.bias, real.bias[hi:]])
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(real, name)
        if t is None:
            continue
        new = torch.cat([t.detach()[:lo], getattr(proxy, name).detach(), t.detach()[hi:]])
        setattr(real, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
    real.num_features = real.weight.shape[0] if real.weight is not None else real.running_mean.shape[0]


def _shrink_through_cat(gm: fx.GraphModule, p: fx.Node, mods: list, nodes: list, cat: tuple) -> int:
    """Cut P's dead units where P's output reaches C through ``torch.cat(dim=1)``: the modules after
    the concatenation and C's input columns are restricted to P's channel range, cut there by
    :func:`_shrink_pair` exactly as for a plain chain, and joined back. Returns #units removed."""
    at, off, total = cat
    pm, c = gm.get_submodule(p.target), mods[-1]
    width = pm.weight.shape[0]
    if isinstance(c, (nn.Conv1d, nn.Conv2d)) and c.groups != 1:
        return 0
    proxies = [(_slice_channels(m, off, off + width) if k >= at and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                                   BiasMap)) else m)
               for k, m in enumerate(mods[:-1])]
    spatial = c.in_features // total if isinstance(c, nn.Linear) else 1
    if isinstance(c, nn.Linear) and c.in_features != total * spatial:
        return 0
    lo, hi = off * spatial, (off + width) * spatial
    pc = copy.deepcopy(c)
    pc.weight = nn.Parameter(c.weight.detach()[:, lo:hi].clone())
    pc.bias = nn.Parameter(torch.zeros(c.weight.shape[0], dtype=c.weight.dtype))
    if isinstance(c, nn.Linear):
        pc.in_features = hi - lo
    else:
        pc.in_channels = width
    shapes = _shapes([pm] + proxies, [p] + nodes[:-1])
    c_in = getattr(nodes[-1].args[0].meta.get("tensor_meta"), "shape", None)
    if c_in is None:
        return 0
    shapes[id(pc)] = ((1, hi - lo) + tuple(c_in[2:]), tuple(nodes[-1].meta["tensor_meta"].shape))
    chain = [pm] + proxies + [pc]
    res = _shrink_pair(chain, 0, shapes)
    if res is None:
        return 0
    new_mods, n_removed = res
    for k, (real, proxy) in enumerate(zip(mods[:-1], proxies)):
        if proxy is not real:
            _join_channels(real, proxy, off, off + width)
    w = c.weight.detach()
    c.weight = nn.Parameter(torch.cat([w[:, :lo], pc.weight.detach(), w[:, hi:]], 1),
                            requires_grad=c.weight.requires_grad)
    if isinstance(c, nn.Linear):
        c.in_features = c.weight.shape[1]
    else:
        c.in_channels = c.weight.shape[1]
    if bool((pc.bias != 0).any()):
        _add_bias(c, pc.bias.detach())
    for bm in [m for m in new_mods if not any(m is old for old in chain)]:
        _insert_after(gm, nodes[-1], bm)
    return n_removed


def shrink_graph(model: nn.Module, in_shape=None, *, max_passes: int = 200) -> tuple[fx.GraphModule, list[dict]]:
    """A smaller ``torch.fx.GraphModule`` computing the same function as ``model`` and one report
    row per Linear / Conv layer (layer, units, kept); see the module docstring."""
    gm = trace(model)
    if in_shape is None:
        in_shape = default_in_shape(gm)
        if in_shape is None:
            return gm, []
    before = {name: m.weight.shape[0] for name, m in gm.named_modules() if isinstance(m, LAYERS)}
    removed: dict[str, int] = {}
    for _ in range(max_passes):
        if not _pass(gm, in_shape, removed):
            break
    gm.delete_all_unused_submodules()
    report = [{"layer": name, "units": before.get(name, m.weight.shape[0]), "kept": m.weight.shape[0]}
              for name, m in gm.named_modules() if isinstance(m, LAYERS)]
    return gm, report
