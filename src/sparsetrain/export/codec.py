"""Lossless sparse tensor codings and the safetensors container every export uses.

Each tensor of a state dict is stored in whichever of these codings is smallest (sizes in bytes,
``e`` = bytes per value, ``n`` = elements, ``k`` = nonzeros):

==========  ===============================================  ====================================
coding      stored tensors                                   size
==========  ===============================================  ====================================
dense       ``NAME``                                         n·e
bitmask     ``NAME.__values`` (k), ``NAME.__mask`` (uint8,   k·e + ⌈n/8⌉
            ``numpy.packbits`` little bit order)
csr         ``NAME.__values``, ``NAME.__crow`` (int32, rows  k·e + 4·(rows+1) + k·(1|2|4)
            +1), ``NAME.__col`` (uint8/int16/int32 by the
            number of columns); rows = shape[0]
gaps        ``NAME.__values``, ``NAME.__gaps`` (uint8): the  k·e + k + #long gaps
            distance from one nonzero to the next in the
            flattened tensor; a token 0 means "skip 255
            positions, no value", 1..255 "advance this far,
            a value is here"
==========  ===============================================  ====================================

The gap coding costs about one byte per nonzero whenever the mean gap is below 255 (density
> 0.4 %), which at 2 % density is 0.02·32 + 0.02·8 = 0.80 bits per weight against the 0.78-bit
entropy bound (32-bit values + H(0.02) for the positions): within 3 % of the information limit,
and well below a bitmask's 0.02·32 + 1 = 1.64 bits.

File metadata (strings, as safetensors requires): ``sparsetrain_format`` (dense / compressed /
shrunk / sparse), ``format_version``, ``model``, ``in_shape``, ``num_classes``, ``codings`` (JSON:
name -> {shape, dtype, coding}) and per format ``architecture`` / ``layers``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..errors import UsageError, check

FORMAT_VERSION = 1
CODINGS = ("dense", "bitmask", "csr", "gaps")
_SEP = ".__"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


# ----------------------------------------------------------------------------- sizes
def _col_dtype(cols: int) -> torch.dtype:
    return torch.uint8 if cols <= 256 else torch.int16 if cols <= 32768 else torch.int32


def _gap_tokens(flat_idx: torch.Tensor) -> torch.Tensor:
    """Number of uint8 tokens per nonzero in the gap coding (int64 tensor, one per nonzero)."""
    prev = torch.cat([flat_idx.new_tensor([-1]), flat_idx[:-1]])
    return (flat_idx - prev - 1) // 255 + 1


def coding_sizes(t: torch.Tensor) -> dict[str, int]:
    """Bytes each coding would take for ``t`` (values and index data, without the file header)."""
    n, e = t.numel(), t.element_size()
    sizes = {"dense": n * e}
    if not (t.is_floating_point() and t.dim() >= 1 and n > 0):
        return sizes
    nz = (t != 0).reshape(-1)
    k = int(nz.sum())
    rows = t.shape[0]
    cols = n // rows if rows else 0
    sizes["bitmask"] = k * e + math.ceil(n / 8)
    sizes["csr"] = k * e + 4 * (rows + 1) + k * _col_dtype(cols).itemsize
    idx = nz.nonzero().reshape(-1)
    sizes["gaps"] = k * e + int(_gap_tokens(idx).sum()) if k else 0
    return sizes


# ----------------------------------------------------------------------------- encode / decode
def encode(name: str, t: torch.Tensor, coding: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to store for ``t`` and its coding record; ``coding=None`` picks the smallest."""
    t = t.detach().cpu()
    if coding is None:
        sizes = coding_sizes(t)
        coding = min(sizes, key=lambda c: (sizes[c], CODINGS.index(c)))
    info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "coding": coding}
    if coding == "dense":
        return {name: t.contiguous().clone()}, info
    flat = t.reshape(-1)
    nz = flat != 0
    out = {f"{name}{_SEP}values": flat[nz].clone()}
    if coding == "bitmask":
        bits = np.packbits(nz.numpy().astype(np.uint8), bitorder="little")
        out[f"{name}{_SEP}mask"] = torch.from_numpy(bits.copy())
    elif coding == "csr":
        m = t.reshape(t.shape[0], -1) != 0
        counts = m.sum(1)
        crow = torch.zeros(m.shape[0] + 1, dtype=torch.int32)
        crow[1:] = counts.cumsum(0).to(torch.int32)
        col = m.nonzero()[:, 1].to(_col_dtype(m.shape[1]))
        out[f"{name}{_SEP}crow"] = crow
        out[f"{name}{_SEP}col"] = col
    elif coding == "gaps":
        idx = nz.nonzero().reshape(-1)
        ntok = _gap_tokens(idx)
        tokens = torch.zeros(int(ntok.sum()), dtype=torch.uint8)
        if idx.numel():
            prev = torch.cat([idx.new_tensor([-1]), idx[:-1]])
            last = ntok.cumsum(0) - 1                      # each nonzero's own token ends its run
            tokens[last] = (idx - prev - 255 * (ntok - 1)).to(torch.uint8)
        out[f"{name}{_SEP}gaps"] = tokens
    else:
        raise UsageError(f"coding: unknown value {coding!r}; allowed: {', '.join(CODINGS)}")
    return out, info


def _bad(name: str, why: str) -> UsageError:
    return UsageError(f"tensor {name}: {why}")


def decode(name: str, info: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode`; inconsistent data raises a one-line UsageError."""
    try:
        shape = [int(s) for s in info["shape"]]
        dtype = _DTYPES[info["dtype"]]
        coding = info["coding"]
    except (KeyError, TypeError, ValueError):
        raise _bad(name, f"bad coding record {info!r}") from None
    n = math.prod(shape)
    if coding == "dense":
        t = stored.get(name)
        if t is None or list(t.shape) != shape or t.dtype != dtype:
            raise _bad(name, "missing or of the wrong shape/dtype")
        return t
    values = stored.get(f"{name}{_SEP}values")
    if values is None or values.dim() != 1 or values.dtype != dtype or values.numel() > n:
        raise _bad(name, "values missing or inconsistent")
    k = values.numel()
    if coding == "bitmask":
        bits = stored.get(f"{name}{_SEP}mask")
        if bits is None or bits.dtype != torch.uint8 or bits.numel() != math.ceil(n / 8):
            raise _bad(name, "bitmask missing or of the wrong length")
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").astype(bool))
        if int(mask.sum()) != k:
            raise _bad(name, f"bitmask has {int(mask.sum())} bits set for {k} values")
        idx = mask.nonzero().reshape(-1)
    elif coding == "csr":
        crow, col = stored.get(f"{name}{_SEP}crow"), stored.get(f"{name}{_SEP}col")
        if crow is None or col is None or not shape:
            raise _bad(name, "csr indices missing")
        rows = shape[0]
        cols = n // rows if rows else 0
        crow = crow.to(torch.int64)
        col = col.to(torch.int64)
        if (crow.numel() != rows + 1 or col.numel() != k or int(crow[0]) != 0 or int(crow[-1]) != k
                or bool((crow[1:] < crow[:-1]).any()) or bool(((col < 0) | (col >= cols)).any())):
            raise _bad(name, "csr indices inconsistent")
        row = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        idx = row * cols + col
    elif coding == "gaps":
        tokens = stored.get(f"{name}{_SEP}gaps")
        if tokens is None or tokens.dtype != torch.uint8 or tokens.dim() != 1:
            raise _bad(name, "gap stream missing")
        adv = tokens.to(torch.int64)
        has_value = adv != 0
        adv[~has_value] = 255
        idx = (adv.cumsum(0) - 1)[has_value]
        if idx.numel() != k or (k and int(idx[-1]) >= n):
            raise _bad(name, f"gap stream gives {idx.numel()} positions for {k} values in {n} elements")
    else:
        raise _bad(name, f"unknown coding {coding!r}; allowed: {', '.join(CODINGS)}")
    flat = torch.zeros(n, dtype=dtype)
    flat[idx] = values
    return flat.reshape(shape)


def encode_state(state: dict[str, torch.Tensor], compress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, codings = {}, {}
    for name, t in state.items():
        if _SEP in name:
            raise UsageError(f"tensor {name}: names may not contain {_SEP!r}")
        stored, info = encode(name, t, None if compress else "dense")
        tensors.update(stored)
        codings[name] = info
    return tensors, codings


# elements a file may declare per stored byte (zeros are not stored: a 99.9 %-sparse weight in the
# gaps coding stores ~5 bytes per 1000 elements), beyond a floor that any file may declare
ELEMENTS_PER_BYTE = 4096
ELEMENTS_FLOOR = 1 << 24


def decode_state(codings: dict, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(codings, dict):
        raise UsageError("codings: must be a JSON object")
    # check the declared sizes against what the file holds before allocating anything
    have = sum(t.numel() * t.element_size() for t in stored.values())
    declared = 0
    for info in codings.values():
        try:
            declared += max(0, math.prod(int(d) for d in info["shape"]))
        except (KeyError, TypeError, ValueError):
            pass                                  # decode() names the bad record
    if declared > ELEMENTS_PER_BYTE * have + ELEMENTS_FLOOR:
        raise UsageError(f"codings: declare {declared:,} elements but the file stores {have:,} bytes of tensor "
                         f"data (at most {ELEMENTS_PER_BYTE} elements per byte); refused before allocating; "
                         f"allowed: a file written by `sparsetrain export`")
    return {name: decode(name, info, stored) for name, info in codings.items()}


# ----------------------------------------------------------------------------- files
def write_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict, compress: bool) -> Path:
    """Atomically write ``state`` (coded) and ``meta`` (JSON-able values) to a safetensors file."""
    from safetensors.torch import save
    tensors, codings = encode_state(state, compress)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    header["format_version"] = str(FORMAT_VERSION)
    header["codings"] = json.dumps(codings, separators=(",", ":"))
    data = save(tensors, metadata=header)
    path = Path(path)
    atomic_write(path, lambda f: f.write(data))
    return path


_JSON_KEYS = ("in_shape", "num_classes", "codings", "architecture", "layers", "extra")


def _check_meta(meta: dict) -> None:
    """``in_shape`` (C, H, W) and ``num_classes``: positive integers (or null), since models are
    built from them."""
    shape, classes = meta.get("in_shape"), meta.get("num_classes")
    pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20  # noqa: E731
    check(shape is None or (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(map(pos_int, shape))),
          "in_shape", "a list of 1 to 3 positive integers (C, H, W) or null", shape)
    check(classes is None or pos_int(classes), "num_classes", "a positive integer or null", classes)


def read_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with JSON fields parsed, decoded state dict); any problem is a one-line UsageError."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"export {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, not safetensors: all the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"export {path}: cannot be read ({reason[:160]}); "
                         f"allowed: a file written by `sparsetrain export`") from None
    fmt = meta.get("sparsetrain_format")
    if fmt is None:
        raise UsageError(f"export {path}: not a sparsetrain export (no sparsetrain_format in its metadata)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise UsageError(f"export {path}: format_version {meta.get('format_version')!r} is not supported; "
                         f"allowed: {FORMAT_VERSION}")
    try:
        for key in _JSON_KEYS:
            if key in meta:
                meta[key] = json.loads(meta[key])
        _check_meta(meta)
        state = decode_state(meta.get("codings", {}), stored)
    except UsageError as e:
        raise UsageError(f"export {path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"export {path}: corrupt ({reason[:160]})") from None
    return meta, state
