"""Sparse initialisation (SPEC §2)."""
import math

import pytest
import torch
from torch import nn

from sparsetrain.errors import UsageError
from sparsetrain.init import sparse_init_


def net():
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_entry_density_and_variance_preserving_scale():
    model = sparse_init_(net(), density=0.1, generator=gen())
    w = model[4].weight  # 300 x 400
    nz = w != 0
    assert abs(nz.float().mean().item() - 0.1) < 0.01  # Bernoulli(0.1) over 120k entries
    std_nz = w[nz].std().item()  # nonzeros: r·He with r = 1/√p
    assert std_nz == pytest.approx(math.sqrt(2 / 400) / math.sqrt(0.1), rel=0.05)
    assert w.pow(2).mean().item() == pytest.approx(2 / 400, rel=0.08)  # E[W²] preserved


def test_density_one_is_kaiming_normal_and_scale_is_applied():
    model = sparse_init_(net(), density=1.0, generator=gen())
    w = model[4].weight
    assert (w != 0).all() and w.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.03)
    model = sparse_init_(net(), density=0.5, scale=10.0, generator=gen())
    w = model[4].weight
    assert w[w != 0].std().item() == pytest.approx(10 * math.sqrt(2 / 400), rel=0.05)


def test_row_groups():
    model = sparse_init_(net(), density=0.3, groups="rows", generator=gen(1))
    for w in (model[4].weight, model[0].weight.reshape(16, -1)):
        alive = (w != 0).any(dim=1)
        assert torch.equal((w != 0).all(dim=1), alive)  # whole rows on or off
        assert 0 < alive.sum() < w.shape[0]


def test_kernel_groups():
    model = sparse_init_(net(), density=0.3, groups="kernels", generator=gen(2))
    k = model[0].weight  # 16 x 8 x 3 x 3
    alive = (k != 0).any(dim=(2, 3))
    assert torch.equal((k != 0).all(dim=(2, 3)), alive)
    assert abs(alive.float().mean().item() - 0.3) < 0.08
    lin = model[4].weight  # no kernels: rows
    assert torch.equal((lin != 0).all(dim=1), (lin != 0).any(dim=1))


def test_biases_small_positive_and_norms_untouched():
    model = sparse_init_(net(), density=0.2, generator=gen())
    for layer in (model[0], model[4], model[6]):
        fan_in = layer.weight[0].numel()
        assert (layer.bias > 0).all() and (layer.bias <= 1 / math.sqrt(fan_in)).all()
    assert (model[1].weight == 1).all() and (model[1].bias == 0).all()


@pytest.mark.parametrize("r0", [0.0, 5.0])
def test_bias_scale_r0_sets_the_bias_range(r0):
    """The authors' bias init: U(0, r₀/√fan_in); r₀ = 0 gives zero biases."""
    model = sparse_init_(net(), density=0.2, generator=gen(), bias_scale=r0)
    for layer in (model[0], model[4], model[6]):
        bound = r0 / math.sqrt(layer.weight[0].numel())
        assert (layer.bias >= 0).all() and (layer.bias <= bound).all()
        if r0:
            assert layer.bias.max() > bound / 5         # uses the range: not the r₀ = 1 default
    with pytest.raises(UsageError, match="bias_scale"):
        sparse_init_(net(), density=0.2, bias_scale=-1)


def test_generator_makes_it_reproducible():
    a = sparse_init_(net(), 0.1, generator=gen(7))
    b = sparse_init_(net(), 0.1, generator=gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kw", [dict(density=0.0), dict(density=1.5), dict(density=-0.1),
                                dict(density="x"), dict(density=0.5, groups="filters"),
                                dict(density=0.5, scale=0.0)])
def test_bad_arguments(kw):
    with pytest.raises(UsageError):
        sparse_init_(net(), **kw)


def test_the_floor_of_whole_unit_groups_switches_on_one_unit_not_all():
    # with kernel groups a Linear weight's group is its row: the per-unit floor used to switch on
    # every empty row, so LeNet-5's Linear layers started dense under --reg conv-group
    from sparsetrain.models import build_model
    model = sparse_init_(build_model("lenet5"), 0.002, groups="kernels", generator=gen())
    for layer in (model[7], model[9], model[11]):
        rows = (layer.weight != 0).any(1).float().mean().item()
        assert 0 < rows < 0.2


def test_scale_counts_the_weights_the_floor_adds():
    """r = 1/√(kept fraction): with the floor's extra weights the variance stays 2/fan_in (with
    1/√p it was ≈ 2× too large here: ≈ 120 rows floored on ≈ 100 expected draws)."""
    layer = nn.Linear(1000, 200)
    sparse_init_(nn.Sequential(layer), density=0.0005, generator=gen(3))
    w = layer.weight
    kept = (w != 0).float().mean().item()
    assert kept > 0.0009                                     # the floor added weights
    assert (w ** 2).mean().item() == pytest.approx(2 / 1000, rel=0.2)
