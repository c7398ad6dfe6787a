"""A hostile review's repros, table-driven: each row runs the CLI (or the Python API) the way a
new user would and checks the exit code and the one line that explains it.

Rows were collected from paths where a run lost data, reported a wrong result as success, or
ended in a traceback; each failed before the fix. CLI rows: ``(id, argv(env), exit code,
needles)``; ``patch(env, monkeypatch)`` in a row prepares a fault (a full disk, Ctrl-C or SIGTERM
inside a checkpoint write). API rows: ``(id, call(env), needles)``, which must raise a UsageError
whose message names the Python argument.
"""
import errno
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import sparsetrain.checkpoint as checkpoint_mod
from sparsetrain import train
from sparsetrain.cli import main
from sparsetrain.compare import markdown
from sparsetrain.controller import BudgetController, SparsityController
from sparsetrain.errors import UsageError
from sparsetrain.methods.base import Strategy
from sparsetrain.optim import XRDA, LinBreg
from sparsetrain.params import param_groups
from sparsetrain.regularizers import L1, GroupL12
from sparsetrain.runlock import RunLock

from conftest import Evil, live_run, write_idx

TINY = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--train-subset", "256", "--test-subset", "128"]


@pytest.fixture(scope="module")
def env(idx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    e = SimpleNamespace(root=root, idx=idx_dir, n=0)
    e.run = root / "run"                                  # a finished dense run (lr 0.1, momentum 0.9)
    assert main(["train", "--method", "dense", "--data-dir", str(idx_dir), "--out", str(e.run), *TINY]) == 0
    # data directories, each a copy of the synthetic IDX dataset with one file changed
    def data(name, file=None, content=None):
        d = root / f"data-{name}"
        shutil.copytree(idx_dir, d)
        if file is not None:
            for old in d.glob(file.split(".")[0] + "*"):
                old.unlink()
            if content is not None:
                (d / file).write_bytes(content)
        return d
    e.incomplete = data("incomplete", "t10k-labels-idx1-ubyte")
    empty = struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 0)
    e.empty = data("empty", "t10k-labels-idx1-ubyte", empty)
    write_idx(e.empty / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), gz=False)
    e.labels = data("labels", "t10k-labels-idx1-ubyte",
                    struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 200) + bytes([42] * 200))
    e.size = data("size", "t10k-images-idx3-ubyte",
                  struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", 200, 32, 32) + bytes(200 * 32 * 32))
    good = gzip.compress(b"\0" * 4096)
    e.deflate = data("deflate", "train-labels-idx1-ubyte.gz", good[:10] + b"\xff" * 40 + good[50:])
    e.dims = data("dims", "t10k-labels-idx1-ubyte", struct.pack(">BBBB", 0, 0, 8, 200) + b"\0" * 12)
    e.fifo = data("fifo", "t10k-labels-idx1-ubyte")
    os.mkfifo(e.fifo / "t10k-labels-idx1-ubyte")
    # a CIFAR-10 batch with a label out of range
    e.cifar = root / "cifar" / "cifar-10-batches-py"
    e.cifar.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        with open(e.cifar / name, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 99]}, f)
    # config files
    (root / "deep.json").write_text('{"options":' * 100000 + "{}" + "}" * 100000)
    (root / "nested.json").write_text('{"options": {"options": {"momentum": 0.5}}}')
    # checkpoints: a plain pickle that would run code (not torch's format)
    shutil.copytree(e.run, root / "ck-pickle")
    (root / "ck-pickle" / "checkpoint.pt").write_bytes(pickle.dumps({"model": Evil(root / "pwned")}))
    # a run whose checkpoint holds NaN weights (written by hand: train no longer writes one)
    shutil.copytree(e.run, root / "nan-run")
    ck = torch.load(root / "nan-run" / "checkpoint.pt", weights_only=True)
    next(iter(ck["model"].values()))[0] = float("nan")
    torch.save(ck, root / "nan-run" / "checkpoint.pt")
    # exports: sizes that do not fit the file, metadata of the wrong type
    e.huge = _export(root / "huge.safetensors", {"w": {"shape": [8192, 8192], "dtype": "float32", "coding": "gaps"}})
    e.in_shape = _export(root / "in-shape.safetensors", {}, in_shape='["a", 28, 28]')
    e.classes = _export(root / "classes.safetensors", {}, num_classes='"ten"')
    # a run summary with a value of the wrong type
    shutil.copytree(e.run, root / "bad-summary")
    s = json.loads((e.run / "summary.json").read_text())
    (root / "bad-summary" / "summary.json").write_text(json.dumps({**s, "test_accuracy": "high"}))
    return e


def _export(path, codings, in_shape="[1, 28, 28]", num_classes="10"):
    from safetensors.torch import save_file
    tensors = {}
    for name in codings:
        tensors[f"{name}.__values"] = torch.zeros(0)
        tensors[f"{name}.__gaps"] = torch.zeros(0, dtype=torch.uint8)
    if not tensors:
        tensors = {"1.weight": torch.zeros(300, 784)}
        codings = {"1.weight": {"shape": [300, 784], "dtype": "float32", "coding": "dense"}}
    save_file(tensors, str(path), metadata={"sparsetrain_format": "compressed", "format_version": "1",
                                            "model": "lenet300", "in_shape": in_shape, "num_classes": num_classes,
                                            "codings": json.dumps(codings)})
    return path


def train_argv(e, *extra, data=None, out=None):
    if out is None:
        e.n += 1
        out = e.root / f"new-{e.n}"
    return ["train", "--method", "dense", "--data-dir", str(data or e.idx), "--out", str(out), *TINY, *extra]


def resume(e, *extra):
    return train_argv(e, "--resume", *extra, out=e.run)


def _failing_writes(exc_or_fn):
    """A patch: writes of more than 64 KiB to run-directory files (the checkpoint, not the JSON)
    raise ``exc`` (or call ``fn``) half-way."""
    def patch(e, monkeypatch):
        real = checkpoint_mod.atomic_write

        def atomic_write(path, write):
            def failing(f):
                class Half:
                    def write(self, data):
                        if len(data) > 1 << 16:
                            f.write(bytes(data)[: len(data) // 2])
                            if callable(exc_or_fn) and not isinstance(exc_or_fn, BaseException):
                                exc_or_fn()
                            else:
                                raise exc_or_fn
                        return f.write(data)

                    def flush(self):
                        f.flush()
                write(Half())
            return real(path, failing)
        monkeypatch.setattr(checkpoint_mod, "atomic_write", atomic_write)
    return patch


def _nan_weights(e, monkeypatch):
    def end_epoch(self, epoch, trainer):
        with torch.no_grad():
            next(self.model.parameters())[0, 0] = float("nan")
    monkeypatch.setattr(Strategy, "end_epoch", end_epoch)


def _lock(e, monkeypatch):
    target = e.root / "locked"
    target.mkdir(exist_ok=True)
    e.lock = RunLock(target)                       # another live run writes there


# (id, argv, exit code, needles in the one stderr line, patch or None)
CLI = [
    # --- silent loss or wrong results
    ("second-writer-on-out", lambda e: train_argv(e, out=e.root / "locked"), 2,
     ["--out", "in use by another running sparsetrain process", f"pid {os.getpid()}"], _lock),
    ("resume-other-lr", lambda e: resume(e, "--lr", "0.5"), 2, ["--resume", "--lr", "0.5 now", "0.1 saved"], None),
    ("resume-other-option", lambda e: resume(e, "--momentum", "0.5"), 2, ["--momentum", "0.5 now", "0.9 saved"], None),
    ("data-dir-incomplete", lambda e: train_argv(e, data=e.incomplete), 2,
     ["--data-dir", "lacks t10k-labels-idx1-ubyte"], None),
    ("non-finite-weights-never-checkpointed", lambda e: train_argv(e), 3,
     ["epoch 1", "non-finite values", "last good checkpoint is kept"], _nan_weights),
    ("max-factor-inf", lambda e: train_argv(e, "--method", "xrda", "--max-factor", "inf"), 2,
     ["--max-factor", "finite number"], None),
    ("missed-target-is-reported", lambda e: train_argv(e, "--method", "xrda", "--sparsity", "0.9"), 0,
     ["warning", "missing its target 0.9", "target_met: false"], None),
    # --- tracebacks and wrong exit codes
    ("disk-full-in-torch-save", lambda e: train_argv(e), 2, ["--out", "cannot write", "No space left"],
     _failing_writes(OSError(errno.ENOSPC, "No space left on device"))),
    ("ctrl-c-in-torch-save", lambda e: train_argv(e), 130, ["interrupted", "--resume"],
     _failing_writes(KeyboardInterrupt())),
    ("sigterm-in-torch-save", lambda e: train_argv(e), 143, ["terminated", "--resume"],
     _failing_writes(lambda: os.kill(os.getpid(), signal.SIGTERM))),
    ("lr-overflow", lambda e: train_argv(e, "--lr", "1e308"), 2, ["--lr", "<= 1e+30"], None),
    ("seed-overflow", lambda e: train_argv(e, "--seed", "100000000000000000000"), 2, ["--seed", "[0, 4294967295]"], None),
    ("exclude-not-a-regex", lambda e: train_argv(e, "--method", "xrda", "--exclude", "("), 2,
     ["--exclude", "regular expression"], None),
    ("device-mps-missing", lambda e: train_argv(e, "--device", "mps"), 2, ["--device", "MPS is not available"], None),
    ("val-fraction-leaves-nothing", lambda e: train_argv(e, "--val-fraction", "0.99999999"), 2,
     ["--val-fraction", "none to train on"], None),
    ("data-empty-idx", lambda e: train_argv(e, data=e.empty), 2, ["hold no samples"], None),
    ("data-labels-out-of-range", lambda e: train_argv(e, data=e.labels), 2, ["labels range over [42, 42]", "[0, 9]"], None),
    ("data-cifar-labels-out-of-range", lambda e: train_argv(e, "--data", "cifar10", "--model", "lenet5",
                                                            data=e.cifar.parent), 2, ["labels range over", "[0, 9]"], None),
    ("data-images-other-size", lambda e: train_argv(e, data=e.size), 2, ["shape (200, 32, 32)", "28×28"], None),
    ("data-corrupt-deflate", lambda e: train_argv(e, data=e.deflate), 2, ["train-labels-idx1-ubyte.gz", "unreadable"], None),
    ("data-malformed-idx-dims", lambda e: train_argv(e, data=e.dims), 2, ["malformed IDX header"], None),
    ("data-fifo", lambda e: train_argv(e, data=e.fifo), 2, ["not a regular file"], None),
    ("config-deeply-nested", lambda e: train_argv(e, "--config", str(e.root / "deep.json")), 2,
     ["--config", "nested too deeply"], None),
    ("config-nested-options", lambda e: train_argv(e, "--config", str(e.root / "nested.json")), 2,
     ["--config", "options inside options"], None),
    ("imp-levels-huge", lambda e: train_argv(e, "--method", "imp", "--levels", "1000000000"), 2,
     ["--levels", "[2, 100]"], None),
    ("compare-seeds-huge", lambda e: ["compare", "--methods", "gmp", "--seeds", "1000000000", "--data-dir",
                                      str(e.idx), "--out", str(e.root / "new-cmp")], 2, ["--seeds", "[1, 1000]"], None),
    ("export-declares-more-than-it-holds", lambda e: ["export", str(e.huge), "--format", "dense", "--out",
                                                      str(e.root / "new-x.safetensors")], 2,
     ["declare 67,108,864 elements", "refused before allocating"], None),
    ("export-in-shape-not-numbers", lambda e: ["export", str(e.in_shape), "--format", "dense", "--out",
                                               str(e.root / "new-y.safetensors")], 2, ["in_shape", "positive integers"], None),
    ("export-num-classes-not-a-number", lambda e: ["export", str(e.classes), "--format", "dense", "--out",
                                                   str(e.root / "new-z.safetensors")], 2,
     ["num_classes", "positive integer"], None),
    ("export-of-nan-weights", lambda e: ["export", str(e.root / "nan-run"), "--format", "dense", "--out",
                                         str(e.root / "new-nan.safetensors")], 2, ["non-finite values"], None),
    ("inspect-malformed-summary", lambda e: ["inspect", str(e.root / "bad-summary")], 2,
     ["inspect", "not a sparsetrain summary"], None),
    ("out-empty", lambda e: train_argv(e)[:-len(TINY) - 1] + [""] + TINY, 2, ["--out", "not empty"], None),
    ("weight-decay-huge", lambda e: train_argv(e, "--weight-decay", "1e9"), 2, ["--weight-decay", "< 1"], None),
    ("delta-huge", lambda e: train_argv(e, "--method", "linbreg", "--delta", "1e9"), 2, ["--delta", "<= 100"], None),
    ("init-density-tiny", lambda e: train_argv(e, "--method", "linbreg", "--init-density", "1e-9"), 2,
     ["--init-density", "[0.0001, 1]"], None),
    ("checkpoint-plain-pickle-with-code", lambda e: train_argv(e, "--resume", out=e.root / "ck-pickle"), 2,
     ["refused: it contains code", "nothing was executed"], None),
]


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _xrda_past_total_steps(e):
    net = _net()
    opt = XRDA(net.parameters(), lr=0.1, lam=1e-4, total_steps=2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 16)).sum().backward()
        opt.step()


def _budget_on_dense_start(e):
    net = _net()
    opt = LinBreg(param_groups(net, L1(1e-3)), lr=0.1)
    c = BudgetController(opt, net, 0.95, total_steps=10)
    net(torch.randn(4, 16)).sum().backward()
    opt.step()
    c.update(0)


def _sparse_gradients(e):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = LinBreg(emb.parameters(), lr=0.1, reg=L1(1e-3))
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


def _zero_size_layer(e):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 0), nn.Linear(0, 10))
    train(model=net, method="dense", data_dir=str(e.idx), epochs=1, progress=False, out=str(e.root / "new-zero"),
          train_subset=64, test_subset=64)


# (id, call, needles): the call must raise a UsageError naming the Python argument
API = [
    ("xrda-lam-differs-from-the-groups", lambda e: XRDA(param_groups(_net(), L1(0.05)), lr=0.1, lam=1e-6),
     ["lam:", "lam=1e-06", "λ=0.05"]),
    ("xrda-group-regularizer", lambda e: XRDA(param_groups(_net(), GroupL12(1e-3)), lr=0.1, lam=1e-3),
     ["reg:", "GroupL12 would be ignored", "mode="]),
    ("xrda-past-total-steps", _xrda_past_total_steps, ["total_steps:", "more than total_steps=2"]),
    ("budget-controller-dense-start", _budget_on_dense_start, ["BudgetController", "starts at density", "denser than the target 0.0500"]),
    ("sparsity-controller-on-linbreg", lambda e: SparsityController(
        LinBreg(param_groups(_net(), L1(1e-3)), lr=0.1), _net(), 0.9, total_steps=10),
     ["optimizer:", "BudgetController"]),
    ("sparse-gradients", _sparse_gradients, ["params:", "dense gradients"]),
    ("zero-size-layer", _zero_size_layer, ["model:", "zero-size", "3.weight (0, 8)"]),
    ("sparsity-as-string", lambda e: train(method="gmp", sparsity="0.9", data_dir=str(e.idx)),
     ["sparsity: must be of type float", "'0.9'"]),
    ("epochs-as-string", lambda e: train(method="dense", epochs="3", data_dir=str(e.idx)),
     ["epochs: must be of type int", "'3'"]),
]


def test_the_table_covers_the_review():
    assert len(CLI) + len(API) >= 40


@pytest.mark.parametrize("argv, code, needles, patch", [pytest.param(*r[1:], id=r[0]) for r in CLI])
def test_cli(env, capsys, monkeypatch, argv, code, needles, patch):
    if patch is not None:
        patch(env, monkeypatch)
    if "--device" in (args := argv(env)) and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert rc == code, f"exit code {rc}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if out is not None and out.is_dir():
        assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
        if code == 3:
            assert not (out / "checkpoint.pt").exists(), "a non-finite state was checkpointed"
    assert not (env.root / "pwned").exists()


@pytest.mark.parametrize("call, needles", [pytest.param(*r[1:], id=r[0]) for r in API])
def test_api(env, call, needles):
    with pytest.raises(UsageError) as info:
        call(env)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"


# ----------------------------------------------------------------------------- beyond the table
def test_a_live_run_owns_its_directory_and_a_killed_one_does_not(env, capsys):
    """While a run is alive a second writer is refused; after kill -9 the kernel has dropped the
    lock, and --resume (here extending the run by one epoch) goes on."""
    out = env.root / "owned"
    argv = ["train", "--method", "dense", "--data-dir", str(env.idx), "--out", str(out), "--epochs", "500",
            "--batch-size", "64", "--no-progress", "--train-subset", "128", "--test-subset", "64", "--threads", "1"]
    with live_run(argv, out) as proc:
        capsys.readouterr()
        assert main(argv) == 2                                     # no --resume: refused anyway
        assert main([*argv, "--resume"]) == 2                      # the same run, but alive elsewhere
        err = capsys.readouterr().err
        assert err.count("in use by another running sparsetrain process") == 2, err
        proc.kill()
        proc.wait(timeout=60)
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert main([*argv[:argv.index("--epochs") + 1], str(done + 1), *argv[argv.index("--epochs") + 2:],
                 "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == done + 1
    assert not (out / ".lock").exists()


def test_resume_may_extend_a_finished_run_and_keeps_its_thread_count(env, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--method", "dense", "--data-dir", str(env.idx), "--out", str(out), "--batch-size", "64",
            "--no-progress", "--train-subset", "256", "--test-subset", "128"]
    assert main([*base, "--epochs", "1", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 1                            # the caller's count is restored
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["threads"] == 2 and config["epochs"] == 2
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert main([*base, "--epochs", "1", "--resume"]) == 2         # fewer epochs than done
    assert "--epochs 1 is fewer than the 2 epochs" in capsys.readouterr().err


def test_compare_marks_a_missed_target():
    run = dict(method="xrda", target=0.9, seed=0, test_accuracy=0.8, sparsity=0.0018, density=0.9982, epochs=1,
               wall_seconds=1.0, per_layer=[], target_met=False)
    text = markdown({"settings": {"methods": ["xrda"], "sparsities": [0.9], "seeds": 1, "epochs": 1},
                     "runs": [run], "complete": True})
    row = next(l for l in text.splitlines() if l.startswith("| xrda"))
    assert "0.18 ⚠ missed" in row and "⚠ missed: at least one seed" in text


def test_a_tampered_native_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    from sparsetrain import native
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))
    import hashlib

    def rebuilt_cleanly():
        path = native._build(native._compiler())
        data = path.read_bytes()
        record = Path(str(path) + ".sha256").read_text()
        return not data.endswith(b"planted") and hashlib.sha256(data).hexdigest() in record

    first = native._build(native._compiler())
    first.write_bytes(first.read_bytes() + b"planted")            # same name, other content
    assert rebuilt_cleanly()                                       # checked against its .sha256: rebuilt
    Path(str(first) + ".sha256").unlink()                          # no record: not trusted either
    first.write_bytes(first.read_bytes() + b"planted")
    assert rebuilt_cleanly()


def test_a_native_library_writable_by_others_is_rebuilt_not_refused(tmp_path, monkeypatch):
    from sparsetrain import native
    if native._compiler() is None or not hasattr(os, "getuid"):
        pytest.skip("no C compiler / no POSIX owners")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))
    first = native._build(native._compiler())
    first.chmod(0o666)                                             # anyone could have replaced it
    again = native._build(native._compiler())                      # rebuilt in our private directory
    assert again == first and not again.stat().st_mode & 0o022


@pytest.mark.parametrize("argv, needle", [(["--models", "nosuch"], "--model: unknown value 'nosuch'"),
                                          (["--models", "lenet5", "--methods", "bogus"], "--methods: unknown method"),
                                          (["--models", "lenet5", "--sparsity", "0.9,x"], "--sparsity: '0.9,x'"),
                                          (["--models", "lenet5", "--sparsity", "1.5"], "--sparsity")])
def test_conv_nets_benchmark_bad_input_is_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    """benchmarks/conv_nets.py ended in a UsageError traceback (e.g. an --out another run holds)."""
    bench = _conv_nets_benchmark(monkeypatch, tmp_path, argv)
    assert bench.cli() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("conv_nets: error: ") and needle in err and "\n" not in err


def _conv_nets_benchmark(monkeypatch, tmp_path, argv):
    """benchmarks/conv_nets.py as a module, with ``argv`` (the sweep preset into ``tmp_path``)."""
    import importlib.util
    import sys
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "conv_nets.py"
    spec = importlib.util.spec_from_file_location("conv_nets_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["conv_nets.py", "--preset", "sweep", "--out", str(tmp_path), *argv])
    return bench


@pytest.mark.parametrize("accuracy, sparsity, code", [(0.85, 0.9, 0), (0.11, 0.9, 1), (0.85, 0.87, 1)])
def test_conv_nets_benchmark_fails_on_a_flagged_cell(accuracy, sparsity, code, tmp_path, monkeypatch, capsys):
    """A cell at chance or off its target was flagged in the table, and the benchmark still exited 0."""
    bench = _conv_nets_benchmark(monkeypatch, tmp_path, ["--models", "lenet5", "--sparsity", "0.9"])
    cell = dict(reference=False, target=0.9, test_accuracy_mean=0.86, sparsity_mean=0.9, wall_seconds_mean=1.0)
    cells = [{**cell, "method": "gmp"}, {**cell, "method": "halo", "test_accuracy_mean": accuracy,
                                         "sparsity_mean": sparsity}]
    monkeypatch.setattr(bench, "compare", lambda *a, **k: {"aggregates": cells, "failed": []})
    assert bench.cli() == code
    err = capsys.readouterr().err
    assert ("cell(s) flagged: lenet5 halo 90 %" in err) == (code == 1)



def test_mask_transplant_trains_the_mask_of_a_run_and_refuses_what_is_not_a_run(idx_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """benchmarks/mask_transplant.py: a run's support trained again from a fresh init (README,
    LeNet-300-100 at 98 %)."""
    import importlib.util
    import sys
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mask_transplant.py"
    spec = importlib.util.spec_from_file_location("mask_transplant_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "gmp"
    assert main(["train", "--method", "gmp", "--sparsity", "0.9", "--data-dir", str(idx_dir), "--epochs", "1",
                 "--train-subset", "128", "--out", str(run), "--no-progress"]) == 0
    row = bench.train_mask(run, lr=0.1, epochs=1, seed=0)
    assert row["method"] == "gmp" and abs(row["density"] - 0.1) < 1e-3 and 0 <= row["mask_accuracy"] <= 1
    capsys.readouterr()
    moved = tmp_path / "moved"                 # a run whose data directory is gone
    shutil.copytree(run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**cfg, "data_dir": str(tmp_path / "gone")}))
    for argv in ([str(tmp_path / "nothing")], [str(idx_dir)], [str(moved)], [str(run), "--epochs", "0"],
                 [str(run), "--lr", "nan"]):
        monkeypatch.setattr(sys, "argv", ["mask_transplant.py", *argv])
        assert bench.main() == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mask_transplant: error: ") and "\n" not in err
