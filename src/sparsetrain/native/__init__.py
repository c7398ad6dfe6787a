"""Native CPU kernels (``kernels.c``), compiled on first use and called through ctypes.

Two hot spots do not fit torch's op-at-a-time model: the xRDA step (about a dozen elementwise
passes over memory as torch ops; two fused passes here) and sparse × dense products at the batch
sizes of inference (MKL's CSR reaches 20-38 % of the ideal 1/density speedup; a kernel that keeps
a row's 64 output columns in registers does better). ``kernels.c`` is plain C with no Python or
torch headers: it builds in well under a second with the system C compiler
(``cc -O3 -march=native``), once per machine and source version, into the cache directory
(``$SPARSETRAIN_CACHE``, else ``~/.cache/sparsetrain``; written atomically, so concurrent
processes may race safely). A cached library is loaded only when the sha256 recorded beside it
(``kernels-KEY.so.sha256``: the key, a hash of source + compiler + flags + CPU, and the library's
own hash) matches and neither it nor the directory is writable by other users; else it is rebuilt.

Everything here is optional: without a C compiler, with ``SPARSETRAIN_NATIVE=0``, on CUDA, for
non-float32 or non-contiguous tensors the callers use their torch path, which computes the same
formulas (tests check that both agree to rounding). :func:`status` says which one runs and why.

The kernels release the GIL (ctypes does), so :func:`parallel_for` splits large work over
``torch.get_num_threads()`` Python threads.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["lib", "status", "usable", "disabled", "parallel_for", "split", "ptr", "cache_dir", "csr_matmul_t"]

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno",
         "-fPIC", "-shared"]
PARALLEL_MIN_WORK = 1 << 18        # work units (≈ one xRDA entry, ~1 ns): below this one thread is faster

_lock = threading.Lock()
_DTYPES = (torch.float32, torch.int32)
_state: dict = {"lib": None, "tried": False, "why": ""}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0

_f32p = ctypes.c_void_p
_I64, _F32 = ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "st_xrda_pass1": (_F32, [_I64, _f32p, _f32p, _f32p, _f32p, _f32p, _F32, _F32, _F32, _F32, _F32]),
    "st_xrda_pass2": (None, [_I64, _f32p, _f32p, _f32p, _f32p, _F32, _F32, _F32, _F32]),
    "st_xrda_group_pass1": (_F32, [_I64, _I64, _f32p, _f32p, _f32p, _f32p, _f32p, _F32, _F32, _F32, _F32, _F32]),
    "st_xrda_group_pass2": (None, [_I64, _I64, _f32p, _f32p, _f32p, _f32p, _F32, _F32, _F32, _F32]),
    "st_xrda_fused": (_F32, [_I64] + [_f32p] * 6 + [_F32] * 9 + [_f32p]),
    "st_xrda_fused_multi": (None, [_I64] + [_f32p] * 8 + [_F32] * 8 + [_f32p] * 2),
    "st_xrda_repair": (_F32, [_I64] + [_f32p] * 4 + [_F32] * 5),
    "st_xrda_predict": (_F32, [_I64, _f32p, _f32p, _F32]),
    "st_xrda_plain": (None, [_I64] + [_f32p] * 4 + [_F32] * 5),
    "st_csr_mv": (None, [_I64, _I64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p]),
    "st_csr_mm": (None, [_I64, _I64, _I64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p]),
}


def cache_dir() -> Path:
    root = os.environ.get("SPARSETRAIN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsetrain"


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native is only reused on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_private(path: Path) -> None:
    """Refuse a cache directory or file that another user could have written (a planted library
    would run with our rights)."""
    st = path.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise RuntimeError(f"{path} is writable by other users or not ours; not loading native code from it "
                           f"(set SPARSETRAIN_CACHE to a private directory)")


def _verified(out: Path, key: str) -> bool:
    """Whether ``out`` is the library we built for ``key``: its sidecar ``.sha256`` (written by
    :func:`_build`) records the key (a hash of source, compiler, flags and CPU) and the library's
    own sha256, and both match, and no other user may write it (else it is rebuilt)."""
    try:
        recorded = Path(str(out) + ".sha256").read_text().split()
        _check_private(out)
        return recorded == [key, _sha256(out)]
    except (OSError, ValueError, RuntimeError):
        return False


def _build(cc: str) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), " ".join(FLAGS).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()
    out = cache_dir() / f"kernels-{key[:20]}.so"
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = out.parent.stat().st_mode
    if mode & 0o022 and hasattr(os, "getuid") and out.parent.stat().st_uid == os.getuid():
        os.chmod(out.parent, mode & ~0o022)             # our own directory, made under a lax umask
    _check_private(out.parent)
    if out.is_file() and _verified(out, key):
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    side_fd, side_tmp = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        os.chmod(tmp, 0o755)                            # the linker follows the umask
        with os.fdopen(side_fd, "w") as f:
            f.write(f"{key} {_sha256(tmp)}\n")
        side_fd = None
        os.replace(side_tmp, str(out) + ".sha256")
        os.replace(tmp, out)
    finally:
        if side_fd is not None:
            os.close(side_fd)
        for t in (tmp, side_tmp):
            if os.path.exists(t):
                os.unlink(t)
    if not _verified(out, key):     # another process replaced one of the two meanwhile: not loaded
        raise RuntimeError(f"{out} changed while it was built (a concurrent build?); not loading it")
    return out


def lib():
    """The loaded kernel library, or None (see :func:`status` for why)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                if os.environ.get("SPARSETRAIN_NATIVE", "1") == "0":
                    raise RuntimeError("disabled by SPARSETRAIN_NATIVE=0")
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler (cc, gcc or clang; or set CC)")
                so = ctypes.CDLL(str(_build(cc)))
                for name, (res, args) in _SIGNATURES.items():
                    fn = getattr(so, name)
                    fn.restype, fn.argtypes = res, args
                _state["lib"], _state["why"] = so, f"native kernels: {so._name}"
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state["why"] = f"torch fallback: {e}"
            _state["tried"] = True
    return _state["lib"]


def status() -> str:
    """One line: which kernels run, and why."""
    lib()
    return _state["why"]


def usable(*tensors) -> bool:
    """The native kernels apply: the library loaded and every given tensor is a contiguous float32 /
    int32 CPU tensor (None entries are skipped)."""
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype in _DTYPES and t.is_contiguous()):
            return False
    return lib() is not None


def ptr(t: torch.Tensor | None, offset: int = 0):
    """The address of element ``offset`` of ``t`` (None for None)."""
    return None if t is None else t.data_ptr() + offset * t.element_size()


def _threads(work: int) -> int:
    return 1 if work < PARALLEL_MIN_WORK else max(1, min(torch.get_num_threads(), work // PARALLEL_MIN_WORK))


def parallel_for(bounds, fn, work: int) -> list:
    """``[fn(lo, hi) for each chunk]`` over ``bounds`` (a list of split points, e.g. from
    :func:`split`), on ``torch.get_num_threads()`` threads when ``work`` is large enough."""
    global _pool, _pool_size
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if len(chunks) == 1:
        return [fn(*chunks[0])]
    if _pool is None or _pool_size < len(chunks):
        _pool, _pool_size = ThreadPoolExecutor(len(chunks), thread_name_prefix="sparsetrain-native"), len(chunks)
    return list(_pool.map(lambda c: fn(*c), chunks))


def split(n: int, work: int, weights: torch.Tensor | None = None) -> list[int]:
    """Split points of ``range(n)`` into one chunk per thread (see :func:`parallel_for`);
    ``weights``: a CSR row-pointer tensor (n + 1 entries), to balance nonzeros instead of rows."""
    parts = min(_threads(work), max(n, 1))
    if parts == 1:
        return [0, n]
    if weights is None:
        return [n * i // parts for i in range(parts + 1)]
    w = weights.to(torch.int64)
    targets = torch.arange(parts + 1, dtype=torch.int64) * int(w[-1]) // parts
    pts = torch.searchsorted(w, targets).clamp_(max=n).tolist()
    pts[0], pts[-1] = 0, n
    return sorted(set(pts))


# ============================================================================ typed entry points
def csr_matmul_t(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, xt: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W @ xt (+ bias[:, None])`` for W in CSR (int32 ``crow``/``col``, float32 ``values``) and a
    contiguous ``xt`` of shape (in, N); returns (out, N). N = 1 runs the matrix-vector kernel."""
    rows, n = crow.numel() - 1, xt.shape[1]
    y = xt.new_empty(rows, n)
    so = lib()
    args = (ptr(crow), ptr(col), ptr(values), ptr(xt), ptr(bias), ptr(y))
    if n == 1:
        run = (lambda lo, hi: so.st_csr_mv(lo, hi, *args))
    else:
        run = (lambda lo, hi: so.st_csr_mm(lo, hi, n, *args))
    work = values.numel() * n // 8           # work units of split(): a vectorised FMA is ~8× cheaper than an xRDA entry
    parallel_for(split(rows, work, crow), run, work)
    return y


@contextlib.contextmanager
def disabled():
    """Inside the block every caller takes its torch path (for tests and comparisons)."""
    lib()
    saved = dict(_state)
    _state.update(lib=None, why="torch fallback: sparsetrain.native.disabled()")
    try:
        yield
    finally:
        _state.update(saved)
