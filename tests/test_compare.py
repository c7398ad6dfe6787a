"""``sparsetrain compare``: runs, results.json / results.md / plots, resuming, --report, bad input."""
import json
import re
import shutil
import sys

import pytest

from sparsetrain.cli import main
from sparsetrain.compare import compare
from sparsetrain.trainer import Trainer

# 600 samples at batch 16, 3 epochs: 114 steps, enough for LinBreg's λ controller to land on its target
SMALL = dict(epochs=3, batch_size=16, train_subset=600, test_subset=100)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def done(idx_dir, tmp_path_factory):
    """One finished compare: dense + gmp + linbreg at 2 targets, 2 seeds (10 runs)."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    lines = []
    results = compare(["dense", "gmp", "linbreg"], [0.9, 0.95], model="lenet300", data="fashion-mnist", seeds=2,
                      out=out, data_dir=str(idx_dir), log=lines.append, **SMALL)
    return out, results, lines


def test_runs_results_and_progress_lines(done):
    out, results, lines = done
    names = {"dense-seed0", "dense-seed1"} | {f"{m}-s{t}-seed{k}" for m in ("gmp", "linbreg")
                                             for t in ("0.9", "0.95") for k in (0, 1)}
    assert {p.name for p in (out / "runs").iterdir()} == names
    assert all((out / "runs" / n / "summary.json").is_file() for n in names)
    assert sorted(results["executed"]) == sorted(names) and results["skipped"] == []
    progress = [l for l in lines if l.startswith("[")]
    assert len(progress) == 10
    for l in progress:
        assert re.fullmatch(r"\[\d+/10\] (dense|gmp \d\.\d+|linbreg \d\.\d+) seed [01]: acc \d\.\d{4}  "
                            r"sparsity \d\.\d{4}  \(\d+\.\ds\)", l), l

    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True and data["failed"] == [] and len(data["runs"]) == 10
    assert data["settings"]["methods"] == ["dense", "gmp", "linbreg"] and data["settings"]["seeds"] == 2
    for run in data["runs"]:
        assert set(run) >= {"method", "target", "seed", "dir", "test_accuracy", "sparsity", "density", "epochs",
                            "wall_seconds", "per_layer"}
        if run["method"] != "dense":             # each seed lands near its target, not just the mean;
            # 0.01: LinBreg's budget controller on 114 steps lands within 0.005 here (torch 2.13) but was
            # seen 0.0072 off on torch 2.11 (16 cores); target_met records the 0.005 verdict either way
            assert abs(run["sparsity"] - run["target"]) < 0.01, run
            assert run["target_met"] == (abs(run["sparsity"] - run["target"]) <= 0.005), run
        assert run["epochs"] == SMALL["epochs"]
    aggs = {(a["method"], a["target"]): a for a in data["aggregates"]}
    assert set(aggs) == {("dense", None), ("gmp", 0.9), ("gmp", 0.95), ("linbreg", 0.9), ("linbreg", 0.95)}
    assert aggs["dense", None]["reference"] and aggs["dense", None]["n"] == 2
    for (method, target), a in aggs.items():
        accs = [r["test_accuracy"] for r in data["runs"] if r["method"] == method and r["target"] == target]
        assert a["test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
        assert a["test_accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        if target is not None:
            assert abs(a["sparsity_mean"] - target) < 0.01
        assert a["epoch_seconds_mean"] > 0               # training time of an epoch, × dense
        assert a["epoch_time_vs_dense"] == pytest.approx(a["epoch_seconds_mean"] / aggs["dense", None]["epoch_seconds_mean"])

    md = (out / "results.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| method")]
    assert len(rows) == 5 and rows[0].startswith("| dense (reference) | — |")
    for method in ("gmp", "linbreg"):
        for target in ("90", "95"):
            row = next(r for r in rows if r.startswith(f"| {method} | {target} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert abs(float(cells[2].split()[0]) - float(target)) < 1.0  # achieved sparsity, % (⚠ if missed)
            assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cells[3])       # accuracy mean ± std
            assert cells[5] == str(SMALL["epochs"]) and cells[6].endswith(" s")
            assert re.fullmatch(r"\d+\.\d\d s \(\d+\.\d\d×\)", cells[7])          # epoch time (× dense)
    for png in ("pareto.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_interrupted_compare_resumes_and_skips_finished_runs(idx_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a run: exit 130; the same command then skips the finished runs
    and continues the interrupted one from its checkpoint."""
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "dense,imp", "--sparsity", "0.5", "--seeds", "2", "--epochs", "2",
            "--batch-size", "32", "--train-subset", "64", "--test-subset", "32", "--data-dir", str(idx_dir),
            "--out", str(out), "--set", "imp.levels=2", "--set", "dense.momentum=0.5", "--set", "dense.lr=0.05"]
    real = Trainer.train_epoch

    def crash_in_seed1_epoch2(self, epoch):
        if self.cfg.method == "dense" and self.cfg.seed == 1 and epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_seed1_epoch2)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the same command again" in err[0]
    stopped = out / "runs" / "dense-seed1"
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "summary.json").exists()
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and len(partial["runs"]) == 2
    assert "Partial results: 2 of 4 runs" in (out / "results.md").read_text()

    monkeypatch.setattr(Trainer, "train_epoch", real)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(2 runs trained, 2 done earlier)" in text and "resumed" in text
    assert text.count("(done earlier)") == 2
    metrics = (stopped / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in metrics] == [1, 2]
    config = json.loads((stopped / "config.json").read_text())
    assert config["options"]["momentum"] == 0.5 and config["lr"] == 0.05
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True and len(data["runs"]) == 4
    imp = [r for r in data["runs"] if r["method"] == "imp"]
    assert all(r["epochs"] == 4 for r in imp)             # 2 levels × 2 epochs, counted and shown
    md = (out / "results.md").read_text()
    assert "| imp | 50 |" in md and "4 (2× budget)" in md

    # a third time: nothing left to train
    assert main(argv) == 0
    assert "(0 runs trained, 4 done earlier)" in capsys.readouterr().out


def test_deleted_summary_is_rerun_alone(done, tmp_path, idx_dir):
    src, _, _ = done
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    (out / "runs" / "linbreg-s0.95-seed1" / "summary.json").unlink()        # finished, summary lost
    shutil.rmtree(out / "runs" / "gmp-s0.9-seed0")                          # never started
    lines = []
    results = compare("dense,gmp,linbreg", "0.9,0.95", seeds=2, out=out, data_dir=str(idx_dir),
                      log=lines.append, plots=False, **SMALL)
    assert sorted(results["executed"]) == ["gmp-s0.9-seed0", "linbreg-s0.95-seed1"]
    assert len(results["skipped"]) == 8
    assert (out / "runs" / "linbreg-s0.95-seed1" / "summary.json").is_file()
    assert sum("(done earlier)" in l for l in lines) == 8


def test_other_settings_into_the_same_out_are_refused(done, tmp_path, capsys, idx_dir):
    src, _, _ = done
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    before = sorted(p.name for p in (out / "runs").iterdir())
    data_dir = str(idx_dir)
    same = ["--batch-size", "16", "--train-subset", "600", "--test-subset", "100", "--data-dir", data_dir]
    rc = main(["compare", "--methods", "dense,gmp", "--sparsity", "0.9", "--seeds", "1", "--epochs", "2", *same,
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "epochs=3" in err[0] and "another --out" in err[0]
    rc = main(["compare", "--methods", "dense,gmp", "--sparsity", "0.9", "--seeds", "1", "--epochs", "3", *same,
               "--out", str(out), "--set", "gmp.momentum=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "gmp-s0.9-seed0 holds a run with momentum=0.9" in err[0], err
    assert sorted(p.name for p in (out / "runs").iterdir()) == before


def test_a_run_from_before_an_option_existed_is_not_reused(done, tmp_path, capsys, idx_dir):
    """A run whose config.json lacks an option (added to sparsetrain after it ran) trained without
    it: reusing it would put an old method's number into the table."""
    src, _, _ = done
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    config = out / "runs" / "gmp-s0.9-seed0" / "config.json"
    old = json.loads(config.read_text())
    del old["options"]["momentum"]
    config.write_text(json.dumps(old))
    rc = main(["compare", "--methods", "dense,gmp", "--sparsity", "0.9", "--seeds", "1", "--epochs", "3",
               "--batch-size", "16", "--train-subset", "600", "--test-subset", "100", "--data-dir", str(idx_dir),
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "gmp-s0.9-seed0 holds a run from a sparsetrain without --momentum" in err[0] and "another --out" in err[0]


def test_report_rerenders_without_training(done, tmp_path, monkeypatch, capsys):
    src, _, _ = done
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    md = (out / "results.md").read_text()
    for name in ("results.md", "pareto.png", "layers.png"):
        (out / name).unlink()
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("--report must not train"))
    assert main(["compare", "--report", str(out)]) == 0
    assert (out / "results.md").read_text() == md
    assert (out / "pareto.png").read_bytes()[:8] == PNG and (out / "layers.png").read_bytes()[:8] == PNG

    # without matplotlib: one warning line, no plots, still exit 0
    (out / "pareto.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    capsys.readouterr()
    assert main(["compare", "--report", str(out)]) == 0
    warn = [l for l in capsys.readouterr().out.splitlines() if "matplotlib" in l]
    assert len(warn) == 1 and "skipped pareto.png and layers.png" in warn[0]
    assert not (out / "pareto.png").exists()


BAD = [
    (["--methods", "dense,nope"], ["--methods", "unknown method 'nope'", "allowed:", "linbreg"]),
    (["--methods", ","], ["--methods", "required"]),
    (["--methods", "gmp", "--sparsity", "1.0"], ["--sparsity", "[0, 1)"]),
    (["--methods", "gmp", "--sparsity", "0.9,-0.1"], ["--sparsity", "[0, 1)"]),
    (["--methods", "gmp", "--sparsity", "0.9,abc"], ["--sparsity", "'abc'"]),
    (["--methods", "gmp", "--sparsity", ""], ["--sparsity", "at least one target"]),
    (["--methods", "gmp", "--seeds", "0"], ["--seeds", "[1, 1000]"]),
    (["--methods", "gmp", "--seeds", "-2"], ["--seeds", "[1, 1000]"]),
    (["--methods", "gmp", "--seeds", "two"], ["--seeds", "invalid int"]),
    (["--methods", "gmp", "--epochs", "0"], ["--epochs", "> 0"]),
    (["--methods", "gmp", "--batch-size", "0"], ["--batch-size", "> 0"]),
    (["--methods", "gmp", "--model", "nope"], ["--model", "allowed:", "lenet300"]),
    (["--methods", "gmp", "--data", "nope"], ["--data", "allowed:", "fashion-mnist"]),
    (["--methods", "gmp", "--device", "tpu"], ["--device", "allowed:", "cpu"]),
    (["--methods", "gmp", "--set", "gmp.momentum"], ["--set", "METHOD.OPTION=VALUE"]),
    (["--methods", "gmp", "--set", "momentum=0.5"], ["--set", "METHOD.OPTION=VALUE"]),
    (["--methods", "gmp", "--set", "gmp.delta=1"], ["--set gmp.delta=1", "not an option of method gmp", "momentum"]),
    (["--methods", "gmp", "--set", "rigl.momentum=0.5"], ["--set", "not compared", "gmp"]),
    (["--methods", "gmp", "--set", "nope.momentum=0.5"], ["--set", "unknown method 'nope'"]),
    (["--methods", "gmp", "--set", "gmp.momentum=abc"], ["--set gmp.momentum=abc", "expected a number"]),
    (["--methods", "gmp", "--set", "gmp.momentum=2"], ["--momentum", "in [0, 1)"]),
    (["--methods", "gmp", "--set", "gmp.prune_every=1.5"], ["--set", "expected an integer"]),
    (["--methods", "gmp", "--set", "gmp.sparsity=0.5"], ["--set", "--sparsity"]),
    (["--methods", "gmp", "--set", "gmp.lr=-1"], ["--lr", "> 0"]),
    (["--methods", "gmp", "--set", "gmp.schedule=nope"], ["--schedule", "allowed:", "cosine"]),
    (["--methods", "gmp", "--train-subset", "0"], ["--train-subset", "> 0"]),
    (["--methods", "gmp", "--data-dir", "/nonexistent/dir"], ["--data-dir", "allowed:"]),
    (["--methods", "gmp", "--bogus"], ["unrecognized arguments", "--bogus"]),
]


@pytest.mark.parametrize("args, needles", BAD, ids=[" ".join(a[2:]) or a[1] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_before_anything_runs(args, needles, tmp_path, capsys, idx_dir):
    out = tmp_path / "cmp"
    argv = ["compare", *args, "--epochs", "1", "--out", str(out)]
    if "--data-dir" not in args:
        argv += ["--data-dir", str(idx_dir)]
    if "--epochs" in args:                     # the case's own value comes last: argparse keeps it
        argv = ["compare", "--epochs", "1", *args, "--out", str(out), "--data-dir", str(idx_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsetrain: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists()                   # validated before anything was created or trained


@pytest.mark.parametrize("argv, needles", [
    (["compare", "--out", "x"], ["--methods", "required"]),
    (["compare", "--methods", "gmp"], ["--out", "required"]),
    (["compare", "--report", "/nonexistent/cmp"], ["--report", "no results.json", "allowed:"]),
])
def test_missing_required_and_bad_report(argv, needles, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_bad_results_file_for_report(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"runs": 3}')
    assert main(["compare", "--report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a compare's results file" in err[0]


def test_a_diverged_run_is_reported_and_the_compare_goes_on(idx_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--methods", "dense,gmp", "--sparsity", "0.5", "--seeds", "1", "--epochs", "1",
               "--batch-size", "32", "--train-subset", "64", "--test-subset", "32", "--data-dir", str(idx_dir),
               "--out", str(out), "--set", "dense.lr=1e30"])
    captured = capsys.readouterr()
    assert rc == 3
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "dense-seed0" in err[0] and "diverged" in err[0]
    assert "dense seed 0: diverged: loss is" in captured.out
    data = json.loads((out / "results.json").read_text())
    assert [f["name"] for f in data["failed"]] == ["dense-seed0"] and data["complete"] is False
    assert [r["name"] for r in data["runs"]] == ["gmp-s0.5-seed0"]               # the compare went on
    md = (out / "results.md").read_text()
    assert "Diverged runs" in md and "- dense-seed0: loss is" in md and "| gmp | 50 |" in md


def test_a_dead_run_is_reported_as_dead_not_as_diverged(idx_dir, tmp_path, monkeypatch, capsys):
    import torch.nn as nn
    import sparsetrain.trainer as trainer

    def dead_mlp(*a, **k):
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32, bias=False), nn.ReLU(), nn.Linear(32, 10))
        nn.init.zeros_(net[1].weight)
        return net
    monkeypatch.setattr(trainer, "build_model", dead_mlp)
    out = tmp_path / "cmp"
    rc = main(["compare", "--methods", "dense", "--seeds", "1", "--epochs", "1", "--batch-size", "16",
               "--train-subset", "96", "--test-subset", "32", "--data-dir", str(idx_dir), "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "dense-seed0" in err[0]
    assert "dead network" in err[0] and "NaN" not in err[0]
    assert "1 dead)" in captured.out
    md = (out / "results.md").read_text()
    assert "dead networks" in md and json.loads((out / "results.json").read_text())["failed"][0]["reason"] == "dead"
