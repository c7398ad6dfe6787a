"""A user's own nn.Module end to end: train to a target sparsity, inspect, every export format,
structural shrink through torch.fx (skip connection kept), reload in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import sparsetrain
from conftest import check_every_format
from sparsetrain.errors import UsageError
from sparsetrain.export import (FORMATS, export_model, export_run, inspect_exports, load_export, load_run,
                                magnitude_prune, shrink)
from sparsetrain.export.graph import trace


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Not an nn.Sequential: a stem, one residual block (skip connection), a pooled MLP head."""

    def __init__(self, width: int = 8, hidden: int = 24, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = ResidualBlock(width, hidden)
        self.fc1 = nn.Linear(width * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:                     # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc(x)


def synthetic(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c:2 * c + 2] += 1.5           # the class is a bright band
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("user-model") / "run"
    torch.manual_seed(0)
    summary = sparsetrain.train(model=TinyResNet(width=8, hidden=24), model_args={"width": 8, "hidden": 24},
                                train_data=synthetic(256, 0), test_data=synthetic(64, 1), method="gmp",
                                sparsity=0.9, epochs=3, batch_size=32, out=str(out), progress=False)
    return out, summary


def test_run_records_the_user_model(run_dir):
    out, summary = run_dir
    assert abs(summary["sparsity"] - 0.9) < 0.005 and summary["test_accuracy"] > 0.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == f"{__name__}:TinyResNet" == summary["model"]
    entry = json.loads((out / "model.json").read_text())
    assert entry["args"] == {"width": 8, "hidden": 24} and entry["in_shape"] == [1, 8, 8]
    assert entry["num_classes"] == 4 and entry["architecture"]["type"] == "Graph"


def test_load_run_by_class_and_by_architecture(run_dir, monkeypatch):
    out, _ = run_dir
    by_class, info = load_run(out)
    assert type(by_class) is TinyResNet and info["in_shape"] == [1, 8, 8]
    monkeypatch.delitem(sys.modules, __name__)           # as in a process that never imported it
    by_graph, _ = load_run(out)
    assert isinstance(by_graph, torch.fx.GraphModule)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(by_graph(x), by_class(x), atol=1e-6)


def test_every_format_exports_and_shrunk_is_smaller(run_dir):
    out, _ = run_dir
    model, _ = load_run(out)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    sizes = check_every_format(lambda fmt: export_run(out, fmt), x, ref, 1e-5)
    shrunk = load_export(out / "model.shrunk.safetensors")
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert params(shrunk) < params(model)
    assert sizes["shrunk"] < sizes["dense"] and sizes["compressed"] < sizes["dense"]
    from sparsetrain.export import macs
    assert macs(shrunk, (1, 8, 8)) < macs(model, (1, 8, 8))        # fewer multiply-adds: faster


def test_inspect_and_export_cli(run_dir, capsys):
    from sparsetrain.cli import main
    out, _ = run_dir
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TinyResNet" in text and "not measured" not in text
    for fmt in FORMATS:
        assert fmt in text
    assert main(["export", str(out), "--format", "sparse", "--out", str(out / "cli.sparse.safetensors")]) == 0
    assert main(["inspect", str(out / "cli.sparse.safetensors")]) == 0
    assert "sparse" in capsys.readouterr().out


def test_shrunk_export_reloads_in_a_fresh_process(run_dir):
    out, _ = run_dir
    model, _ = load_run(out)
    path = export_run(out, "shrunk", out / "fresh.safetensors")
    x = torch.randn(3, 1, 8, 8)
    torch.save(x, out / "x.pt")
    with torch.no_grad():
        ref = model(x)
    code = ("import sys, torch; from sparsetrain.export import load_export; "
            "m = load_export(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "print(repr(m(x).detach().flatten().tolist()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-c", code, str(path), str(out / "x.pt")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    got = torch.tensor(eval(res.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, ref.flatten(), atol=1e-5)


def test_graph_shrink_keeps_the_skip_connection_and_outputs():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():
        model.block.conv1.weight[:10] = 0                 # dead filters inside the residual body
        model.block.bn1.bias.uniform_(-1, 1)              # ... whose constant output still counts
        model.block.bn1.running_mean.uniform_(-1, 1)
        model.stem.weight[:3] = 0                         # dead stem filters: they meet the add, kept
        model.fc1.weight[:20] = 0
    magnitude_prune(model, 0.5)
    gm, report = shrink(model, (1, 8, 8))
    kept = {r["layer"]: r["kept"] for r in report}
    assert kept["block.conv1"] <= 14 and kept["fc1"] <= 44
    assert kept["stem"] == 8 and kept["block.conv2"] == 8          # the residual stream is never cut
    assert any(n.target is torch.ops.aten.add.Tensor or getattr(n.target, "__name__", "") == "add"
               for n in gm.graph.nodes)
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert float((gm(x) - model(x)).abs().max()) <= 1e-5


class CatMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


class Inception(nn.Module):
    """Two conv branches and the input concatenated (dense-net style), BatchNorm after the
    concatenation, then a pooled, flattened head; and a concatenation used twice (never cut)."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(13)
        self.mix = nn.Conv2d(13, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.b1(x), x, self.b2(x)], 1)))
        z = F.relu(self.mix(y))
        both = torch.cat([self.c1(z), self.c2(z)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(both + both.mean(), 2), 1))


def test_concatenation_is_cut_where_safe():
    torch.manual_seed(0)
    m = CatMLP().eval()
    with torch.no_grad():
        m.a.weight[:2] = 0                       # dead inputs, constant outputs relu(bias) folded
        m.out.weight[:, 7] = 0                   # b's unit 2 is never read
    gm, report = shrink(m)
    assert {r["layer"]: r["kept"] for r in report} == {"a": 3, "b": 4, "out": 3}
    x = torch.randn(4, 6)
    assert torch.allclose(gm(x), m(x), atol=1e-6)


def test_convolution_branches_concatenated_shrink_and_keep_outputs(tmp_path):
    torch.manual_seed(0)
    m = Inception().eval()
    with torch.no_grad():
        m.b1.weight[[0, 2, 5]] = 0
        m.b2.weight[1] = 0
        m.b1.bias.uniform_(-1, 1)
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.bias.uniform_(-1, 1)
        m.c1.weight[0] = 0                       # feeds a concatenation used twice: kept
    gm, report = shrink(m, (3, 6, 6))
    kept = {r["layer"]: r["kept"] for r in report}
    assert kept["b1"] == 3 and kept["b2"] == 3 and kept["c1"] == 4 and kept["c2"] == 4
    assert gm.bn.num_features == 3 + 3 + 3 and gm.mix.in_channels == 9
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert float((gm(x) - m(x)).abs().max()) <= 1e-5
        for fmt in ("shrunk", "sparse"):
            loaded = load_export(export_model(m, fmt, tmp_path / fmt, in_shape=(3, 6, 6)))
            assert float((loaded(x) - m(x)).abs().max()) <= 1e-5, fmt


def test_untraceable_model_keeps_dense_and_says_why(tmp_path):
    m = Untraceable()
    for fmt in ("dense", "compressed"):
        path = export_model(m, fmt, tmp_path / fmt)
        loaded = load_export(path, model=Untraceable())
        x = torch.randn(2, 1, 4, 4)
        assert torch.equal(loaded(x), m(x))
    for fmt in ("shrunk", "sparse"):
        with pytest.raises(UsageError, match="cannot be described as a graph.*torch.fx.*dense and compressed work"):
            export_model(m, fmt, tmp_path / fmt, in_shape=(1, 4, 4))


def test_untraceable_user_model_run(tmp_path, capsys):
    out = tmp_path / "run"
    sparsetrain.train(model=Untraceable(), train_data=TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 4, (32,))),
                      test_data=TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))),
                      method="dense", epochs=1, batch_size=16, out=str(out), progress=False)
    entry = json.loads((out / "model.json").read_text())
    assert entry["architecture"] is None and "torch.fx" in entry["architecture_note"]
    rows = inspect_exports(out)                            # the class is imported here: dense works
    assert [r["format"] for r in rows] == ["dense", "compressed"]
    assert "shrunk: not available" in capsys.readouterr().out


def test_trace_refuses_unknown_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.LSTM(3, 3)

        def forward(self, x):
            return self.odd(x)

    with pytest.raises(UsageError, match="'odd' is a LSTM"):
        trace(Net())
