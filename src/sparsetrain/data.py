"""Datasets read from their original files (no torchvision), held in memory as tensors.

* MNIST / Fashion-MNIST: the IDX files (``train-images-idx3-ubyte[.gz]`` ...).
* CIFAR-10 / CIFAR-100: the python pickle batches (``data_batch_1`` ... / ``train``, ``test``),
  decoded with a restricted unpickler that only rebuilds dicts, lists, bytes and numpy arrays.

Fashion-MNIST is the built-in default. A dataset's directory is looked up in order:
``--data-dir`` / ``$SPARSETRAIN_DATA`` (the dataset's files directly inside it or in a
sub-folder named after the dataset), Debian's ``/usr/share/datasets/<name>`` (package
``dataset-fashion-mnist``), then a download from the official location when a network exists.

``TensorLoader`` iterates over in-memory tensors in seeded, per-epoch shuffled batches; it can
shard every global batch across ``world_size`` ranks (DistributedSampler semantics that keep the
global batch identical to a single-process run).
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError, choice


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[str, ...]          # files that must be present (with or without .gz)
    url: str                        # official download location (base URL or archive)
    augment: bool = False           # random crop + flip for training


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), _IDX,
                                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), _IDX,
                         "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), ("data_batch_1", "test_batch"),
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", True),
    "cifar100": DatasetInfo("cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), ("train", "test"),
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", True),
}
SYSTEM_DIR = Path("/usr/share/datasets")
_ARCHIVE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS[choice(name, "--data", DATASETS, "dataset")]


# ----------------------------------------------------------------------------- file readers
def _open(path: Path) -> bytes:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.exists():
            if not p.is_file():   # a FIFO or device would block or never end
                raise UsageError(f"data file {p}: not a regular file; allowed: the dataset's original file")
            try:
                return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            except (OSError, EOFError, zlib.error) as e:
                raise UsageError(f"data file {p}: unreadable ({e}); allowed: the dataset's original file "
                                 f"(delete it and fetch it again)") from None
    raise FileNotFoundError(path)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x00 0x00 <dtype> <ndim>, big-endian dims."""
    raw = _open(Path(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"data file {path}: not an unsigned-byte IDX file; allowed: the dataset's original "
                         f"IDX files (optionally gzipped)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise UsageError(f"data file {path}: malformed IDX header ({ndim} dimensions declared, {len(raw)} bytes); "
                         f"allowed: the dataset's original IDX files")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    count = math.prod(dims)
    if data.size != count:
        raise UsageError(f"data file {path}: truncated (expected {count} values, found {data.size}); "
                         f"allowed: a complete IDX file (delete it and fetch it again)")
    return data.reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain: builtins and numpy arrays. Anything else is refused."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _open(Path(path))                 # the file or its .gz, as locate() accepts
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any decoding problem is a bad data file
        raise UsageError(f"data file {path}: not a CIFAR python batch ({e})") from None
    return x, y


# ----------------------------------------------------------------------------- locating data
def _under(root: Path, info: DatasetInfo) -> list[Path]:
    """The directories below ``root`` where ``info``'s files may lie (as given, or as unpacked)."""
    archive = _ARCHIVE_DIRS.get(info.name, info.name)
    return [root, root / info.name, root / archive, root / info.name / archive]


def _candidates(info: DatasetInfo) -> list[Path]:
    """Where the files are looked for without --data-dir: $SPARSETRAIN_DATA, then the system's."""
    env = os.environ.get("SPARSETRAIN_DATA")
    return [*(_under(Path(env), info) if env else []), SYSTEM_DIR / info.name,
            SYSTEM_DIR / info.name.replace("-", "_")]


def _missing(d: Path, info: DatasetInfo, files=None) -> list[str]:
    """Those of ``files`` (default: the dataset's required ones) in ``d`` neither as given nor as .gz."""
    return [f for f in (info.files if files is None else files)
            if not ((d / f).exists() or (d / (f + ".gz")).exists())]


def _has_files(d: Path, info: DatasetInfo) -> bool:
    return not _missing(d, info)


def _download(info: DatasetInfo, root: Path) -> Path:
    target = root / info.name
    target.mkdir(parents=True, exist_ok=True)
    if info.url.endswith(".tar.gz"):
        archive = target / "archive.tar.gz"
        urllib.request.urlretrieve(info.url, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        return target / _ARCHIVE_DIRS[info.name]
    for f in info.files:
        urllib.request.urlretrieve(info.url + f + ".gz", target / (f + ".gz"))
    return target


def locate(name: str, data_dir: str | None = None, download: bool = True) -> Path:
    """The directory holding ``name``'s files, downloading them if needed and possible."""
    info = dataset_info(name)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"--data-dir: {data_dir} is not a readable directory; allowed: a directory holding "
                         f"the dataset's files")
    # a directory the user named is used in full or refused, never skipped for another one
    candidates = _under(Path(data_dir), info) if data_dir is not None else _candidates(info)
    for d in candidates:
        if d.is_dir() and _has_files(d, info):
            return d
    if data_dir is not None:
        partial = [d for d in candidates if d.is_dir() and _missing(d, info) != list(info.files)]
        if partial:
            raise UsageError(f"--data-dir: {partial[0]} lacks {', '.join(_missing(partial[0], info))} of --data "
                             f"{name}; allowed: a directory holding all of {', '.join(info.files)} (optionally .gz)")
    root = Path(data_dir or os.environ.get("SPARSETRAIN_DATA") or Path.home() / ".cache" / "sparsetrain")
    if download:
        try:
            return _download(info, root)
        except (OSError, tarfile.TarError):
            pass
    hint = (" or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else "")
    raise UsageError(
        f"--data {name}: files not found; fixes: put {', '.join(info.files)} in --data-dir or "
        f"$SPARSETRAIN_DATA, install them under {SYSTEM_DIR / name}{hint}, or run once with a "
        f"network so they download to {root}")


def load_arrays(name: str, data_dir: str | None = None, download: bool = True):
    """(x_train uint8 NCHW, y_train int64, x_test, y_test) as numpy arrays."""
    info = dataset_info(name)
    d = locate(name, data_dir, download)
    if name in ("mnist", "fashion-mnist"):
        xs = [read_idx(d / f) for f in info.files]
        for f, a, shape in zip(info.files, xs, (info.in_shape[1:], (), info.in_shape[1:], ())):
            if a.shape[1:] != shape:
                what = f"images of {'×'.join(map(str, shape))} pixels" if shape else "one label per sample"
                raise UsageError(f"data file {d / f}: shape {a.shape} where --data {name} has {what}; allowed: "
                                 f"the dataset's original files")
        return _checked(name, d, xs[0][:, None], xs[1].astype(np.int64), xs[2][:, None], xs[3].astype(np.int64))
    if name == "cifar10":
        present = [f for f in (f"data_batch_{i}" for i in range(1, 6)) if not _missing(d, info, (f,))]
        parts = [read_cifar_batch(d / f) for f in present]
        te = read_cifar_batch(d / "test_batch")
    else:
        parts, te = [read_cifar_batch(d / "train")], read_cifar_batch(d / "test")
    return _checked(name, d, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    te[0], te[1])


def _checked(name: str, d: Path, xtr, ytr, xte, yte):
    """The arrays, once every split holds samples with labels in [0, num_classes)."""
    classes = dataset_info(name).num_classes
    for split, x, y in (("training", xtr, ytr), ("test", xte, yte)):
        if len(x) != len(y):
            raise UsageError(f"--data-dir {d}: {split} image and label counts differ ({len(x)}/{len(y)}); "
                             f"allowed: matching image and label files")
        if len(y) == 0:
            raise UsageError(f"--data-dir {d}: the {split} files hold no samples; allowed: the dataset's files")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise UsageError(f"--data-dir {d}: {split} labels range over [{lo}, {hi}] but --data {name} has "
                             f"{classes} classes; allowed: labels in [0, {classes - 1}]")
    return xtr, ytr, xte, yte


# ----------------------------------------------------------------------------- loaders
def normalize(x_uint8: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    x = torch.from_numpy(np.array(x_uint8, dtype=np.float32)).div_(255.0)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x - mean) / std


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, on a whole batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    out = padded[idx_n, torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class TensorLoader:
    """Batches over in-memory tensors.

    Each epoch's order is drawn from ``torch.Generator().manual_seed(seed + epoch)`` so that a
    resumed run sees exactly the batches an uninterrupted one would. With ``world_size > 1``
    every global batch of ``batch_size`` samples is split between ranks (rank r takes positions
    r, r+W, ...), so that averaging gradients across ranks reproduces the single-process step.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, augment: bool = False, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.rank, self.world_size, self.drop_last = augment, rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(len(self.x), generator=g) if self.shuffle else torch.arange(len(self.x))
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = batch[self.rank::self.world_size]
            if self.augment:   # augment the global batch, then shard: the same draws on every rank
                xb = augment_crop_flip(self.x[batch], g)[self.rank::self.world_size]
            else:
                xb = self.x[idx]
            yield xb, self.y[idx]


@dataclass
class Loaders:
    train: TensorLoader
    val: TensorLoader | None
    test: TensorLoader
    info: DatasetInfo


def make_loaders(name: str = "fashion-mnist", data_dir: str | None = None, batch_size: int = 128,
                 seed: int = 0, val_fraction: float = 0.0, train_subset: int | None = None,
                 test_subset: int | None = None, eval_batch_size: int = 1000, rank: int = 0,
                 world_size: int = 1, download: bool = True) -> Loaders:
    """Normalised tensors for ``name`` split into train / (seeded) validation / test loaders."""
    info = dataset_info(name)
    xtr, ytr, xte, yte = load_arrays(name, data_dir, download)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(xtr), generator=g)
    n_val = int(round(val_fraction * len(xtr)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    if train_subset:
        tr_idx = tr_idx[:train_subset]
    if len(tr_idx) == 0:
        raise UsageError(f"--val-fraction: {val_fraction:g} of {len(xtr)} samples leaves none to train on; "
                         f"allowed: a fraction that keeps at least one training sample")
    x_all, y_all = normalize(xtr, info), torch.from_numpy(np.array(ytr))
    x_test, y_test = normalize(xte, info), torch.from_numpy(np.array(yte))
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    train = TensorLoader(x_all[tr_idx], y_all[tr_idx], batch_size, shuffle=True, seed=seed,
                         augment=info.augment, rank=rank, world_size=world_size)
    val = TensorLoader(x_all[val_idx], y_all[val_idx], eval_batch_size) if n_val else None
    return Loaders(train, val, TensorLoader(x_test, y_test, eval_batch_size), info)


class UserLoader:
    """Wraps a user's ``Dataset`` (batched, seeded per epoch) or ``DataLoader`` (used as is)."""

    def __init__(self, data, batch_size: int, shuffle: bool, seed: int = 0):
        from torch.utils.data import DataLoader
        self.seed, self.generator = seed, None
        if isinstance(data, DataLoader):
            self.loader = data
        else:
            self.generator = torch.Generator().manual_seed(seed)
            self.loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1000003 + epoch)
        if hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def user_loaders(train, test, batch_size: int = 128, seed: int = 0, num_classes: int | None = None,
                 name: str = "custom") -> Loaders:
    """Loaders over any map-style ``Dataset`` or ready ``DataLoader`` of ``(x, label)`` pairs.

    ``num_classes`` defaults to 1 + the largest label of ``test`` (scanned once)."""
    test_loader = UserLoader(test, 1000, shuffle=False)
    x0, _ = next(iter(test_loader))
    if num_classes is None:
        num_classes = 1 + max(int(y.max()) for _, y in test_loader)
    info = DatasetInfo(name, tuple(x0.shape[1:]), num_classes, (), (), (), "")
    return Loaders(UserLoader(train, batch_size, shuffle=True, seed=seed), None, test_loader, info)
