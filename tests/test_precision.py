"""Trainer on an accelerator: --precision (autocast; weights and optimizer state stay fp32),
GPU-resident data, channels_last. The CPU checks use bf16 autocast, which CPUs run too."""
import pytest
import torch

from sparsetrain.errors import UsageError
from sparsetrain.trainer import TrainConfig, Trainer, train

TINY = dict(model="lenet300", data="fashion-mnist", epochs=1, batch_size=64, progress=False, train_subset=256,
            test_subset=64)


def test_bf16_trains_with_fp32_weights_and_state(idx_dir):
    t = Trainer(TrainConfig(method="linbreg", data_dir=str(idx_dir), device="cpu", precision="bf16", **TINY))
    summary = t.run()
    assert summary["precision"] == "bf16" and summary["epoch_seconds"] > 0
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for st in t.strategy.optimizer.state.values()
               for v in st.values() if torch.is_tensor(v) and v.is_floating_point())
    assert t.history[0]["train_seconds"] <= t.history[0]["seconds"]


def test_bf16_differs_from_fp32_but_stays_close(idx_dir):
    a = train(TrainConfig(method="dense", data_dir=str(idx_dir), device="cpu", **TINY))
    b = train(TrainConfig(method="dense", data_dir=str(idx_dir), device="cpu", precision="bf16", **TINY))
    assert a["test_loss"] != b["test_loss"] and abs(a["test_loss"] - b["test_loss"]) < 0.2


@pytest.mark.parametrize("precision,message", [("fp8", "--precision"), ("fp16", "fp16 needs a CUDA device")])
def test_bad_precision_is_a_usage_error(idx_dir, precision, message):
    with pytest.raises(UsageError, match=message):
        Trainer(TrainConfig(method="dense", data_dir=str(idx_dir), device="cpu", precision=precision, **TINY))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_run_keeps_data_on_the_device_and_uses_channels_last(idx_dir, precision):
    t = Trainer(TrainConfig(method="xrda", data_dir=str(idx_dir), device="cuda",
                            precision=precision, **{**TINY, "model": "lenet5"}))
    assert t.data_on_gpu and t.loaders.train.x.is_cuda and t.channels_last
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = t.run()
    assert summary["precision"] == precision and summary["test_loss"] == summary["test_loss"]  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
