"""Crash-safe checkpoint files that never unpickle code.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then
``os.replace``-d over the target: a kill at any moment leaves either the old or the new file,
never a torn one. Loading uses ``torch.load(weights_only=True)``, which rebuilds tensors and
plain containers only and refuses any other pickled object without executing it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import UsageError


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))            # mkstemp's 0600 -> the file's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


class _Passing:
    """A file for ``torch.save`` that keeps the exception its ``write`` raised: torch's writer
    turns it into an opaque RuntimeError ("unexpected pos ..."), which would hide a full disk
    (OSError) or a Ctrl-C (KeyboardInterrupt) from the caller."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save(obj, f) -> None:
    out = _Passing(f)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Atomically write ``obj`` (tensors and plain Python containers only) to ``path``."""
    atomic_write(Path(path), lambda f: _save(obj, f))


def write_json(obj, path: str | Path) -> None:
    """Atomically write ``obj`` as indented JSON."""
    data = (json.dumps(obj, indent=2, default=float) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


_CALLS = {"GLOBAL": "imports", "STACK_GLOBAL": "imports", "INST": "calls", "OBJ": "calls", "REDUCE": "calls",
          "NEWOBJ": "calls", "NEWOBJ_EX": "calls"}


def _pickled_call(path: Path) -> str | None:
    """How the pickle in ``path`` would run code ("imports"/"calls"), read opcode by opcode
    without executing any; None for bytes that are no pickle (garbage, truncation)."""
    import pickletools
    try:
        with open(path, "rb") as f:
            for op, _, _ in pickletools.genops(f):
                if op.name in _CALLS:
                    return _CALLS[op.name] + " a Python function"
    except Exception:  # noqa: BLE001 - not a (complete) pickle
        return None
    return None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; any problem is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file; allowed: a checkpoint.pt written by sparsetrain train")
    try:
        with warnings.catch_warnings():   # torch's notes on foreign pickles: the error below says it in one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or unsafe: all the same to the user
        text = str(e)
        unsafe = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)|([\w.]+) was not an allowed global", text, re.I)
        opcode = re.search(r"Unsupported operand (\d+)", text)
        if unsafe:
            reason = (f"refused: it contains code (a reference to {unsafe.group(1) or unsafe.group(2)}, "
                      f"not tensors); nothing was executed")
        elif opcode and (call := _pickled_call(path)):   # a plain pickle, not torch's format, that imports or calls
            reason = (f"refused: it contains code (a pickle that {call}, which a weights-only "
                      f"load does not run); nothing was executed")
        else:
            detail = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler error:" in text else text
            detail = (detail.strip().splitlines() or [type(e).__name__])[0].strip() or type(e).__name__
            reason = f"corrupt or truncated ({type(e).__name__}: {detail[:120]})"
        raise UsageError(f"checkpoint {path}: cannot be loaded: {reason[:200]}; allowed: a checkpoint.pt "
                         f"written by sparsetrain train") from None
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint {path}: not a sparsetrain checkpoint (expected a dict of tensors and "
                         f"plain values, got {type(obj).__name__}); allowed: a checkpoint.pt written by sparsetrain train")
    return obj
