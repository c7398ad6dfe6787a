"""Models using torch.nn.utils.prune are regularized in full; torch.nn.utils.parametrize is refused."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import sparsetrain
from sparsetrain.errors import UsageError
from sparsetrain.optim import ProxSGD
from sparsetrain.params import param_groups
from sparsetrain.regularizers import L1


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def test_pruned_layers_regularize_weight_orig():
    model = net()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    groups = param_groups(model, L1(1e-3))
    regularized = {id(p) for g in groups if g["reg"] is not None for p in g["params"]}
    assert id(model[1].weight_orig) in regularized and id(model[3].weight) in regularized
    assert len(regularized) == 2


def test_pruned_model_trains_sparse_with_the_mask_kept():
    model = net()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    mask = model[1].weight_mask.clone()
    opt = ProxSGD(param_groups(model, L1(0.5)), lr=0.1)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    w = model[1].weight
    assert torch.all(w[mask == 0] == 0)
    assert float((w[mask == 1] == 0).float().mean()) > 0.2     # the regularizer acts on the kept entries


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).t()


def test_parametrized_weight_is_refused():
    model = net()
    model[1] = nn.Linear(16, 16)
    parametrize.register_parametrization(model[1], "weight", Symmetric())
    model[3] = nn.Linear(16, 3)
    with pytest.raises(UsageError, match=r"layer '1'.*torch.nn.utils.parametrize \(Symmetric\).*remove_parametrizations"):
        param_groups(model, L1(1e-3))
    param_groups(model, L1(1e-3), exclude=r"^1\.")           # excluded: nothing to regularize there
    param_groups(model, None)                                # no regularizer: nothing refused


def test_train_refuses_a_parametrized_model():
    from torch.utils.data import TensorDataset
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    ds = TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(UsageError, match="parametrize"):
        sparsetrain.train(model=model, train_data=ds, test_data=ds, method="linbreg", epochs=1, progress=False)


def test_pruned_user_model_run_records_its_architecture_and_exports(tmp_path):
    import json
    from torch.utils.data import TensorDataset
    from sparsetrain.export import FORMATS, export_run, load_export, load_run
    model = net()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    ds = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,)))
    out = tmp_path / "run"
    sparsetrain.train(model=model, train_data=ds, test_data=ds, method="proxsgd", epochs=1, batch_size=16,
                      out=str(out), progress=False)
    entry = json.loads((out / "model.json").read_text())
    assert entry["architecture"]["type"] == "Sequential", entry["architecture_note"]
    ref, _ = load_run(out)
    x = torch.randn(4, 1, 4, 4)
    for fmt in FORMATS:
        with torch.no_grad():
            assert torch.allclose(load_export(export_run(out, fmt))(x), ref(x), atol=1e-6), fmt
