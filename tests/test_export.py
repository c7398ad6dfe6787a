"""Exports: exact round trips for every format, structural shrink, file sizes, errors, the CLI."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from conftest import check_every_format, close
from sparsetrain.errors import UsageError
from sparsetrain.export import (FORMATS, BiasMap, SparseConv2d, SparseLinear, densify, export_info, export_model,
                                inspect_exports, load_export, magnitude_prune, shrink, sparsify)
from sparsetrain.export import codec
from sparsetrain.export.sparse_modules import KERNELS
from sparsetrain.models import ResNet, build_model


def zero_units(model: nn.Module, frac: float = 0.5, seed: int = 0) -> nn.Module:
    """Zero the incoming weights of ``frac`` of each hidden layer's neurons / filters, some outgoing
    columns too, and give biases / BatchNorm shifts nonzero values (so removed units still matter)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in layers[:-1]:
            n = m.weight.shape[0]
            m.weight[torch.randperm(n, generator=g)[: int(n * frac)]] = 0
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5, generator=g)
        for m in layers[1:]:
            n = m.weight.shape[1]
            m.weight[:, torch.randperm(n, generator=g)[: max(1, n // 5)]] = 0
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
    return model.eval()


def bn_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


CASES = {
    "mlp": (lambda: build_model("lenet300", (1, 28, 28), 10), (1, 28, 28)),
    "lenet5": (lambda: build_model("lenet5", (1, 28, 28), 10), (1, 28, 28)),
    "bn-convnet": (bn_convnet, (3, 12, 12)),
    "resnet": (lambda: ResNet(3, [4, 8], [1, 1], 10), (3, 8, 8)),
}


def make(case: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, in_shape = CASES[case]
    model = zero_units(factory(), seed=seed)
    magnitude_prune(model, 0.5, scope="layer")
    return model, in_shape


# ----------------------------------------------------------------------------- codec
@pytest.mark.parametrize("coding", codec.CODINGS)
def test_codings_round_trip(coding):
    torch.manual_seed(0)
    for shape, density in [((30, 70), 0.05), ((4, 3, 5, 5), 0.3), ((700,), 0.002), ((8, 8), 0.0), ((5,), 1.0)]:
        t = torch.randn(shape) * (torch.rand(shape) < density)
        stored, info = codec.encode("w", t, coding)
        assert torch.equal(codec.decode("w", info, stored), t)
    t = torch.zeros(70000)
    t[[0, 1, 300, 65000, 69999]] = torch.arange(1.0, 6.0)    # gaps longer than 255
    stored, info = codec.encode("w", t, coding)
    assert torch.equal(codec.decode("w", info, stored), t)


def test_smallest_coding_is_chosen():
    t = torch.randn(300, 784) * (torch.rand(300, 784) < 0.02)
    sizes = codec.coding_sizes(t)
    _, info = codec.encode("w", t)
    assert info["coding"] == min(sizes, key=sizes.get) == "gaps"
    assert codec.encode("b", torch.randn(10))[1]["coding"] == "dense"


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(case, fmt, tmp_path):
    model, in_shape = make(case)
    x = torch.randn(6, *in_shape)
    with torch.no_grad():
        ref = model(x)
    path = export_model(model, fmt, tmp_path / f"{fmt}.safetensors", in_shape=in_shape, measure=False)
    loaded = load_export(path, model=CASES[case][0]() if fmt in ("dense", "compressed", "semi-structured") else None)
    assert not loaded.training
    with torch.no_grad():
        out = loaded(x)
    if fmt in ("dense", "compressed", "semi-structured"):     # semi-structured: dense on a CPU
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    else:
        assert close(out, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_shrunk_has_fewer_parameters_and_same_outputs(case):
    model, in_shape = make(case)
    small, report = shrink(model, in_shape)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in small.parameters())
    assert n1 < n0
    assert any(r["kept"] < r["units"] for r in report)
    assert report[-1]["kept"] == report[-1]["units"]           # the classifier keeps its outputs
    x = torch.randn(5, *in_shape)
    with torch.no_grad():
        assert close(small(x), model(x))


def test_shrink_folds_the_bias_of_a_dead_neuron():
    lin1, lin2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        lin1.weight[1] = 0
        lin1.bias.copy_(torch.tensor([0.1, 2.0, -0.3]))          # neuron 1 always outputs relu(2.0) = 2
    model = nn.Sequential(lin1, nn.ReLU(), lin2).eval()
    small, _ = shrink(model)
    assert small[0].out_features == 2 and small[2].in_features == 2
    assert torch.allclose(small[2].bias, lin2.bias + 2.0 * lin2.weight[:, 1])
    x = torch.randn(7, 4)
    assert close(small(x), model(x))


def test_padded_conv_gets_an_exact_bias_map():
    model, in_shape = make("bn-convnet")
    small, _ = shrink(model, in_shape)
    assert any(isinstance(m, BiasMap) for m in small)           # constant channels into padded convs


def test_resnet_keeps_channels_of_the_residual_add():
    model, in_shape = make("resnet")
    small, report = shrink(model, in_shape)
    by_name = {r["layer"]: r for r in report}
    stem = by_name["0"]
    assert stem["kept"] == stem["units"]
    assert any(r["kept"] < r["units"] for name, r in by_name.items() if name.endswith("body.0"))


# ----------------------------------------------------------------------------- sparse layers
def test_sparse_modules_match_dense():
    torch.manual_seed(0)
    lin = nn.Linear(50, 40)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    sl, sc = SparseLinear.from_dense(lin), SparseConv2d.from_dense(conv)
    for kernel in KERNELS:
        sl.kernel = sc.kernel = kernel
        for b in (1, 3):
            x, xc = torch.randn(b, 50), torch.randn(b, 6, 9, 9)
            assert close(sl(x), lin(x).detach())
            assert close(sc(xc), conv(xc).detach())
            assert close(sl(x.view(b, 1, 50)), lin(x).detach().view(b, 1, 40))
    assert torch.equal(sl.to_dense().weight, lin.weight.detach())
    assert sl.nnz == int(torch.count_nonzero(lin.weight))


def test_sparsify_by_density_and_chained_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    magnitude_prune(model[0], 0.97, scope="layer")
    magnitude_prune(model[2], 0.97, scope="layer")
    x = torch.randn(9, 64)
    with torch.no_grad():
        ref = model(x)
    report = sparsify(model, measure=False)
    assert [r["choice"] for r in report] == ["sparse", "sparse", "dense"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[4], nn.Linear)
    with torch.no_grad():
        assert close(model(x), ref)
        assert close(model(x[:1]), ref[:1])
    forced = densify(model)
    assert isinstance(forced[0], nn.Linear)
    report = sparsify(forced, choices={"0": "sparse:spmm_sum", "2": "sparse"})
    assert forced[0].kernel == "spmm_sum" and forced[2].kernel == "addmm" and isinstance(forced[4], nn.Linear)
    assert [r["choice"] for r in report] == ["sparse:spmm_sum", "sparse", "dense"]
    with torch.no_grad():
        assert close(forced(x), ref)
    with pytest.raises(UsageError):
        sparsify(forced, choices={"4": "sparse:bogus"})


def test_sparse_export_records_and_reuses_layer_choices(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 28, 28), 10)
    magnitude_prune(model, 0.98, scope="layer")
    path = export_model(model, "sparse", tmp_path / "s.safetensors", measure=False)
    info = export_info(path)
    assert set(info["layers"]) == {"1", "3", "5"} and info["layers"]["1"] == "sparse"
    loaded = load_export(path)
    assert isinstance(loaded[1], SparseLinear)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert close(loaded(x), model(x))
    timed = load_export(path, batch_size=4)                   # choices timed again on this machine
    assert {type(timed[i]) for i in (1, 3, 5)} <= {nn.Linear, SparseLinear}
    with torch.no_grad():
        assert close(timed(x), model(x))


# ----------------------------------------------------------------------------- sizes
def test_compressed_file_is_small_at_98_percent_sparsity(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 28, 28), 10)
    magnitude_prune(model, 0.98, scope="layer")
    dense = export_model(model, "dense", tmp_path / "d.safetensors").stat().st_size
    comp = export_model(model, "compressed", tmp_path / "c.safetensors").stat().st_size
    assert comp < 0.07 * dense
    assert comp < 0.035 * dense                                # gap coding: ~0.027 here


def test_dense_export_is_a_plain_state_dict(tmp_path):
    from safetensors.torch import load_file
    model, _ = make("lenet5")
    path = export_model(model, "dense", tmp_path / "d.safetensors", model_name="lenet5", in_shape=(1, 28, 28),
                        num_classes=10)
    fresh = build_model("lenet5", (1, 28, 28), 10)
    fresh.load_state_dict(load_file(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    loaded = load_export(path)                                 # rebuilt from the library name
    assert type(loaded) is nn.Sequential


def test_pruning_masks_are_baked_in(tmp_path):
    from torch.nn.utils import prune
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.7)
    path = export_model(model, "compressed", tmp_path / "c.safetensors")
    loaded = load_export(path)                                 # an nn.Sequential: architecture stored
    assert set(loaded.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert int((loaded[0].weight == 0).sum()) == 42
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------- errors
def _one_line_usage_error(fn):
    with pytest.raises(UsageError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_corrupt_and_truncated_files_are_usage_errors(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 28, 28), 10)
    magnitude_prune(model, 0.9)
    path = export_model(model, "compressed", tmp_path / "c.safetensors", model_name="lenet300")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    assert "cannot be read" in _one_line_usage_error(lambda: load_export(tmp_path / "trunc.safetensors"))
    _one_line_usage_error(lambda: load_export(tmp_path / "garbage.safetensors"))
    _one_line_usage_error(lambda: load_export(tmp_path / "missing.safetensors"))
    # a well-formed file whose gap stream no longer matches its values
    meta, _ = codec.read_file(path)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        raw_meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".__values"))
    tensors[key] = tensors[key][:-3].clone()
    save_file(tensors, tmp_path / "bad.safetensors", metadata=raw_meta)
    assert "tensor" in _one_line_usage_error(lambda: load_export(tmp_path / "bad.safetensors"))
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    assert "not a sparsetrain export" in _one_line_usage_error(lambda: load_export(tmp_path / "foreign.safetensors"))
    wrong = build_model("lenet5", (1, 28, 28), 10)
    _one_line_usage_error(lambda: load_export(path, model=wrong))
    _one_line_usage_error(lambda: export_model(model, "zip", tmp_path / "z"))
    _one_line_usage_error(lambda: export_model(build_model("lenet5"), "shrunk", tmp_path / "s"))  # no in_shape


@pytest.mark.parametrize("fmt", ["shrunk", "sparse"])
def test_a_model_given_for_a_shrunk_export_is_refused_not_ignored(fmt, tmp_path):
    model = build_model("lenet300", (1, 28, 28), 10)
    path = export_model(model, fmt, tmp_path / f"{fmt}.safetensors", measure=False)
    mine = build_model("lenet300", (1, 28, 28), 10)        # would keep its random weights, silently
    assert "model=" in _one_line_usage_error(lambda: load_export(path, model=mine))


# ----------------------------------------------------------------------------- CLI
def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny real run (dense method, 1 epoch on a tiny synthetic Fashion-MNIST), then 98 % pruned."""
    from sparsetrain.checkpoint import load_checkpoint, save_checkpoint
    from sparsetrain.cli import main
    root = tmp_path_factory.mktemp("export_run")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 128)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    run = root / "run"
    assert main(["train", "--method", "dense", "--train-subset", "256", "--test-subset", "128", "--epochs", "1",
                 "--no-progress", "--data-dir", str(data), "--out", str(run)]) == 0
    ck = load_checkpoint(run / "checkpoint.pt")
    model = build_model("lenet300", (1, 28, 28), 10)
    model.load_state_dict(ck["model"])
    magnitude_prune(model, 0.98, scope="layer")
    ck["model"] = model.state_dict()
    save_checkpoint(ck, run / "checkpoint.pt")
    return run


def test_cli_export_end_to_end(run_dir, capsys):
    from sparsetrain.cli import main
    from sparsetrain.export import load_run
    model, _ = load_run(run_dir)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)

    def export(fmt):
        out = run_dir / f"m.{fmt}.safetensors"
        args = ["export", str(run_dir), "--format", fmt, "--out", str(out), "--json"]
        assert main(args + (["--no-measure"] if fmt == "sparse" else [])) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["max_abs_diff"] <= 1e-6 and result["format"] == fmt
        return out

    sizes = check_every_format(export, x, ref, 1e-6)
    assert sizes["compressed"] < 0.07 * sizes["dense"]
    # an export converts to another format, e.g. on the deployment machine
    assert main(["export", str(run_dir / "m.compressed.safetensors"), "--format", "sparse", "--no-measure",
                 "--out", str(run_dir / "again.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_exit_2_without_traceback(run_dir, tmp_path, capsys):
    from sparsetrain.cli import main
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    cases = [
        (["export", str(run_dir), "--format", "zip"], "--format"),
        (["export", str(run_dir)], "--format"),
        (["export", str(tmp_path / "nope"), "--format", "dense"], "RUN_DIR"),
        (["export", str(bad), "--format", "dense"], "cannot be read"),
    ]
    data = (run_dir / "m.compressed.safetensors")
    if data.exists():
        trunc = tmp_path / "trunc.safetensors"
        trunc.write_bytes(data.read_bytes()[:-100])
        cases.append((["export", str(trunc), "--format", "dense"], "cannot be read"))
    for args, needle in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(cases[0][0]) == 2
    assert "allowed: dense, compressed, shrunk, sparse" in capsys.readouterr().err


def test_inspect_exports_table(run_dir, capsys):
    rows = inspect_exports(run_dir, batch_sizes=(1, 8), budget_s=0.01)
    text = capsys.readouterr().out
    assert [r["format"] for r in rows] == list(FORMATS)
    for fmt in FORMATS:
        assert fmt in text
    by = {r["format"]: r for r in rows}
    assert by["compressed"]["ratio"] < 0.07
    assert by["shrunk"]["params"] <= by["dense"]["params"]
    assert by["sparse"]["macs"] <= by["dense"]["macs"]
