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
