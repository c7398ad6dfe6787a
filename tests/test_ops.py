"""The sparse operator under PyTorch's graph tools: jit.trace, torch.export, torch.compile, ONNX —
equal to eager (1e-5) or refused, never silently wrong."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import conftest
from sparsetrain.export import export_model, load_export, magnitude_prune
from sparsetrain.export import ops
from sparsetrain.export.deploy import export_program, to_onnx
from sparsetrain.export.sparse_modules import KERNELS, _csr_parts
from sparsetrain.models import build_model


close = partial(conftest.close, tol=1e-5)         # graph tools may sum in another order


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_matches_dense_product(kernel, n, with_bias):
    torch.manual_seed(n)
    w = torch.randn(33, 50) * (torch.rand(33, 50) < 0.2)
    w[3] = 0                                              # an empty row
    xt, bias = torch.randn(50, n), (torch.randn(33) if with_bias else None)
    crow, col, values = _csr_parts(w)
    want = w @ xt + (bias.unsqueeze(1) if with_bias else 0)
    for fn in (ops.csr_matmul_t, ops.reference, ops.decomposed, ops.densified):
        assert close(fn(crow, col, values, xt, bias, kernel), want), fn.__name__


def _sparse_export(tmp_path, name="lenet5"):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10).eval()
    magnitude_prune(model, 0.9)
    path = export_model(model, "sparse", tmp_path / "m.safetensors", in_shape=(1, 28, 28), measure=False)
    sparse = load_export(path)
    for m in sparse.modules():                            # every layer sparse, native kernel where built
        if hasattr(m, "kernel"):
            m.kernel = "native"
    from sparsetrain.export import sparsify
    sparsify(sparse, choices={n: "sparse:native" for n, m in sparse.named_modules()
                              if type(m) in (nn.Linear, nn.Conv2d)})
    return model, sparse, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _sparse_export(tmp_path_factory.mktemp("ops"))


def test_all_layers_are_sparse(exported):
    _, sparse, _ = exported
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in sparse.modules())


def test_jit_trace_matches_eager_at_other_batch_sizes(exported, tmp_path):
    model, sparse, _ = exported
    with torch.no_grad():
        traced = torch.jit.trace(sparse, torch.randn(8, 1, 28, 28), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "t.pt"))
    reloaded = torch.jit.load(str(tmp_path / "t.pt"))
    for b in (1, 3, 8):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert close(traced(x), model(x)) and close(reloaded(x), model(x))


def test_torch_export_matches_eager_with_a_dynamic_batch(exported, tmp_path):
    model, sparse, _ = exported
    ep = export_program(sparse, torch.randn(4, 1, 28, 28))
    names = {str(n.target) for n in ep.graph.nodes}
    assert any("csr_matmul_t" in t for t in names)
    torch.export.save(ep, str(tmp_path / "p.pt2"))
    loaded = torch.export.load(str(tmp_path / "p.pt2")).module()
    for b in (2, 5):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert close(ep.module()(x), model(x)) and close(loaded(x), model(x))


def test_portable_program_has_only_aten_ops(exported):
    model, sparse, path = exported
    ep = export_program(path, torch.randn(4, 1, 28, 28), portable=True)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets and not any("sparsetrain" in t for t in targets)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert close(ep.module()(x), model(x))


def test_static_export_refuses_another_batch_size(exported):
    model, sparse, _ = exported
    with torch.no_grad():
        ep = torch.export.export(sparse, (torch.randn(4, 1, 28, 28),))
        assert close(ep.module()(x := torch.randn(4, 1, 28, 28)), model(x))
        with pytest.raises(Exception):                    # a guard error, not a wrong answer
            ep.module()(torch.randn(3, 1, 28, 28))


def test_torch_compile_matches_eager(exported):
    model, sparse, _ = exported
    compiled = torch.compile(sparse, backend="aot_eager", dynamic=False)
    for b in (2, 6):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert close(compiled(x), model(x))


def test_mlp_under_every_tool(tmp_path):
    model, sparse, _ = _sparse_export(tmp_path, "lenet300")
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        assert close(torch.jit.trace(sparse, x, check_trace=False)(x), want)
        assert close(export_program(sparse, x).module()(x), want)
        assert close(torch.compile(sparse, backend="aot_eager")(x), want)


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_matches_eager(exported, tmp_path, dynamo):
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator
    model, sparse, _ = exported
    x = torch.randn(4, 1, 28, 28)
    to_onnx(sparse, x, tmp_path / "m.onnx", dynamo=dynamo)
    sess = ReferenceEvaluator(str(tmp_path / "m.onnx"))
    out = sess.run(None, {sess.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        assert close(torch.from_numpy(out), model(x))



def test_int64_index_cache_never_serves_a_freed_tensor():
    # spmm_sum caches the int64 copies of the int32 indices by storage address; a freed index
    # tensor's address is handed to the next one of its size, which must not get the old copies
    n = 1024
    xt = torch.randn(7, 2)
    for i in range(50):
        crow = torch.arange(n + 1, dtype=torch.int32)          # one nonzero per row, in column i % 7
        col = torch.full((n,), i % 7, dtype=torch.int32)
        values = torch.ones(n)
        got = ops.reference(crow, col, values, xt, None, "spmm_sum")
        assert torch.equal(got, xt[i % 7].expand(n, 2)), i
        del crow, col, values, got


class _FixedBatch(nn.Module):
    """A model that only runs at batch size 4 (``reshape(4, -1)``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x.reshape(4, -1))


def test_dynamic_batch_export_is_refused_not_silently_static():
    from sparsetrain.errors import UsageError
    with pytest.raises(UsageError, match="dynamic_batch"):
        export_program(_FixedBatch(), torch.randn(4, 6))
    model = _FixedBatch().eval()
    ep = export_program(model, torch.randn(4, 6), dynamic_batch=False)   # asked for: static
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert close(ep.module()(x), model(x))
