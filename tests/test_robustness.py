"""Crash safety: kill -9 and resume, torn checkpoint writes, NaN losses, unwritable or full --out,
and checkpoints that would run code when unpickled."""
import errno
import io
import json
import os
import pickle
import signal
from collections import namedtuple

import pytest
import torch

import sparsetrain.trainer as train_mod
from sparsetrain.checkpoint import load_checkpoint, save_checkpoint
from sparsetrain.cli import main
from sparsetrain.errors import UsageError
from sparsetrain.methods import METHODS, Strategy, register

from conftest import Evil, live_run


def train_argv(idx_dir, out, *extra, epochs=3):
    return ["train", "--method", "dense", "--data-dir", str(idx_dir), "--epochs", str(epochs),
            "--batch-size", "64", "--out", str(out), "--no-progress", *extra]


def summary_without_timing(run):
    s = json.loads((run / "summary.json").read_text())
    s.pop("wall_seconds")
    s.pop("epoch_seconds", None)
    return s


def metrics_without_timing(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# --------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(idx_dir, tmp_path, capsys):
    epochs = 20
    run, ref = tmp_path / "run", tmp_path / "ref"
    # bit-identity holds per thread count: the killed run fixes its count (recorded in config.json),
    # --resume takes it over, the reference uses the same; OMP_NUM_THREADS alone did not fix it on
    # every machine (16 cores, torch 2.11)
    with live_run(train_argv(idx_dir, run, "--threads", "2", epochs=epochs), run, env={"OMP_NUM_THREADS": "1"},
                  timeout=180) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()                 # it really died mid-run
    assert 1 <= len((run / "metrics.jsonl").read_text().splitlines()) < epochs

    assert main(train_argv(idx_dir, run, "--resume", epochs=epochs)) == 0
    assert json.loads((run / "config.json").read_text())["threads"] == 2
    assert main(train_argv(idx_dir, ref, "--threads", "2", epochs=epochs)) == 0
    capsys.readouterr()
    assert summary_without_timing(run) == summary_without_timing(ref)
    assert metrics_without_timing(run) == metrics_without_timing(ref)
    assert not list(run.glob(".*.tmp"))


class Killed(BaseException):
    """Stands for the process dying (nothing after it runs)."""


def test_resume_without_a_checkpoint_says_it_starts_the_run(idx_dir, tmp_path, capsys):
    """A run killed before its first checkpoint (or a mistyped --out) is started afresh, and
    --resume says so instead of passing a new run off as a continued one."""
    run = tmp_path / "run"
    assert main(train_argv(idx_dir, run, "--resume", "--train-subset", "128", epochs=1)) == 0
    err = capsys.readouterr().err
    assert "--resume" in err and "holds no checkpoint yet" in err and "from epoch 1" in err, err
    assert (run / "summary.json").is_file()


def test_a_crash_inside_the_atomic_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def torn_save(obj, f):   # half of the new file is on disk when the process dies
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise Killed

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temp file left behind


def test_temp_files_left_by_a_kill_do_not_break_resume(idx_dir, tmp_path, capsys):
    """A kill -9 inside a write leaves ``.checkpoint.pt.XXXX.tmp`` behind (no cleanup runs)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(train_argv(idx_dir, ref, epochs=2)) == 0
    assert main(train_argv(idx_dir, run, epochs=2)) == 0
    (run / "summary.json").unlink()
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 torn")
    (run / ".metrics.jsonl.k1ll3d.tmp").write_bytes(b'{"epoch": 9')
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert main(train_argv(idx_dir, run, "--resume", epochs=2)) == 0
    capsys.readouterr()
    assert not list(run.glob(".*.tmp"))
    assert summary_without_timing(run) == summary_without_timing(ref)


def test_a_kill_between_the_last_checkpoint_and_metrics_is_repaired_by_resume(idx_dir, tmp_path, monkeypatch, capsys):
    run, ref = tmp_path / "run", tmp_path / "ref"
    real = train_mod.Trainer._write_metrics

    def dies_after_the_last_checkpoint(self):
        if len(self.history) == 2:
            raise Killed
        real(self)

    monkeypatch.setattr(train_mod.Trainer, "_write_metrics", dies_after_the_last_checkpoint)
    with pytest.raises(Killed):
        main(train_argv(idx_dir, run, epochs=2))
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(train_argv(idx_dir, run, "--resume", epochs=2)) == 0
    assert main(train_argv(idx_dir, ref, epochs=2)) == 0
    capsys.readouterr()
    assert metrics_without_timing(run) == metrics_without_timing(ref)
    assert summary_without_timing(run) == summary_without_timing(ref)


def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(idx_dir, tmp_path, monkeypatch, capsys):
    run, ref = tmp_path / "run", tmp_path / "ref"
    real_save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:                     # the second epoch's checkpoint: ENOSPC mid-write
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(train_argv(idx_dir, run)) == 2
    one_line_error(capsys, "--out", "No space left on device", "--resume")
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp")) and not (run / "summary.json").exists()
    assert main(train_argv(idx_dir, run, "--resume")) == 0
    assert main(train_argv(idx_dir, ref)) == 0
    assert summary_without_timing(run) == summary_without_timing(ref)


# --------------------------------------------------------------------------- NaN / inf
@pytest.fixture
def poisoned_method():
    """``poisoned``: dense SGD whose loss becomes ``state['value']`` at step ``state['at']``."""
    state = {"at": 15, "value": float("nan")}

    class Poisoned(Strategy):
        step = 0

        def penalty(self):
            return torch.tensor(state["value"]) if self.step == state["at"] else None

        def after_step(self, step):
            self.step = step + 1

    register("poisoned", "test only")(lambda model, ctx: Poisoned(model, torch.optim.SGD(model.parameters(), lr=ctx.cfg.lr)))
    yield state
    METHODS.pop("poisoned")


@pytest.mark.parametrize("value, word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_non_finite_loss_stops_with_exit_3_naming_the_step(idx_dir, tmp_path, capsys, poisoned_method, value, word):
    poisoned_method["value"] = value
    run = tmp_path / "run"
    argv = train_argv(idx_dir, run)
    argv[argv.index("dense")] = "poisoned"
    assert main(argv) == 3                     # 600 samples / 64 = 10 steps per epoch: step 15 is in epoch 2
    one_line_error(capsys, f"loss is {word} at step 15 (epoch 2)", "last good checkpoint")
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "summary.json").exists()


# --------------------------------------------------------------------------- unusable --out
def test_out_below_a_regular_file_is_refused_before_training(idx_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(train_argv(idx_dir, tmp_path / "file" / "run")) == 2
    one_line_error(capsys, "--out", "not writable", "allowed")


def test_read_only_out_is_refused_before_training(idx_dir, tmp_path, capsys, monkeypatch):
    # tests run as root, where chmod does not stop writes: fail the probe write instead
    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(train_mod.Path, "write_bytes", read_only)
    assert main(train_argv(idx_dir, tmp_path / "run")) == 2
    one_line_error(capsys, "--out", "Read-only file system")
    assert not list((tmp_path / "run").iterdir())


def test_a_full_disk_is_refused_before_training(idx_dir, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", lambda *a: pytest.fail("training started"))
    assert main(train_argv(idx_dir, tmp_path / "run")) == 2
    one_line_error(capsys, "--out", "MiB free", "allowed")
    assert not list((tmp_path / "run").iterdir())


# --------------------------------------------------------------------------- no code in checkpoints
def _crafted(path, marker, kind):
    obj = {"epoch": 1, "model": Evil(marker), "config": {}}
    if kind == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
@pytest.mark.parametrize("forced", [False, True])
def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch, kind, forced):
    if forced:   # a user's environment asking torch to unpickle everything does not change that
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "checkpoint.pt", marker, kind)
    with pytest.raises(UsageError, match="refused: it contains code .*; nothing was executed"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_resume_refuses_a_crafted_checkpoint(idx_dir, tmp_path, capsys, kind):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    _crafted(run / "checkpoint.pt", marker, kind)
    before = (run / "checkpoint.pt").read_bytes()
    assert main(train_argv(idx_dir, run, "--resume")) == 2
    one_line_error(capsys, "checkpoint", "refused")
    assert not marker.exists()
    assert (run / "checkpoint.pt").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
