"""Bad input, table-driven: CLI flags, --config files, data directories, checkpoints, export files.

Every case must give exit code 2 and one line on stderr that names the problem and the allowed
values (no traceback), and must leave every existing run directory byte-for-byte as it was.
"""
import hashlib
import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsetrain import cli
from sparsetrain.cli import main

from conftest import Evil

try:
    from sparsetrain import export as _export
    HAS_EXPORT = hasattr(_export, "configure_parser") and hasattr(_export, "run_cli")
except ImportError:
    HAS_EXPORT = False

# words by which a message states what is allowed
ALLOWED_HINTS = ("allowed", "must be", "invalid", "its options", "expected")


def _idx(path: Path, array_shape: tuple, payload: bytes | None = None, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([len(array_shape)]) + struct.pack(f">{len(array_shape)}I", *array_shape)
    n = 1
    for d in array_shape:
        n *= d
    path.write_bytes(header + (payload if payload is not None else bytes(n)))


@pytest.fixture(scope="module")
def env(idx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    e = SimpleNamespace(root=root, idx=str(idx_dir), run=root / "run", n=0)
    assert main(["train", "--method", "dense", "--data-dir", e.idx, "--epochs", "1", "--batch-size", "64",
                 "--out", str(e.run), "--no-progress"]) == 0
    # runs whose checkpoint went bad (copies of the finished run)
    good = (e.run / "checkpoint.pt").read_bytes()
    bad_checkpoints = {
        "garbage": b"\x89 this is not a checkpoint \x00\x01",
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }
    for name, data in bad_checkpoints.items():
        shutil.copytree(e.run, root / f"ck-{name}")
        (root / f"ck-{name}" / "checkpoint.pt").write_bytes(data)
    for name, obj in {"list": [1, 2, 3], "nokeys": {"config": {}},
                      "shapes": {"model": {"1.weight": torch.zeros(2, 2)}, "config": {}}}.items():
        shutil.copytree(e.run, root / f"ck-{name}")
        torch.save(obj, root / f"ck-{name}" / "checkpoint.pt")
    shutil.copytree(e.run, root / "ck-code")
    torch.save({"model": Evil(root / "pwned")}, root / "ck-code" / "checkpoint.pt")
    shutil.copytree(e.run, root / "bad-summary")
    (root / "bad-summary" / "summary.json").write_text('{"method": "dense"')
    # data directories with one broken file each (copies of the synthetic dataset)
    for name in ("gz", "truncated", "magic", "counts"):
        shutil.copytree(idx_dir, root / f"data-{name}")
    (root / "data-gz" / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    (root / "data-truncated" / "t10k-images-idx3-ubyte").write_bytes(
        (root / "data-truncated" / "t10k-images-idx3-ubyte").read_bytes()[:5000])
    _idx(root / "data-magic" / "t10k-labels-idx1-ubyte", (200,), magic=b"\x00\x00\x0d")
    _idx(root / "data-counts" / "t10k-labels-idx1-ubyte", (150,))
    # config files
    configs = {
        "invalid.json": '{"epochs": 2,',
        "list.json": "[1, 2]",
        "unknown.json": '{"epoch": 2}',
        "string-int.json": '{"epochs": "3"}',
        "bool-int.json": '{"epochs": true}',
        "option-type.json": '{"momentum": "high"}',
        "milestones.json": '{"milestones": [0.5, "late"]}',
        "bad-lr.json": '{"lr": -1}',
        "bad-method.json": '{"method": "nope"}',
        "options-type.json": '{"options": [1]}',
        "binary.json": None,
    }
    for name, text in configs.items():
        if text is None:
            (root / name).write_bytes(b"\xff\xfe\x00garbage")
        else:
            (root / name).write_text(text)
    # export files
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    (root / "a-file").write_text("a regular file")
    return e


def train(e, *extra, out=None):
    """``train`` argv with a fresh --out (a new directory per case) unless ``out`` is given."""
    if out is None:
        e.n += 1
        out = e.root / f"new-{e.n}"
    return ["train", "--method", "dense", "--data-dir", e.idx, "--epochs", "1", "--batch-size", "64",
            "--no-progress", "--out", str(out), *extra]


def resume(e, name, *extra):
    return train(e, "--resume", *extra, out=e.root / name)


CASES = [
    # --- CLI flags
    ("method", lambda e: train(e, "--method", "nope"), ["--method", "'nope'", "allowed: ", "dense"]),
    ("model", lambda e: train(e, "--model", "alexnet"), ["--model", "allowed: ", "lenet300"]),
    ("data", lambda e: train(e, "--data", "imagenet"), ["--data", "allowed: ", "fashion-mnist"]),
    ("lr-negative", lambda e: train(e, "--lr", "-1"), ["--lr", "> 0"]),
    ("lr-nan", lambda e: train(e, "--lr", "nan"), ["--lr", "> 0"]),
    ("epochs-zero", lambda e: train(e, "--epochs", "0"), ["--epochs", "> 0"]),
    ("epochs-word", lambda e: train(e, "--epochs", "two"), ["--epochs", "invalid int value"]),
    ("batch-size", lambda e: train(e, "--batch-size", "-4"), ["--batch-size", "> 0"]),
    ("schedule", lambda e: train(e, "--schedule", "linear"), ["--schedule", "allowed: ", "cosine"]),
    ("device", lambda e: train(e, "--device", "tpu"), ["--device", "allowed: ", "cpu"]),
    ("val-fraction", lambda e: train(e, "--val-fraction", "1.5"), ["--val-fraction", "[0, 1)"]),
    ("gamma", lambda e: train(e, "--gamma", "0"), ["--gamma", "(0, 1]"]),
    ("milestones", lambda e: train(e, "--milestones", "0.5,1.5"), ["--milestones", "(0, 1)"]),
    ("milestones-word", lambda e: train(e, "--milestones", "half"), ["--milestones", "comma-separated numbers"]),
    ("weight-decay", lambda e: train(e, "--weight-decay", "-1"), ["--weight-decay", ">= 0"]),
    ("train-subset", lambda e: train(e, "--train-subset", "0"), ["--train-subset", "> 0"]),
    ("momentum", lambda e: train(e, "--momentum", "1.5"), ["--momentum", "[0, 1)"]),
    ("foreign-option", lambda e: train(e, "--sparsity", "0.5"), ["--sparsity", "method dense", "--momentum"]),
    ("init-denser-than-target", lambda e: train(e, "--method", "linbreg", "--sparsity", "0.98", "--init-density", "0.5"),
     ["--init-density", "0.5", "allowed: (0, 0.02]"]),
    # options that the rest of the command would silently ignore
    ("ramp-with-fixed-lam", lambda e: train(e, "--method", "proxsgd", "--lam", "1e-3", "--ramp", "0.5"),
     ["--ramp", "fixed --lam", "allowed: add --sparsity"]),
    ("distribution-with-fixed-lam", lambda e: train(e, "--method", "linbreg", "--lam", "0.1", "--distribution", "erk"),
     ["--distribution", "fixed --lam"]),
    ("ramp-with-fixed-c", lambda e: train(e, "--method", "grda", "--c", "1e-3", "--ramp", "0.5"),
     ["--ramp", "fixed --c"]),
    ("init-shape-with-dense-start", lambda e: train(e, "--method", "adabreg", "--lam", "1e-3", "--init-density", "1",
                                                    "--init-bias-scale", "5"),
     ["--init-bias-scale", "--init-density 1", "allowed: an --init-density below 1"]),
    ("halo-budget-without-budget", lambda e: train(e, "--method", "halo", "--halo-variant", "shared-sq",
                                                   "--halo-budget", "3"),
     ["--halo-budget", "shared-sq", "allowed: --halo-variant halo or shared"]),
    ("unknown-flag", lambda e: train(e, "--foo", "1"), ["unrecognized arguments: --foo", "--help"]),
    ("missing-value", lambda e: train(e, "--lr"), ["--lr", "expected one argument"]),
    # --- run directories
    ("out-holds-a-run", lambda e: train(e, out=e.run), ["--out", "already holds a run", "--resume"]),
    ("out-is-a-file", lambda e: train(e, out=e.root / "a-file"), ["--out", "not a directory", "allowed"]),
    ("out-below-a-file", lambda e: train(e, out=e.root / "a-file" / "run"), ["--out", "not writable", "allowed"]),
    ("resume-other-seed", lambda e: resume(e, "run", "--seed", "5"), ["--seed", "differs", "allowed: the original"]),
    ("resume-other-method", lambda e: resume(e, "run", "--method", "gmp"), ["--method", "differs", "'dense'"]),
    # --- config files
    ("config-missing", lambda e: train(e, "--config", str(e.root / "nope.json")), ["--config", "no such file"]),
    ("config-invalid-json", lambda e: train(e, "--config", str(e.root / "invalid.json")), ["--config", "not valid JSON"]),
    ("config-binary", lambda e: train(e, "--config", str(e.root / "binary.json")), ["--config", "UTF-8 JSON"]),
    ("config-not-object", lambda e: train(e, "--config", str(e.root / "list.json")), ["--config", "JSON object"]),
    ("config-unknown-key", lambda e: train(e, "--config", str(e.root / "unknown.json")),
     ["--config", "unknown key 'epoch'", "allowed: ", "epochs", "momentum"]),
    ("config-string-for-int", lambda e: train(e, "--config", str(e.root / "string-int.json")),
     ["--config", "epochs must be an integer", '"3"']),
    ("config-bool-for-int", lambda e: train(e, "--config", str(e.root / "bool-int.json")),
     ["--config", "epochs must be an integer", "true"]),
    ("config-option-type", lambda e: train(e, "--config", str(e.root / "option-type.json")),
     ["--config", "momentum must be a number"]),
    ("config-milestones", lambda e: train(e, "--config", str(e.root / "milestones.json")),
     ["--config", "milestones must be a list of numbers"]),
    ("config-options-type", lambda e: train(e, "--config", str(e.root / "options-type.json")),
     ["--config", "options must be an object"]),
    ("config-bad-lr", lambda e: train(e, "--config", str(e.root / "bad-lr.json")), ["--lr", "> 0"]),
    ("config-bad-method", lambda e: train(e, "--config", str(e.root / "bad-method.json"), "--method", "nope2"),
     ["--method", "'nope2'", "allowed: "]),            # the flag overrides the file
    # --- data directories
    ("data-dir-missing", lambda e: train(e)[:4] + [str(e.root / "no-such-dir")] + train(e)[5:],
     ["--data-dir", "allowed"]),
    ("data-not-gzip", lambda e: [*train(e)[:4], str(e.root / "data-gz"), *train(e)[5:]],
     ["train-labels-idx1-ubyte.gz", "unreadable", "allowed"]),
    ("data-truncated", lambda e: [*train(e)[:4], str(e.root / "data-truncated"), *train(e)[5:]],
     ["t10k-images-idx3-ubyte", "truncated", "allowed"]),
    ("data-bad-magic", lambda e: [*train(e)[:4], str(e.root / "data-magic"), *train(e)[5:]],
     ["t10k-labels-idx1-ubyte", "not an unsigned-byte IDX file", "allowed"]),
    ("data-count-mismatch", lambda e: [*train(e)[:4], str(e.root / "data-counts"), *train(e)[5:]],
     ["--data-dir", "counts differ", "allowed"]),
    # --- checkpoints (--resume)
    ("checkpoint-garbage", lambda e: resume(e, "ck-garbage"), ["checkpoint", "corrupt or truncated", "allowed"]),
    ("checkpoint-truncated", lambda e: resume(e, "ck-truncated"), ["checkpoint", "corrupt or truncated", "allowed"]),
    ("checkpoint-empty", lambda e: resume(e, "ck-empty"), ["checkpoint", "corrupt or truncated", "allowed"]),
    ("checkpoint-not-a-dict", lambda e: resume(e, "ck-list"), ["checkpoint", "not a sparsetrain checkpoint"]),
    ("checkpoint-missing-keys", lambda e: resume(e, "ck-nokeys"), ["--resume", "does not match this run", "no 'model' entry"]),
    ("checkpoint-wrong-shapes", lambda e: resume(e, "ck-shapes"), ["--resume", "does not match this run"]),
    ("checkpoint-with-code", lambda e: resume(e, "ck-code"), ["checkpoint", "refused: it contains code", "nothing was executed"]),
    # --- run summaries
    ("inspect-missing", lambda e: ["inspect", str(e.root / "nothing-here")], ["inspect", "no summary.json", "allowed"]),
    ("inspect-corrupt-summary", lambda e: ["inspect", str(e.root / "bad-summary")],
     ["inspect", "not a sparsetrain summary", "allowed"]),
]

EXPORT_CASES = [
    ("export-corrupt-file", lambda e: ["export", str(e.root / "corrupt.safetensors"), "--format", "dense",
                                       "--out", str(e.root / "new-export.safetensors")],
     ["export", "corrupt.safetensors", "cannot be read", "allowed"]),
    ("export-bad-format", lambda e: ["export", str(e.run), "--format", "zip"], ["--format", "allowed: ", "dense"]),
    ("export-not-a-run", lambda e: ["export", str(e.root / "nothing-here"), "--format", "dense"], ["RUN_DIR"]),
]


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the fresh per-case output directories."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.relative_to(root).parts[0].startswith("new-")}


def _check(env, capsys, argv, needles):
    before = _snapshot(env.root)
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, f"exit code {rc}; stderr: {err}"
    assert err.startswith("sparsetrain: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert any(h in err for h in ALLOWED_HINTS), f"no allowed values in: {err}"
    assert _snapshot(env.root) == before, "an existing run directory was modified"
    for new in env.root.glob("new-*"):        # nothing half-written where a run was to start
        assert not new.is_dir() or not list(new.iterdir()), list(new.iterdir())
    assert not (env.root / "pwned").exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input(env, capsys, argv, needles):
    _check(env, capsys, argv(env), needles)


@pytest.mark.skipif(not HAS_EXPORT, reason="`sparsetrain export` is not there yet")
@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in EXPORT_CASES])
def test_bad_export_input(env, capsys, argv, needles):
    _check(env, capsys, argv(env), needles)


def test_config_file_values_are_used_and_flags_override_them(env, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method": "dense", "epochs": 3, "batch-size": 100, "seed": 7,
                               "options": {"momentum": 0.5}, "weight_decay": 0.001, "milestones": [0.25, 0.5]}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data-dir", env.idx, "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    written = json.loads((out / "config.json").read_text())
    assert written["epochs"] == 1                       # the flag wins over the file
    assert written["batch_size"] == 100 and written["seed"] == 7 and written["weight_decay"] == 0.001
    assert written["options"] == {"momentum": 0.5} and written["milestones"] == [0.25, 0.5]


def test_an_explicit_flag_equal_to_its_default_still_overrides_the_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 5, "batch_size": 32}')
    args = cli.build_parser().parse_args(argv := ["train", "--config", str(cfg), "--epochs", "20"])
    args.explicit = cli._explicit_train_flags(argv)
    c = cli.config_from_args(args)
    assert c.epochs == 20 and c.batch_size == 32
