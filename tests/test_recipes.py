"""Recipes (``sparsetrain train --recipe NAME``): the seed papers' configurations load, type-check,
are overridden by --config and flags, and each one runs for one epoch on a tiny synthetic subset."""
import json
import re

import pytest

from sparsetrain import cli
from sparsetrain.cli import main
from sparsetrain.models import build_model
from sparsetrain.params import prunable_weights
from sparsetrain.recipes import RECIPES_DIR, available, find_recipe, load_recipe
from sparsetrain.trainer import TrainConfig

NAMES = ["cifar10-resnet18-adabreg", "cifar10-resnet56-xrda", "cifar10-resnet56-xrda-authors", "cifar10-vgg16-halo",
         "fmnist-convnet-linbreg"]


def _config(argv):
    args = cli.build_parser().parse_args(argv)
    args.explicit = cli._explicit_train_flags(argv)
    return cli.config_from_args(args)


def test_every_recipe_is_found_and_valid():
    assert set(NAMES) <= set(available())
    for name in NAMES:
        assert find_recipe(name) == RECIPES_DIR / f"{name}.json"
        values, opts = load_recipe(name)
        cfg = TrainConfig(**values, options=opts).validate()       # every option known and in range
        assert cfg.method in name and cfg.model in name.replace("fmnist", "")


@pytest.mark.parametrize("name, expect", [
    ("fmnist-convnet-linbreg", dict(method="linbreg", model="convnet", data="fashion-mnist", lr=0.07, epochs=100,
                                    reg="conv-group", groups="kernels", lam=0.5, delta=1.0, init_density=0.01,
                                    init_scale=10.0)),
    ("cifar10-resnet18-adabreg", dict(method="adabreg", model="resnet18", data="cifar10", lr=1e-3, epochs=100,
                                      reg="conv-group", groups="kernels", lam=0.1, init_density=0.01)),
    ("cifar10-vgg16-halo", dict(method="halo", model="vgg16", data="cifar10", lr=0.1, epochs=160, xi=1e-8, psi=1e-8,
                                weight_decay=1e-4, schedule="step", milestones=(0.5, 0.75), gamma=0.1,
                                sparsity=0.95)),
    ("cifar10-resnet56-xrda", dict(method="xrda", model="resnet56", data="cifar10", lr=1.0, tau=9.5, tau_b=9.5,
                                   weight_decay=5e-4, max_factor=500.0, lam=1e-6)),
    ("cifar10-resnet56-xrda-authors", dict(method="xrda", model="resnet56", data="cifar10", lr=0.25, tau=12.37,
                                           tau_b=12.37, weight_decay=5e-4, lam=1.3e-6, epochs=600)),
])
def test_recipe_holds_the_papers_values(name, expect):
    cfg = _config(["train", "--recipe", name])
    for key, value in expect.items():
        got = cfg.options[key] if key in cfg.options else getattr(cfg, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got)


def test_resnet18_recipe_keeps_exactly_the_last_fc_dense():
    _, opts = load_recipe("cifar10-resnet18-adabreg")
    names = [n for n, _ in prunable_weights(build_model("resnet18", (3, 32, 32), 10))]
    assert [n for n in names if re.search(opts["exclude"], n)] == ["fc.weight"]


def test_config_file_and_flags_override_the_recipe(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.05, "lam": 0.25, "epochs": 7}))
    cfg = _config(["train", "--recipe", "fmnist-convnet-linbreg", "--config", str(tmp_path / "c.json"),
                   "--epochs", "3", "--delta", "2"])
    assert (cfg.lr, cfg.epochs, cfg.model) == (0.05, 3, "convnet")         # config > recipe; flag > both
    assert cfg.options["lam"] == 0.25 and cfg.options["delta"] == 2.0 and cfg.options["init_scale"] == 10.0
    # a flag equal to its default still wins over the recipe
    assert _config(["train", "--recipe", "cifar10-vgg16-halo", "--batch-size", "128", "--lr", "0.1",
                    "--epochs", "20"]).epochs == 20


def test_recipe_by_path_and_from_the_environment(tmp_path, monkeypatch):
    mine = tmp_path / "mine.json"
    mine.write_text('{"method": "gmp", "epochs": 2, "sparsity": 0.8}')
    cfg = _config(["train", "--recipe", str(mine)])
    assert (cfg.method, cfg.epochs, cfg.options["sparsity"]) == ("gmp", 2, 0.8)
    monkeypatch.setenv("SPARSETRAIN_RECIPES", str(tmp_path))
    assert available()["mine"] == mine and _config(["train", "--recipe", "mine"]).method == "gmp"


@pytest.mark.parametrize("recipe, needles", [
    ("nope", ["--recipe", "unknown recipe 'nope'", "allowed:", "fmnist-convnet-linbreg"]),
    ("{dir}/missing.json", ["--recipe", "no such file", "allowed:"]),
    ("{dir}/bad-key.json", ["--recipe", "unknown key 'epoch'", "allowed:"]),
    ("{dir}/bad-json.json", ["--recipe", "not valid JSON"]),
])
def test_bad_recipe_is_one_line_exit_2(recipe, needles, tmp_path, capsys):
    (tmp_path / "bad-key.json").write_text('{"epoch": 3}')
    (tmp_path / "bad-json.json").write_text('{"epochs": ')
    assert main(["train", "--recipe", recipe.format(dir=tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", NAMES)
def test_recipe_smoke_one_epoch_on_a_tiny_subset(name, tmp_path, idx_dir, cifar_dir, capsys):
    data_dir = idx_dir if name.startswith("fmnist") else cifar_dir
    out = tmp_path / "run"
    assert main(["train", "--recipe", name, "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
                 "--data-dir", str(data_dir), "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    values, opts = load_recipe(name)
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 1 and config["train_subset"] == 64              # the flags won
    assert all(config[k] == v for k, v in values.items() if k not in ("epochs", "milestones"))
    assert all(config["options"][k] == v for k, v in opts.items())
    assert summary["method"] == values["method"] and 0 <= summary["test_accuracy"] <= 1
    if "sparsity" in opts:                                                    # HALO prunes to its target
        assert summary["sparsity"] == pytest.approx(opts["sparsity"], abs=1e-4)
