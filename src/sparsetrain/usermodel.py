"""The user's own ``nn.Module`` in a run directory: what is recorded, how it is rebuilt.

``sparsetrain.train(model=MyNet(width=8), model_args={"width": 8}, ...)`` writes ``model.json``
next to ``config.json`` (whose ``model`` field is the class's import path ``module:QualName``):

    {"class": "mypkg.nets:MyNet", "args": {"width": 8} | null, "in_shape": [C, H, W],
     "num_classes": 10, "architecture": {...} | null, "architecture_note": "..."}

``architecture`` is the model as JSON (an ``nn.Sequential`` description, or its torch.fx graph:
export/graph.py), present when the model can be described; the weights are the state dict in
``checkpoint.pt`` as for every run. :func:`rebuild` makes the model again, in this order:

1. ``model=`` given by the caller (the Python API of ``export_run`` / ``inspect_exports``);
2. the class, when its module is already imported in this process (nothing is imported because
   a file names it) and it is an ``nn.Module`` subclass, called with ``args`` (or no arguments);
3. the architecture: a class-free ``nn.Sequential`` / ``GraphModule`` with the same state dict keys.

When none applies the error says what to do.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

from .errors import UsageError

FILE = "model.json"


def class_path(model: nn.Module) -> str:
    """``module:QualName`` of the model's class."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def record(model: nn.Module, args: dict | None, in_shape, num_classes: int, *, describe: bool = True) -> dict:
    """The ``model.json`` content for ``model`` (see the module docstring); ``model_args`` are
    checked either way, the architecture is traced only with ``describe``."""
    from .export import _baked_copy, describe as describe_model
    if args is not None:
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise UsageError(f"model_args: must be a dict of constructor keyword arguments, got {args!r}")
        try:
            json.dumps(args)
        except (TypeError, ValueError):
            raise UsageError(f"model_args: must be JSON-serialisable (numbers, strings, lists, dicts), "
                             f"got {args!r}") from None
    entry = {"class": class_path(model), "args": args, "in_shape": list(in_shape), "num_classes": num_classes,
             "architecture": None, "architecture_note": ""}
    if not describe:
        return entry
    try:
        entry["architecture"] = describe_model(_baked_copy(model))   # prune / parametrize applied
    except UsageError as e:
        entry["architecture_note"] = str(e)
    except Exception as e:  # noqa: BLE001 - a model the tracer chokes on still trains; the note says why
        entry["architecture_note"] = f"not described ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return entry


def _from_class(entry: dict) -> nn.Module:
    path = str(entry.get("class") or "")
    module, _, qual = path.partition(":")
    if module not in sys.modules:
        raise UsageError(f"its class {path} is not imported in this process (sparsetrain imports no module "
                         f"because a file names it)")
    obj = sys.modules[module]
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise UsageError(f"{path} is not an nn.Module class")
    args = entry.get("args")
    try:
        return obj(**(args or {}))
    except TypeError as e:
        raise UsageError(f"{path}({'**model_args' if args else ''}) failed: {e}; record the constructor's "
                         f"arguments with train(..., model_args={{...}})") from None


def rebuild(run: Path, entry: dict, model: nn.Module | None = None, state_keys=None) -> nn.Module:
    """The model of a run with a user model (see the module docstring). ``state_keys``: the keys
    of the weights to load; a class whose instance has other keys (e.g. built without the
    arguments it was trained with) gives way to the architecture."""
    if model is not None:
        return model
    reasons = []
    try:
        built = _from_class(entry)
        if state_keys is None or set(built.state_dict()) == set(state_keys):
            return built
        reasons.append(f"{entry.get('class')}({'**model_args' if entry.get('args') else ''}) has other "
                       f"parameters than the checkpoint")
    except UsageError as e:
        reasons.append(str(e))
    if entry.get("architecture"):
        from .export.arch import from_spec
        return from_spec(entry["architecture"])
    reasons.append(entry.get("architecture_note") or "no architecture recorded")
    raise UsageError(f"model: {run / FILE} names the user model {entry.get('class')!r}, which cannot be rebuilt "
                     f"here ({'; '.join(reasons)}); allowed: import its module first, or pass model= "
                     f"(sparsetrain.export.export_run(run, fmt, model=MyNet()))")


def read(run: Path) -> dict | None:
    """``model.json`` of a run directory, or None if the run used a library model."""
    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or "in_shape" not in entry or "num_classes" not in entry:
            raise ValueError("missing in_shape / num_classes")
    except ValueError as e:
        raise UsageError(f"RUN_DIR: {path} is not a sparsetrain model description ({e})") from None
    return entry
