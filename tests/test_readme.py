"""The README's Python example runs as printed (on the synthetic dataset)."""
import re
from pathlib import Path


def test_readme_python_example(idx_dir, monkeypatch, capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.setenv("SPARSETRAIN_DATA", str(idx_dir))
    exec(compile(code, "README.md", "exec"), {})
    assert 0.5 < float(capsys.readouterr().out.strip().splitlines()[-1]) < 1.0


def test_train_accepts_method_options_as_keywords(idx_dir):
    import sparsetrain
    s = sparsetrain.train(method="linbreg", model="lenet300", epochs=2, batch_size=16, sparsity=0.9,
                          data_dir=str(idx_dir), progress=False)
    assert abs(s["sparsity"] - 0.9) < 0.005


def _python_blocks():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_controller_and_deployment_examples(idx_dir, monkeypatch, capsys, tmp_path):
    """The own-loop λ-controller example reaches its sparsity; the deployment example then exports
    that model, and the saved torch.export program runs in plain torch with the same outputs."""
    import torch
    blocks = _python_blocks()
    controller = next(b for b in blocks if "BudgetController" in b)
    deploy = next(b for b in blocks if "export_program" in b)
    monkeypatch.setenv("SPARSETRAIN_DATA", str(idx_dir))
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(controller, "README.md", "exec"), ns)
    sparsity = float(capsys.readouterr().out.split()[-2])
    assert abs(sparsity - 0.95) < 0.01
    exec(compile(deploy, "README.md", "exec"), ns)
    x = torch.randn(3, 1, 28, 28)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(x), ns["model"].eval()(x), atol=1e-5)


def test_readme_links_stay_in_the_repository():
    root = Path(__file__).parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "shared/" not in text, doc
        for target in re.findall(r"\]\(([^)]+)\)", text):
            assert not target.startswith(("http", "/", "..")), (doc, target)
            assert (doc.parent / target.split("#")[0]).exists(), (doc, target)


def test_dense_export_loads_with_plain_torch_and_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file
    from sparsetrain.export import export_model, magnitude_prune
    from sparsetrain.models import build_model
    torch.manual_seed(0)
    model = magnitude_prune(build_model("lenet5"), 0.9).eval()
    export_model(model, "dense", tmp_path / "model.dense.safetensors")
    fresh = build_model("lenet5").eval()
    fresh.load_state_dict(load_file(str(tmp_path / "model.dense.safetensors")))     # the README recipe
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
