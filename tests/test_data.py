import numpy as np
import pytest
import torch

from sparsetrain.data import TensorLoader, augment_crop_flip, load_arrays, locate, make_loaders, read_idx
from sparsetrain.errors import UsageError


def test_idx_reader_roundtrip(idx_dir):
    x = read_idx(idx_dir / "train-images-idx3-ubyte")   # found through its .gz twin
    assert x.shape == (600, 28, 28) and x.dtype == np.uint8
    xtr, ytr, xte, yte = load_arrays("fashion-mnist", str(idx_dir), download=False)
    assert xtr.shape == (600, 1, 28, 28) and xte.shape == (200, 1, 28, 28)
    assert ytr.max() <= 9 and yte.dtype == np.int64


def test_truncated_idx_is_a_clear_error(tmp_path, idx_dir):
    raw = (idx_dir / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "bad-idx").write_bytes(raw[:1000])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(tmp_path / "bad-idx")


def test_missing_data_names_all_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)
    monkeypatch.setattr("sparsetrain.data.SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(UsageError) as e:
        locate("fashion-mnist", str(tmp_path), download=False)
    msg = str(e.value)
    assert "--data-dir" in msg and "dataset-fashion-mnist" in msg and "network" in msg and "\n" not in msg


def test_unreadable_data_dir():
    with pytest.raises(UsageError, match="--data-dir"):
        locate("fashion-mnist", "/nonexistent/dir", download=False)


def test_env_var_and_subfolder(idx_dir, monkeypatch):
    monkeypatch.setenv("SPARSETRAIN_DATA", str(idx_dir.parent))
    # the files sit in <root>/<something>; a folder named after the dataset is also searched
    assert locate("fashion-mnist", str(idx_dir), download=False) == idx_dir


def test_cifar_reader_and_augmentation(cifar_dir):
    loaders = make_loaders("cifar10", str(cifar_dir), batch_size=16, download=False)
    x, y = next(iter(loaders.train))
    assert x.shape == (16, 3, 32, 32) and loaders.info.num_classes == 10
    g = torch.Generator().manual_seed(0)
    img = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment_crop_flip(img, g)
    assert out.shape == img.shape


def test_cifar_refuses_foreign_pickles(tmp_path):
    import os
    import pickle
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    for name in ("data_batch_1", "test_batch"):
        (d / name).write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UsageError, match="not a CIFAR"):
        load_arrays("cifar10", str(tmp_path), download=False)
    assert not (tmp_path / "pwned").exists()


def test_loader_is_seeded_per_epoch_and_shards_global_batches():
    x, y = torch.arange(100).float().view(100, 1), torch.arange(100)
    a = TensorLoader(x, y, 10, shuffle=True, seed=3)
    b = TensorLoader(x, y, 10, shuffle=True, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    b.set_epoch(3)
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    shards = [TensorLoader(x, y, 10, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    for full, r0, r1 in zip(a, *shards):
        assert sorted(full[1].tolist()) == sorted(r0[1].tolist() + r1[1].tolist())


def test_validation_split_is_seeded(idx_dir):
    a = make_loaders("fashion-mnist", str(idx_dir), val_fraction=0.1, seed=1, download=False)
    b = make_loaders("fashion-mnist", str(idx_dir), val_fraction=0.1, seed=1, download=False)
    assert len(a.val.x) == 60 and len(a.train.x) == 540
    assert torch.equal(a.val.y, b.val.y)


def test_gzipped_cifar_batches_are_read(cifar_dir, tmp_path):
    """locate() accepts a dataset file or its .gz for every dataset; the CIFAR reader reads both."""
    import gzip
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in (cifar_dir / "cifar-10-batches-py").iterdir():
        (d / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    want = load_arrays("cifar10", str(cifar_dir), download=False)
    got = load_arrays("cifar10", str(tmp_path), download=False)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
