"""Any torch.fx-traceable model as a JSON graph, rebuilt as a ``torch.fx.GraphModule``.

:func:`trace` runs ``torch.fx.symbolic_trace`` on a copy of the model: the user's own classes
(blocks, residual connections, ``torch.cat`` ...) dissolve into a graph whose leaves are torch
modules of the set :mod:`~sparsetrain.export.arch` describes (Linear, Conv, BatchNorm, pooling,
activations, ...) and a fixed list of functions and tensor methods (``+``, ``torch.cat``,
``torch.flatten``, ``F.relu``, ``x.view`` ...). :func:`to_graph_spec` writes that graph as JSON
(nodes, their arguments, each leaf module's constructor arguments; never code, never pickle) and
:func:`from_graph_spec` rebuilds it without the original class: the state dict keys stay those
of the original model (``layer1.0.conv1.weight`` ...).

A model that cannot be traced (data-dependent control flow) or that calls something outside
these lists is refused with the reason; such models keep the ``dense`` / ``compressed`` formats.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
from torch import fx, nn
import torch.nn.functional as F

from ..errors import UsageError

# name in the JSON -> function; only these may appear as call_function targets
FUNCTIONS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "getitem": operator.getitem, "neg": operator.neg,
    "torch.add": torch.add, "torch.mul": torch.mul, "torch.cat": torch.cat, "torch.flatten": torch.flatten,
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "torch.mean": torch.mean, "torch.sum": torch.sum, "torch.reshape": torch.reshape,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu, "F.leaky_relu": F.leaky_relu,
    "F.elu": F.elu, "F.dropout": F.dropout, "F.softmax": F.softmax, "F.log_softmax": F.log_softmax,
    "F.adaptive_avg_pool1d": F.adaptive_avg_pool1d, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.adaptive_max_pool2d": F.adaptive_max_pool2d, "F.avg_pool1d": F.avg_pool1d, "F.avg_pool2d": F.avg_pool2d,
    "F.max_pool1d": F.max_pool1d, "F.max_pool2d": F.max_pool2d,
}
_FUNCTION_NAMES = {fn: name for name, fn in FUNCTIONS.items()}
METHODS = ("view", "reshape", "flatten", "size", "relu", "sigmoid", "tanh", "mean", "sum", "add", "mul",
           "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "softmax", "log_softmax")


def untraceable(model: nn.Module, why: str) -> UsageError:
    return UsageError(f"model: {type(model).__name__} cannot be described as a graph ({why}); the shrunk and "
                      f"sparse formats need a torch.fx-traceable model of standard layers; dense and compressed "
                      f"work for any model")


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of a deep copy of ``model`` (eval mode), checked against
    :data:`FUNCTIONS` / :data:`METHODS` and the module types of :mod:`.arch`."""
    from ..params import unwrap
    from .arch import BiasMap, _BY_CLASS
    model = unwrap(model)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        try:
            gm = fx.symbolic_trace(copy.deepcopy(model).eval())
        except Exception as e:  # noqa: BLE001 - torch.fx raises many kinds (TraceError, TypeError ...)
            raise untraceable(model, f"torch.fx: {str(e).splitlines()[0][:160]}") from None
    gm.eval()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) not in _BY_CLASS and type(m) is not BiasMap:
                raise untraceable(model, f"its module {node.target!r} is a {type(m).__name__}")
        elif node.op == "call_function" and node.target not in _FUNCTION_NAMES:
            raise untraceable(model, f"it calls {getattr(node.target, '__name__', node.target)}")
        elif node.op == "call_method" and node.target not in METHODS:
            raise untraceable(model, f"it calls the tensor method .{node.target}()")
    return gm


# ----------------------------------------------------------------------------- JSON
def _encode(v):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {str(k): _encode(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return {"float": str(v)}
        return v
    raise UsageError(f"architecture: a graph argument of type {type(v).__name__} cannot be written as JSON")


def _decode(v, nodes: dict):
    if isinstance(v, list):
        return [_decode(x, nodes) for x in v]
    if isinstance(v, dict):
        if "node" in v:
            return nodes[v["node"]]
        if "tuple" in v:
            return tuple(_decode(x, nodes) for x in v["tuple"])
        if "dict" in v:
            return {k: _decode(x, nodes) for k, x in v["dict"].items()}
        if "slice" in v:
            return slice(*[_decode(x, nodes) for x in v["slice"]])
        if "float" in v:
            return float(v["float"])
        raise UsageError(f"architecture: unknown graph argument {str(v)[:80]!r}")
    return v


def to_graph_spec(gm: fx.GraphModule) -> dict:
    """JSON-able description of a graph from :func:`trace` (or :func:`~.graph_shrink.shrink_graph`)."""
    from .arch import to_spec
    modules, attrs, nodes = {}, {}, []
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op}
        if node.op == "call_module":
            modules.setdefault(node.target, to_spec(gm.get_submodule(node.target)))
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = _FUNCTION_NAMES[node.target]
        elif node.op in ("call_method", "get_attr", "placeholder"):
            entry["target"] = node.target
            if node.op == "get_attr":
                t = gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)
                attrs[node.target] = {"shape": list(t.shape), "parameter": _is_param(gm, node.target),
                                      "dtype": str(t.dtype).replace("torch.", "")}
        if node.op != "placeholder":
            entry["args"] = _encode(list(node.args))
            entry["kwargs"] = _encode(dict(node.kwargs))["dict"]
        nodes.append(entry)
    return {"type": "Graph", "modules": modules, "attributes": attrs, "nodes": nodes}


def _is_param(gm: nn.Module, target: str) -> bool:
    parent, _, leaf = target.rpartition(".")
    return leaf in (gm.get_submodule(parent) if parent else gm)._parameters


def _set(root: nn.Module, path: str, value, parameter: bool | None = None) -> None:
    parts = path.split(".")
    mod = root
    for p in parts[:-1]:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if parameter is None:
        mod.add_module(parts[-1], value)
    elif parameter:
        mod.register_parameter(parts[-1], nn.Parameter(value))
    else:
        mod.register_buffer(parts[-1], value)


def from_graph_spec(spec: dict) -> fx.GraphModule:
    """Rebuild the GraphModule of :func:`to_graph_spec` (fresh parameters; load the state dict)."""
    from .arch import from_spec
    try:
        root = nn.Module()
        for target, mspec in spec["modules"].items():
            _set(root, target, from_spec(mspec))
        for target, a in spec.get("attributes", {}).items():
            dtype = getattr(torch, a.get("dtype", "float32"))
            if not isinstance(dtype, torch.dtype):
                raise UsageError(f"architecture: unknown dtype {a.get('dtype')!r}")
            _set(root, target, torch.zeros(a["shape"], dtype=dtype), bool(a["parameter"]))
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for e in spec["nodes"]:
            op = e["op"]
            if op == "placeholder":
                n = graph.placeholder(e["target"])
            elif op == "output":
                n = graph.output(_decode(e["args"], nodes)[0])
            else:
                target = e["target"]
                if op == "call_function":
                    if target not in FUNCTIONS:
                        raise UsageError(f"architecture: unknown function {target!r}; allowed: {', '.join(FUNCTIONS)}")
                    target = FUNCTIONS[target]
                elif op == "call_method" and target not in METHODS:
                    raise UsageError(f"architecture: unknown tensor method {target!r}; allowed: {', '.join(METHODS)}")
                elif op not in ("call_module", "call_method", "get_attr"):
                    raise UsageError(f"architecture: unknown graph node kind {op!r}")
                n = graph.create_node(op, target, tuple(_decode(e.get("args", []), nodes)),
                                      _decode({"dict": e.get("kwargs", {})}, nodes))
            nodes[e["name"]] = n
        graph.lint()
        return fx.GraphModule(root, graph)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or hand-edited file
        raise UsageError(f"architecture: bad graph ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def same_state_keys(a: nn.Module, b: nn.Module) -> bool:
    """Both modules have the same state dict keys (so one's file loads into the other)."""
    return set(a.state_dict()) == set(b.state_dict())
