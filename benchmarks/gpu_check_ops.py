"""GPU check of issue 12's deployment paths (run on the CUDA machine, torch 2.11 there):

    .venv/bin/python benchmarks/gpu_check_ops.py          # ~1 minute; prints one line per check

For a sparse export of LeNet-5 (90 % sparse) and of a residual CNN that is no nn.Sequential
(graph export), on CPU and on CUDA: eager vs torch.jit.trace, torch.export (dynamic batch,
saved and reloaded, portable), torch.compile (inductor) — max |difference| against the dense
model, which must stay under 1e-5 relative (float32 CSR sums in another order). Also prints
torch's version and which torch.library API registered the operator. Exits 1 on any mismatch.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from sparsetrain.export import export_model, load_export, magnitude_prune
from sparsetrain.export.deploy import export_program
from sparsetrain.export.sparse_modules import can_sparsify, sparsify
from sparsetrain.models import build_model


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(1, 16, 3, padding=1), Block(16), nn.Linear(64, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.block(F.relu(self.stem(x))), 2)
        return self.fc(torch.flatten(x, 1))


failures = 0


def report(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    global failures
    diff = float((got.float() - want.float()).abs().max())
    ok = got.shape == want.shape and diff <= 1e-5 * max(1.0, float(want.abs().max()))
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:<48} max|diff| {diff:.2e}", flush=True)


def check(label: str, model: nn.Module, in_shape, device: str, tmp: Path) -> None:
    model = model.eval()
    path = export_model(model, "sparse", tmp / f"{label}.safetensors", in_shape=in_shape, measure=False)
    sparse = load_export(path)
    sparsify(sparse, choices={n: "sparse" for n, m in sparse.named_modules() if can_sparsify(m)})  # all sparse
    sparse = sparse.to(device)
    ref = model.to(device)
    x = torch.randn(6, *in_shape, device=device)
    with torch.no_grad():
        want = ref(x)
        report(f"{label}/{device} eager", sparse(x), want)
        try:
            traced = torch.jit.trace(sparse, torch.randn(4, *in_shape, device=device), check_trace=False)
            report(f"{label}/{device} jit.trace (other batch)", traced(x), want)
        except Exception as e:  # noqa: BLE001
            print(f"REFUSED {label}/{device} jit.trace: {str(e).splitlines()[0][:160]}")
        for portable in (False, True):
            try:
                ep = export_program(sparse, torch.randn(4, *in_shape, device=device), portable=portable)
                torch.export.save(ep, str(tmp / "p.pt2"))
                loaded = torch.export.load(str(tmp / "p.pt2")).module()
                report(f"{label}/{device} torch.export portable={portable}", loaded(x), want)
            except Exception as e:  # noqa: BLE001
                print(f"REFUSED {label}/{device} torch.export portable={portable}: {str(e).splitlines()[0][:160]}")
        try:
            compiled = torch.compile(sparse)
            report(f"{label}/{device} torch.compile (inductor)", compiled(x), want)
        except Exception as e:  # noqa: BLE001
            print(f"REFUSED {label}/{device} torch.compile: {str(e).splitlines()[0][:160]}")


def main() -> int:
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"custom_op API {'yes' if hasattr(torch.library, 'custom_op') else 'no (Library fallback)'}")
    torch.manual_seed(0)
    lenet = magnitude_prune(build_model("lenet5", (1, 28, 28), 10), 0.9)
    res = magnitude_prune(ResCNN(), 0.9)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as d:
        for device in devices:
            check("lenet5", lenet, (1, 28, 28), device, Path(d))
            check("rescnn", res, (1, 12, 12), device, Path(d))
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
