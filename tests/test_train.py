import json

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.errors import UsageError
from sparsetrain.methods import METHODS, Strategy, register
from sparsetrain.trainer import TrainConfig, Trainer, train

TINY = dict(model="lenet300", data="fashion-mnist", epochs=3, batch_size=64, progress=False)


def test_run_directory_files(idx_dir, tmp_path):
    out = tmp_path / "run"
    s = train(TrainConfig(method="dense", data_dir=str(idx_dir), out=str(out), **TINY))
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert set(lines[0]) >= {"epoch", "lr", "train_loss", "test_accuracy", "sparsity", "density", "seconds"}
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_accuracy"] == s["test_accuracy"]
    assert set(summary) >= {"sparsity", "density", "compression_ratio", "per_layer", "wall_seconds"}
    assert summary["test_accuracy"] > 0.5          # the synthetic classes are easy
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3
    assert json.loads((out / "config.json").read_text())["method"] == "dense"


def test_same_seed_same_result_different_seed_differs(idx_dir):
    a = train(TrainConfig(method="dense", data_dir=str(idx_dir), seed=1, **TINY))
    b = train(TrainConfig(method="dense", data_dir=str(idx_dir), seed=1, **TINY))
    c = train(TrainConfig(method="dense", data_dir=str(idx_dir), seed=2, **TINY))
    assert a["test_loss"] == b["test_loss"] and a["test_loss"] != c["test_loss"]


@pytest.fixture
def crashing_method():
    """``crashy``: dense SGD that raises KeyboardInterrupt at a chosen step (mid-epoch)."""
    state = {"crash_at": None}

    class Crashy(Strategy):
        def after_step(self, step):
            if step == state["crash_at"]:
                raise KeyboardInterrupt

    register("crashy", "test only")(lambda model, ctx: Crashy(model, torch.optim.SGD(
        model.parameters(), lr=ctx.cfg.lr, momentum=0.9)))
    yield state
    METHODS.pop("crashy")


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_resume_after_a_mid_epoch_crash_matches_uninterrupted(idx_dir, tmp_path, crashing_method, schedule):
    cfg = dict(method="crashy", data_dir=str(idx_dir), schedule=schedule, **TINY)
    ref = train(TrainConfig(out=str(tmp_path / "ref"), **cfg))
    crashing_method["crash_at"] = 15                   # epoch 2 of 3 (10 steps per epoch)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "run"), **cfg))
    done = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in done] == [1]            # the finished epoch was kept
    crashing_method["crash_at"] = None
    res = train(TrainConfig(out=str(tmp_path / "run"), resume=True, **cfg))
    assert res["test_loss"] == ref["test_loss"] and res["test_accuracy"] == ref["test_accuracy"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]


def test_existing_run_is_not_overwritten(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(method="dense", data_dir=str(idx_dir), out=str(out), **{**TINY, "epochs": 1}))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match="--resume"):
        Trainer(TrainConfig(method="dense", data_dir=str(idx_dir), out=str(out), **{**TINY, "epochs": 1}))
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_different_configuration(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(method="dense", data_dir=str(idx_dir), out=str(out), **{**TINY, "epochs": 1}))
    with pytest.raises(UsageError, match="--seed"):
        train(TrainConfig(method="dense", data_dir=str(idx_dir), out=str(out), resume=True, seed=5,
                          **{**TINY, "epochs": 1}))


@pytest.mark.parametrize("argv, field", [
    (["--method", "nope"], "--method"),
    (["--model", "alexnet"], "--model"),
    (["--data", "imagenet"], "--data"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--schedule", "linear"], "--schedule"),
    (["--device", "tpu"], "--device"),
    (["--data-dir", "/nonexistent"], "--data-dir"),
    (["--momentum", "1.5"], "--momentum"),
    (["--epochs", "two"], "--epochs"),
])
def test_bad_cli_input_is_one_line_exit_2(argv, field, capsys, tmp_path, idx_dir):
    base = ["train", "--method", "dense", "--data-dir", str(idx_dir), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_option_of_another_method_is_refused(capsys, idx_dir):
    METHODS["fake"] = METHODS["dense"].__class__("fake", "x", lambda m, c: None, 0.1,
                                                 (__import__("sparsetrain.methods.base", fromlist=["x"]).positive("zeta", 1.0, "z"),))
    try:
        assert main(["train", "--method", "dense", "--zeta", "2", "--data-dir", str(idx_dir)]) == 2
    finally:
        METHODS.pop("fake")
    assert "not an option of method dense" in capsys.readouterr().err


def test_cli_train_and_inspect(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "dense", "--data-dir", str(idx_dir), "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0.weight" in text or "1.weight" in text
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_user_dataset_and_dataloader():
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 4, 4, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    s = train(TrainConfig(method="dense", epochs=3, batch_size=32, progress=False),
              train_data=TensorDataset(x, y), test_data=DataLoader(TensorDataset(x, y), batch_size=64), model=net)
    assert s["test_accuracy"] > 0.8 and s["data"] == "custom"
