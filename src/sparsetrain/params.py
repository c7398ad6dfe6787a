"""Which tensors are penalised, and param groups that carry a regularizer.

SPEC §1: the regularized tensors are the weights of Linear and Conv layers; biases and
normalisation parameters are never penalised unless a user asks for it. Every module of the
library (metrics, optimizers' groups, HALO, pruning, export) uses this one definition.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

from torch import nn

from .errors import UsageError

SPARSE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, "module", model) if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every Linear / Conv layer, in definition order."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, SPARSE_MODULES):
            yield name, module


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(``layer.weight`` name, weight) of every Linear / Conv layer: the tensors that sparsity,
    density and compression are measured over."""
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in sparse_layers(model)]


def _is_weight(module: nn.Module, p_name: str) -> bool:
    """``weight``, or ``weight_orig`` of a layer pruned with ``torch.nn.utils.prune`` (whose
    weight is ``weight_orig * weight_mask``: regularizing ``weight_orig`` regularizes it in full)."""
    if p_name == "weight":
        return True
    from torch.nn.utils import prune
    return any(isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight"
               for h in module._forward_pre_hooks.values())


def _refuse_parametrized(name: str, module: nn.Module) -> None:
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        raise UsageError(f"model: layer {name or type(module).__name__!r} has its weight computed by "
                         f"torch.nn.utils.parametrize ({kinds}); a regularizer on the stored tensor would not "
                         f"act on that weight; allowed: plain weights or torch.nn.utils.prune masks "
                         f"(call parametrize.remove_parametrizations(layer, 'weight') first)")


RegSpec = "Regularizer | None | Callable[[str, nn.Module, nn.Parameter], Regularizer | None]"


def param_groups(model: nn.Module, reg=None, *, include: str | None = None,
                 exclude: str | None = None, modules: tuple = SPARSE_MODULES,
                 other_reg=None, **group_options) -> list[dict]:
    """Split ``model``'s parameters into a regularized group and an unregularized group.

    A weight is regularized when its module is an instance of ``modules`` (Linear and Conv by
    default), its qualified name matches ``include`` (a regex, if given) and does not match
    ``exclude``. ``reg`` is a regularizer or a function ``(name, module, param) -> regularizer``
    that may return different regularizers per layer (one param group is made per distinct
    regularizer object). Everything else (biases, norms, excluded layers) goes to a group with
    ``other_reg`` (None by default). ``group_options`` (lr, delta, ...) are copied into every group.

    Layers pruned with ``torch.nn.utils.prune`` have ``weight_orig`` regularized (their weight is
    ``weight_orig × weight_mask``); a layer whose weight is computed by
    ``torch.nn.utils.parametrize`` is refused with a UsageError, never left silently unregularized.
    """
    for arg, pattern in (("include", include), ("exclude", exclude)):
        try:
            re.compile(pattern or "")
        except (re.error, TypeError) as e:
            raise UsageError(f"{arg}: not a regular expression ({e}): {pattern!r}; allowed: a Python re "
                             f"pattern over layer names, e.g. 'fc$'") from None
    selector: Callable = reg if callable(reg) and not hasattr(reg, "prox") else (lambda *_: reg)

    def selected(name: str) -> bool:
        return (include is None or re.search(include, name) is not None) and (
            exclude is None or re.search(exclude, name) is None)

    groups: dict[int, dict] = {}
    rest: list[nn.Parameter] = []
    for mod_name, module in unwrap(model).named_modules():
        sparse = isinstance(module, modules)
        if reg is not None and sparse and selected(f"{mod_name}.weight" if mod_name else "weight"):
            _refuse_parametrized(mod_name, module)
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            chosen = None
            if sparse and p_name in ("weight", "weight_orig") and _is_weight(module, p_name) and selected(full):
                chosen = selector(full, module, p)
            if chosen is None:
                rest.append(p)
            else:
                groups.setdefault(id(chosen), {"params": [], "reg": chosen, **group_options})["params"].append(p)
    out = list(groups.values())
    if rest:
        out.append({"params": rest, "reg": other_reg, **group_options})
    return out
