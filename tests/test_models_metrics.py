import math

import pytest
import torch
from torch import nn

from sparsetrain import metrics, param_groups, prunable_weights
from sparsetrain.errors import UsageError
from sparsetrain.models import MODELS, build_model


@pytest.mark.parametrize("name", ["lenet300", "mlp-bregman", "lenet5", "convnet", "resnet20"])
def test_models_forward(name):
    shape = (3, 32, 32) if name.startswith("resnet") else (1, 28, 28)
    assert build_model(name, shape, 10)(torch.zeros(2, *shape)).shape == (2, 10)


def test_model_sizes_match_the_papers():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(build_model("lenet300")) == 266_610
    assert count(build_model("convnet")) == 64 * 25 + 64 + 64 * 64 * 25 + 64 + 1024 * 128 + 128 + 1290
    assert set(MODELS) >= {"vgg16", "resnet18", "resnet56"}


def test_unknown_model():
    with pytest.raises(UsageError, match="allowed: lenet300"):
        build_model("lenet9000")


def test_sparsity_density_compression_exclude_biases():
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].weight[0, :2] = 1.0          # 2 nonzeros of 20
        m[2].weight.fill_(1.0)            # 10 of 10
        m[0].bias.zero_()                 # biases never count
    assert metrics.sparsity(m) == pytest.approx(18 / 30)
    assert metrics.density(m) == pytest.approx(12 / 30)
    assert metrics.compression_ratio(m) == pytest.approx(30 / 12)
    rows = metrics.layer_table(m)
    assert rows[0]["nnz"] == 2 and rows[0]["rows"] == pytest.approx(1 / 5)
    assert rows[1]["density"] == 1.0


def test_group_densities_of_a_conv():
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 1, 1, 1] = 1.0
    g = metrics.group_alive(conv.weight)
    assert g["filters"] == pytest.approx(1 / 3) and g["kernels"] == pytest.approx(1 / 6)


def test_flops_dense_and_sparse():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with torch.no_grad():
        m[2].weight.zero_()
    f = metrics.flops(m, (1, 28, 28))
    conv = 2 * 9 * 26 * 26
    assert f["dense_macs"] == conv + 2 * 26 * 26 * 10
    assert f["sparse_macs"] == conv
    assert math.isclose(f["relative"], conv / f["dense_macs"])


def test_param_groups_split_weights_from_biases_and_norms():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    reg = object()
    groups = param_groups(m, reg, lr=0.5)
    assert len(groups) == 2
    assert groups[0]["reg"] is reg and {id(p) for p in groups[0]["params"]} == {id(m[0].weight), id(m[3].weight)}
    assert groups[1]["reg"] is None and groups[1]["lr"] == 0.5 and len(groups[1]["params"]) == 4
    only_fc = param_groups(m, reg, exclude=r"^0\.")
    assert [len(g["params"]) for g in only_fc] == [1, 5]
    per_layer = param_groups(m, lambda name, mod, p: "conv" if isinstance(mod, nn.Conv2d) else "fc")
    assert [g["reg"] for g in per_layer] == ["conv", "fc", None]
    assert [n for n, _ in prunable_weights(m)] == ["0.weight", "3.weight"]
