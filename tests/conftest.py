"""Shared fixtures: tiny synthetic datasets in the original file formats (IDX, CIFAR pickles),
and helpers for the crash and hostile-input tests."""
import contextlib
import gzip
import os
import pickle
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run on a GPU machine: pytest -m cuda)")


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def class_images(n: int, seed: int, side: int = 28, channels: int = 0):
    """Images whose class is drawn as a bright horizontal band (easy to learn), plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    shape = (n, side, side) if not channels else (n, channels, side, side)
    x = rng.integers(0, 60, shape)
    band = side // 10
    for i, c in enumerate(y):
        x[i, ..., c * band:(c + 1) * band, :] += 180
    return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """A Fashion-MNIST-shaped IDX dataset: 600 train and 200 test images."""
    d = tmp_path_factory.mktemp("fmnist")
    xtr, ytr = class_images(600, 0)
    xte, yte = class_images(200, 1)
    write_idx(d / "train-images-idx3-ubyte", xtr)
    write_idx(d / "train-labels-idx1-ubyte", ytr)
    write_idx(d / "t10k-images-idx3-ubyte", xte, gz=False)
    write_idx(d / "t10k-labels-idx1-ubyte", yte, gz=False)
    return d


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    d.mkdir()
    for name, seed in (("data_batch_1", 0), ("test_batch", 1)):
        x, y = class_images(64, seed, side=32, channels=3)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x.reshape(64, -1), b"labels": [int(v) for v in y]}, f)
    return d.parent


def close(a, b, tol: float = 1e-6) -> bool:
    """``a`` equals the reference ``b``: same shape, to ``tol`` relative to ``b``'s scale (float32
    sums in another order differ ~1e-7)."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def check_every_format(export, x, ref, tol: float) -> dict:
    """For each export format: ``path = export(fmt)``, reload it with ``load_export`` and check
    its output on ``x`` against ``ref`` (:func:`close` to ``tol``). Returns {format: file bytes}."""
    from sparsetrain.export import FORMATS, load_export
    sizes = {}
    for fmt in FORMATS:
        path = export(fmt)
        sizes[fmt] = path.stat().st_size
        with torch.no_grad():
            assert close(load_export(path)(x), ref, tol), fmt
    return sizes


def crash_and_resume(monkeypatch, out_dir, args, strategy_cls, crash_step):
    """Run ``sparsetrain`` ``args`` uninterrupted into ``out_dir/ref``; run them again into
    ``out_dir/run`` with ``strategy_cls.after_step`` raising KeyboardInterrupt at ``crash_step``
    (mid-epoch), then ``--resume`` it. Returns the two summaries (reference, resumed)."""
    import json

    from sparsetrain.cli import main
    assert main([*args, "--out", str(out_dir / "ref")]) == 0
    original = strategy_cls.after_step

    def crash(self, step):
        original(self, step)
        if step == crash_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(strategy_cls, "after_step", crash)
    assert main([*args, "--out", str(out_dir / "run")]) == 130
    monkeypatch.setattr(strategy_cls, "after_step", original)
    assert main([*args, "--out", str(out_dir / "run"), "--resume"]) == 0
    return tuple(json.loads((out_dir / d / "summary.json").read_text()) for d in ("ref", "run"))


class Evil:
    """Unpickling this creates ``marker`` (an attacker's code would run there instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@contextlib.contextmanager
def live_run(argv, out, env=None, timeout=120):
    """``python -m sparsetrain *argv`` in a subprocess (stdout discarded, stderr piped), yielded
    once ``out/metrics.jsonl`` holds a finished epoch; killed on exit if still alive. ``env``:
    variables added to the environment (CUDA is always hidden)."""
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrain", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.002)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
