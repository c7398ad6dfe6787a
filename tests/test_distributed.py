"""Multi-process training (DistributedDataParallel, gloo on CPU over loopback).

One pair of worker processes (launched like torchrun: RANK, WORLD_SIZE, MASTER_ADDR ... in the
environment) trains every method below on a tiny synthetic dataset and dumps each rank's
weights, optimizer state and method state; it also runs the CLI under DDP (a failing --out, a
NaN loss, a real run directory). The tests compare the ranks with each other (exactly) and with
one process on the same global batch (within float tolerance; sparsity exactly).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.data import TensorLoader
from sparsetrain.methods import METHODS
from sparsetrain.trainer import TrainConfig, Trainer, _flatten_tensors

# batch 45 over 2 ranks: shards of 23 and 22 samples, and a last batch of 25 (13 + 12), so the
# test also covers unequal shards
CFG = dict(model="lenet300", data="fashion-mnist", epochs=2, batch_size=45, train_subset=250,
           test_subset=100, device="cpu", progress=False, seed=3)
METHOD_OPTIONS = {
    "dense": {},
    "linbreg": {},
    "xrda": {},
    "rigl": {"sparsity": 0.8, "update_every": 2},
    "halo": {},
    "gmp": {"sparsity": 0.8, "prune_every": 2, "prune_end": 0.75},
}
AVAILABLE = {m: o for m, o in METHOD_OPTIONS.items() if m in METHODS}

WORKER = r"""
import contextlib, io, json, os, sys
import torch
import torch.distributed as tdist
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
rank, out = int(os.environ["RANK"]), spec["out"]
from sparsetrain.cli import main
from sparsetrain.trainer import TrainConfig, Trainer

def cli(argv):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(argv)
    return {"rc": rc, "err": err.getvalue(), "out": std.getvalue()}

result = {}
import datetime
tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # env://, as torchrun; the Trainers use it
for method, opts in spec["methods"].items():
    t = Trainer(TrainConfig(method=method, data_dir=spec["data_dir"], options=opts, **spec["cfg"]))
    s = t.run()
    torch.save({"model": t.model.state_dict(), "optimizer": t.strategy.optimizer.state_dict(),
                "strategy": t.strategy.state_dict(), "sparsity": s["sparsity"], "test_loss": s["test_loss"],
                "history": t.history}, f"{out}/{method}-rank{rank}.pt")
# a crash mid-epoch (on every rank, as torchrun stops them all), then --resume under DDP
from sparsetrain.methods import Strategy, register
crash = {"at": None}
class Crashy(Strategy):
    def after_step(self, step):
        if step == crash["at"]:
            raise KeyboardInterrupt
register("crashy", "test only")(lambda model, ctx: Crashy(model, torch.optim.SGD(model.parameters(), lr=ctx.cfg.lr, momentum=0.9)))
def crashy(**kw):
    return Trainer(TrainConfig(method="crashy", data_dir=spec["data_dir"], **{**spec["cfg"], "epochs": 3}, **kw))
def dump(t, name):
    torch.save({"model": t.model.state_dict(), "optimizer": t.strategy.optimizer.state_dict(),
                "history": t.history}, f"{out}/{name}-rank{rank}.pt")
t = crashy(); t.run(); dump(t, "uninterrupted")
crash["at"] = 8                                # epoch 2 of 3 (6 steps per epoch)
try:
    crashy(out=f"{out}/resume-run").run()
except KeyboardInterrupt:
    pass
crash["at"] = None
t = crashy(out=f"{out}/resume-run", resume=True); t.run(); dump(t, "resumed")
from sparsetrain import distributed as sd
try:                                           # a drift between ranks is detected on every rank
    sd.check_in_sync({"same": torch.ones(3), "drifted": torch.ones(3) * (1 + rank)})
    result["drift"] = None
except RuntimeError as e:
    result["drift"] = str(e)
def fails_on_rank_1():
    if rank == 1:
        raise OSError("disk on fire")
try:                                           # any failure on one rank stops every rank
    sd.agree(fails_on_rank_1)
    result["agree"] = None
except Exception as e:
    result["agree"] = [type(e).__name__, str(e)]
result["bad_out"] = cli(spec["bad_out"])      # rank 0 fails at --out: every rank must stop
result["nan"] = cli(spec["nan"])              # a NaN loss: every rank stops at the same step
# the CLI's group gets a port picked now by rank 0, not at launch: a port reserved at launch could
# be taken meanwhile as the local end of one of the first group's connections (EADDRINUSE in CI)
import socket
port2 = [None]
if rank == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port2[0] = s.getsockname()[1]
tdist.broadcast_object_list(port2, src=0)
tdist.barrier()
tdist.destroy_process_group()
os.environ["MASTER_PORT"] = str(port2[0])
result["cli"] = cli(spec["cli"])              # the CLI creates (and destroys) its own group
json.dump(result, open(f"{out}/result-rank{rank}.json", "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(idx_dir, out, *extra):
    return ["train", "--method", "dense", "--data-dir", str(idx_dir), "--epochs", "2", "--batch-size", "45",
            "--train-subset", "250", "--test-subset", "100", "--device", "cpu", "--seed", "3",
            "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ddp(idx_dir, tmp_path_factory):
    """Run the two workers once; return their output folder and per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "file").write_text("a regular file")
    spec = {"out": str(out), "data_dir": str(idx_dir), "cfg": CFG, "methods": AVAILABLE,
            "bad_out": train_argv(idx_dir, out / "file" / "run"),
            "nan": train_argv(idx_dir, out / "nan-run", "--lr", "1e12"),
            "cli": train_argv(idx_dir, out / "cli-run")}
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        with open(out / f"log-rank{rank}.txt", "w") as log:     # a file: a pipe could fill up and block
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    try:   # a rank that fails leaves its peer waiting in a collective: stop that one at once
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            assert time.monotonic() < deadline, "the workers did not finish in time"
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):   # show the rank that failed first (the others were stopped here: -9)
        rank = next((r for r, c in enumerate(codes) if c not in (0, -9)), codes.index(next(c for c in codes if c)))
        pytest.fail(f"worker exit codes {codes}; rank {rank}'s output:\n"
                    f"{(out / f'log-rank{rank}.txt').read_text()[-3000:]}")
    results = [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)]
    return out, results


def _load(path):
    return torch.load(path, weights_only=True)


def _tensors(prefix, obj, out):
    _flatten_tensors(prefix, obj, out)     # the trainer's own helper (its rank-sync check uses it)
    return out


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_two_processes_match_one_process(method, ddp, idx_dir):
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    out, _ = ddp
    r0, r1 = _load(out / f"{method}-rank0.pt"), _load(out / f"{method}-rank1.pt")
    # every rank holds identical weights, masks, optimizer state (xRDA averages, Bregman
    # subgradients ...) and method state (HALO scales, RigL masks, λ ...)
    a = _tensors("", {k: r0[k] for k in ("model", "optimizer", "strategy")}, {})
    b = _tensors("", {k: r1[k] for k in ("model", "optimizer", "strategy")}, {})
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"rank 0 and rank 1 differ in {k}"
    assert r0["sparsity"] == r1["sparsity"]
    strip = lambda hist: [{k: v for k, v in h.items() if k not in ("seconds", "train_seconds")} for h in hist]  # noqa: E731
    assert strip(r0["history"]) == strip(r1["history"])

    t = Trainer(TrainConfig(method=method, data_dir=str(idx_dir), options=dict(METHOD_OPTIONS[method]), **CFG))
    single = t.run()
    ref = t.model.state_dict()
    for k, w in ref.items():
        assert torch.allclose(r0["model"][k], w, rtol=1e-4, atol=1e-5), \
            f"{k}: max |2-proc − 1-proc| = {(r0['model'][k] - w).abs().max().item():.3g}"
        assert torch.equal(r0["model"][k] == 0, w == 0), f"{k}: zero pattern differs from the 1-process run"
    assert r0["sparsity"] == single["sparsity"]
    assert [h["sparsity"] for h in r0["history"]] == [h["sparsity"] for h in t.history]
    assert r0["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4, abs=1e-5)
    assert [h["train_loss"] for h in r0["history"]] == pytest.approx([h["train_loss"] for h in t.history],
                                                                     rel=1e-4, abs=1e-5)


def test_cli_under_ddp_writes_one_run_directory_like_one_process(ddp, idx_dir, tmp_path, capsys):
    out, results = ddp
    assert [r["cli"]["rc"] for r in results] == [0, 0]
    assert "test accuracy" in results[0]["cli"]["out"] and results[1]["cli"]["out"] == ""  # rank 0 prints
    run = out / "cli-run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    assert main(train_argv(idx_dir, tmp_path / "single")) == 0
    capsys.readouterr()
    a = _load(run / "checkpoint.pt")
    b = _load(tmp_path / "single" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k, w in b["model"].items():
        assert torch.allclose(a["model"][k], w, rtol=1e-4, atol=1e-5)
    sa = json.loads((run / "summary.json").read_text())
    sb = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert sa["sparsity"] == sb["sparsity"] and sa["test_accuracy"] == sb["test_accuracy"]


def test_resume_under_ddp_matches_an_uninterrupted_ddp_run(ddp):
    out, _ = ddp
    for rank in range(2):
        a, b = _load(out / f"resumed-rank{rank}.pt"), _load(out / f"uninterrupted-rank{rank}.pt")
        assert [h["epoch"] for h in a["history"]] == [1, 2, 3]
        for k in b["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), f"rank {rank}: {k}"
        assert [h["test_loss"] for h in a["history"]] == [h["test_loss"] for h in b["history"]]
    assert _load(out / "resume-run" / "checkpoint.pt")["epoch"] == 3


def test_a_failure_on_rank_0_stops_every_rank_with_one_message(ddp):
    _, results = ddp
    bad = [r["bad_out"] for r in results]
    assert [b["rc"] for b in bad] == [2, 2]                         # nobody hung in a collective
    assert "--out" in bad[0]["err"] and "not writable" in bad[0]["err"] and bad[0]["err"].count("\n") == 1
    assert bad[1]["err"] == ""                                      # rank 1 does not repeat it


def test_drift_between_ranks_is_detected_and_failures_are_shared(ddp):
    _, results = ddp
    for r in results:
        assert r["drift"] is not None and "drifted apart in drifted" in r["drift"] and "same" not in r["drift"]
    assert results[1]["agree"] == ["OSError", "disk on fire"]
    assert results[0]["agree"][0] == "RuntimeError" and "rank 1 failed (disk on fire)" in results[0]["agree"][1]


def test_nan_loss_stops_every_rank_at_the_same_step(ddp):
    out, results = ddp
    nan = [r["nan"] for r in results]
    assert [n["rc"] for n in nan] == [3, 3]
    assert "loss is nan at step" in nan[0]["err"] and nan[1]["err"] == ""
    assert not (out / "nan-run" / "summary.json").exists()


def test_augmented_batches_are_sharded_after_augmentation():
    """Each rank takes its positions of the global batch augmented as in one process."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, 8, 8, generator=g), torch.arange(50)
    one = list(TensorLoader(x, y, 20, shuffle=True, seed=1, augment=True))
    ranks = [list(TensorLoader(x, y, 20, shuffle=True, seed=1, augment=True, rank=r, world_size=2)) for r in (0, 1)]
    for (xb, yb), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(xb[0::2], x0) and torch.equal(xb[1::2], x1)
        assert torch.equal(yb[0::2], y0) and torch.equal(yb[1::2], y1)
