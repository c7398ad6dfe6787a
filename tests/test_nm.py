"""N:M structured sparsity: masks, projection, --pattern in training."""
import pytest
import torch

from sparsetrain import nm
from sparsetrain.errors import UsageError
from sparsetrain.params import prunable_weights
from sparsetrain.trainer import TrainConfig, Trainer

TINY = dict(model="lenet300", data="fashion-mnist", epochs=2, batch_size=64, progress=False, train_subset=256,
            test_subset=64, device="cpu")


@pytest.mark.parametrize("text", ["2", "4:2", "0:4", "2:2", "a:b", "2:4:8"])
def test_bad_pattern_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--pattern"):
        nm.parse_pattern(text)


def test_mask_keeps_the_largest_of_each_block():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.3]])
    mask = nm.nm_mask(w, 4, 2)
    assert mask.tolist() == [[False, True, True, False, True, False, False, True]]
    assert nm.is_nm(w * mask, 2, 4) and not nm.is_nm(w, 2, 4)
    assert nm.nm_mask(torch.ones(3, 6), 4, 2) is None          # rows not a multiple of M
    conv = torch.randn(8, 2, 2, 2).to(memory_format=torch.channels_last)
    cm = nm.nm_mask(conv, 4, 2)                                   # blocks along C_in·kh·kw, logical order
    assert (cm.reshape(8, -1).reshape(-1, 4).sum(1) == 2).all()


def test_current_mask_keeps_pruned_entries_out():
    w = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    cur = torch.tensor([[False, True, True, True]])
    assert nm.nm_mask(w, 4, 2, current=cur).tolist() == [[False, True, True, False]]


def test_keep_per_block_ramps_from_m_to_n():
    assert [nm.keep_per_block(s, 0.5, 2, 4) for s in (0.0, 0.2, 0.3, 0.5, 0.9)] == [4, 4, 3, 2, 2]


def test_project_reports_and_is_exact():
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    rep = nm.project_(net, 2, 4)
    assert rep["pattern"] == "2:4" and rep["pattern_layers"] == 2 and rep["pattern_skipped"] == ["3.weight"]
    assert rep["pattern_removed"] == 16 + 6
    assert nm.is_nm(net[0].weight, 2, 4) and nm.is_nm(net[2].weight, 2, 4)


def test_gmp_prunes_in_exact_blocks(idx_dir):
    t = Trainer(TrainConfig(method="gmp", data_dir=str(idx_dir), pattern="2:4", lr=0.05,
                            options={"sparsity": 0.5, "prune_end": 0.5, "prune_every": 1}, **TINY))
    summary = t.run()
    assert summary["pattern"] == "2:4" and summary["pattern_removed"] == 0   # already 2:4 when training ended
    for _, w in prunable_weights(t.model):
        blocks = (w.detach().reshape(-1, 4) != 0).sum(1)
        assert (blocks <= 2).all() and (blocks == 2).float().mean() > 0.99
    assert abs(summary["sparsity"] - 0.5) < 0.01


def test_regularizer_ends_with_the_projection(idx_dir):
    t = Trainer(TrainConfig(method="linbreg", data_dir=str(idx_dir), pattern="2:4", **TINY))
    summary = t.run()
    assert summary["pattern_layers"] == 3 and "accuracy_before_pattern" in summary
    assert all(nm.is_nm(w, 2, 4) for _, w in prunable_weights(t.model))


def _nm_mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    nm.project_(net, 2, 4)
    return net


def test_semi_structured_export_falls_back_to_dense_on_cpu(tmp_path):
    from sparsetrain.export import export_info, export_model, load_export
    net = _nm_mlp().eval()
    path = export_model(net, "semi-structured", tmp_path / "m.safetensors", in_shape=(1, 8, 8))
    assert export_info(path)["extra"]["semi_structured_layers"] == ["1", "3", "5"]
    m = load_export(path)
    assert [r["semi_structured"] for r in m.semi_structured] == [False] * 3
    assert all("cpu" in r["reason"] for r in m.semi_structured)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(m(x), net(x))


def test_semi_structured_needs_the_pattern_and_half_precision():
    from sparsetrain.export import to_semi_structured
    net = _nm_mlp()
    with torch.no_grad():
        net[5].weight.fill_(1.0)
    rows = {r["layer"]: r for r in to_semi_structured(net)}
    assert rows["5"]["reason"] == "not 2:4 sparse"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_on_gpu_matches_dense(dtype):
    from sparsetrain.export import to_semi_structured
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128).cuda().to(dtype)
    nm.project_(lin, 2, 4)
    ref = torch.nn.Linear(256, 128).cuda().to(dtype)
    ref.load_state_dict(lin.state_dict())
    rows = to_semi_structured(lin)
    assert rows[0]["semi_structured"], rows
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref(x), rtol=2e-2, atol=2e-2)
