"""A JSON description of a network, rebuilt into ``nn.Sequential`` without the original classes.

:func:`canonical` turns a model into an ``nn.Sequential`` of a fixed set of torch modules (plus
:class:`Residual` and :class:`BiasMap`, defined here) that computes the same function: plain
``nn.Sequential`` models (the MLPs, LeNet-5, the ConvNet, VGG) pass through with nested
Sequentials flattened; the library's ``ResNet`` / ``BasicBlock`` become ``Sequential(stem...,
Residual(body, shortcut)..., AdaptiveAvgPool2d(1), Flatten(), fc)``. Other classes can be added
with :func:`register_converter`. :func:`to_spec` / :func:`from_spec` map such a Sequential to a
JSON-able dict and back; parameters travel separately (the state dict), nothing is pickled.
Models that are no such Sequential are described as a torch.fx graph instead (graph.py).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UsageError


class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``; an empty ``shortcut`` Sequential is the identity."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "none"):
            raise UsageError(f"Residual.activation: unknown value {activation!r}; allowed: relu, none")
        self.body, self.shortcut, self.activation = body, shortcut, activation

    def forward(self, x):
        out = self.body(x) + self.shortcut(x)
        return F.relu(out) if self.activation == "relu" else out


class BiasMap(nn.Module):
    """Adds a fixed per-position bias (``C × spatial``): the exact contribution of constant channels
    removed by :func:`~sparsetrain.export.shrink.shrink` into a zero-padded convolution."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("bias", torch.zeros(tuple(shape)))

    def forward(self, x):
        return x + self.bias


# type name -> (class, constructor attributes); instances must be exactly of that class
_SIMPLE: dict[str, tuple[type, tuple[str, ...]]] = {
    "Identity": (nn.Identity, ()),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "ELU": (nn.ELU, ("alpha", "inplace")),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ("inplace",)),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                           "groups", "padding_mode")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                           "groups", "padding_mode")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
}
_BY_CLASS = {cls: name for name, (cls, _) in _SIMPLE.items()}
SUPPORTED = tuple(sorted(_SIMPLE)) + ("Sequential", "Residual", "BiasMap", "Graph")

_CONVERTERS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_converter(cls: type, fn: Callable[[nn.Module], nn.Module]) -> None:
    """Teach :func:`canonical` a module class: ``fn(module)`` returns an equivalent module built of
    the supported types (it may reuse ``module``'s submodules)."""
    _CONVERTERS[cls] = fn


def _unsupported(m: nn.Module) -> UsageError:
    return UsageError(f"model: module {type(m).__name__} cannot be described without its class; "
                      f"allowed: {', '.join(SUPPORTED)} and the library's ResNet "
                      f"(or register_converter for your class)")


def _canon(m: nn.Module) -> list[nn.Module]:
    """``m`` as a list of supported modules to splice into a Sequential."""
    conv = next((fn for cls, fn in _CONVERTERS.items() if type(m) is cls), None)
    if conv is not None:
        m = conv(m)
    if type(m) is nn.Sequential:
        return [x for child in m for x in _canon(child)]
    if isinstance(m, Residual):
        return [Residual(nn.Sequential(*_canon(m.body)), nn.Sequential(*_canon(m.shortcut)), m.activation)]
    if type(m) in _BY_CLASS or type(m) is BiasMap:
        if type(m) in (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d) and m.return_indices:
            raise _unsupported(m)
        return [m]
    raise _unsupported(m)


def canonical(model: nn.Module) -> nn.Sequential:
    """A deep copy of ``model`` as a flat ``nn.Sequential`` of supported modules (same function)."""
    from ..params import unwrap
    return nn.Sequential(*_canon(copy.deepcopy(unwrap(model))))


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def to_spec(m: nn.Module) -> dict:
    """JSON-able description of a module built by :func:`canonical` (no parameters)."""
    if type(m) is nn.Sequential:
        return {"type": "Sequential", "children": [to_spec(c) for c in m]}
    if isinstance(m, Residual):
        return {"type": "Residual", "body": to_spec(m.body), "shortcut": to_spec(m.shortcut),
                "activation": m.activation}
    if type(m) is BiasMap:
        return {"type": "BiasMap", "shape": list(m.bias.shape)}
    if isinstance(m, torch.fx.GraphModule):
        from .graph import to_graph_spec
        return to_graph_spec(m)
    name = _BY_CLASS.get(type(m))
    if name is None:
        raise _unsupported(m)
    spec = {"type": name, **{a: _jsonable(getattr(m, a)) for a in _SIMPLE[name][1]}}
    if name in ("Linear", "Conv1d", "Conv2d"):
        spec["bias"] = m.bias is not None
    return spec


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v


def from_spec(spec: dict) -> nn.Module:
    """Rebuild the module described by :func:`to_spec` (freshly initialised parameters)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise UsageError(f"architecture: expected an object with a 'type', got {str(spec)[:80]!r}")
    kind = spec["type"]
    try:
        if kind == "Sequential":
            return nn.Sequential(*[from_spec(c) for c in spec["children"]])
        if kind == "Residual":
            return Residual(from_spec(spec["body"]), from_spec(spec["shortcut"]), spec.get("activation", "relu"))
        if kind == "BiasMap":
            return BiasMap(spec["shape"])
        if kind == "Graph":
            from .graph import from_graph_spec
            return from_graph_spec(spec)
        if kind not in _SIMPLE:
            raise UsageError(f"architecture: unknown module type {kind!r}; allowed: {', '.join(SUPPORTED)}")
        cls, attrs = _SIMPLE[kind]
        kwargs = {a: _tuple(spec[a]) for a in attrs if a in spec}
        if "bias" in spec:
            kwargs["bias"] = bool(spec["bias"])
        return cls(**kwargs)
    except UsageError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"architecture: bad {kind} entry ({str(e).splitlines()[0][:120]})") from None


# ----------------------------------------------------------------------------- the library's ResNets
def _register_builtin() -> None:
    from ..models import BasicBlock, ResNet

    def block(b: BasicBlock) -> nn.Module:
        body = nn.Sequential(b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2)
        return Residual(body, nn.Sequential(*_canon(b.shortcut)), "relu")

    def resnet(r: ResNet) -> nn.Module:
        return nn.Sequential(r.conv1, r.bn1, nn.ReLU(), *r.layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), r.fc)

    register_converter(BasicBlock, block)
    register_converter(ResNet, resnet)


_register_builtin()
