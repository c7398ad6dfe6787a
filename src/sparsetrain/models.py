"""The networks of the seed papers and their baselines, by name.

=============  ==========================================================================
lenet300       MLP 784-300-100-10 (LeCun et al.)
mlp-bregman    MLP 784-200-80-10 (Bregman learning paper, MNIST)
lenet5         conv(6,5)-pool-conv(16,5)-pool-fc120-fc84-fc10 (ReLU, max-pool)
convnet        Bregman Fashion-MNIST ConvNet: conv(1→64,5)-pool-ReLU-conv(64→64,5)-pool-ReLU-
               fc(1024→128)-ReLU-fc(128→10)
vgg16          VGG-16 with BatchNorm for 32×32 inputs (HALO paper; smaller inputs are padded)
resnet18       ResNet-18 for CIFAR (3×3 stem, no max-pool; Bregman paper)
resnet20/56    the CIFAR ResNets of He et al. (3 stages of 16/32/64 channels; xRDA paper)
=============  ==========================================================================
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .errors import UsageError, choice


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet5(in_shape, num_classes) -> nn.Sequential:
    c, h, w = in_shape
    pad = 2 if h == 28 else 0                  # 28×28 inputs are padded to LeNet's 32×32
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def convnet(in_shape, num_classes) -> nn.Sequential:
    c, h, _ = in_shape
    side = ((h - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(c, 64, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(64, 64, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(in_shape, num_classes) -> nn.Sequential:
    """VGG-16-bn; five 2× max-pools need 32 px, so smaller inputs (28×28) get the missing pixels
    as extra zero padding of the first conv (28×28 → 32×32 feature maps)."""
    layers: list[nn.Module] = []
    c, h, w = in_shape
    first = (1 + max(0, -(-(32 - h) // 2)), 1 + max(0, -(-(32 - w) // 2)))
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            pad = first if not layers else 1
            layers += [nn.Conv2d(c, v, 3, padding=pad, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3×3 stem, stages of BasicBlocks, global average pool, linear head."""

    def __init__(self, in_ch: int, widths: list[int], blocks: list[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, Callable[[tuple, int], nn.Module]] = {
    "lenet300": lambda s, k: mlp([s[0] * s[1] * s[2], 300, 100, k]),
    "mlp-bregman": lambda s, k: mlp([s[0] * s[1] * s[2], 200, 80, k]),
    "lenet5": lenet5,
    "convnet": convnet,
    "vgg16": vgg16,
    "resnet18": lambda s, k: ResNet(s[0], [64, 128, 256, 512], [2, 2, 2, 2], k),
    "resnet20": lambda s, k: ResNet(s[0], [16, 32, 64], [3, 3, 3], k),
    "resnet56": lambda s, k: ResNet(s[0], [16, 32, 64], [9, 9, 9], k),
}


def build_model(name: str, in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A freshly initialised model ``name`` for inputs of ``in_shape`` (C, H, W)."""
    return MODELS[choice(name, "--model", MODELS, "model")](tuple(in_shape), num_classes)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(name: str) -> bool:
    """Whether built-in model ``name`` has BatchNorm layers (built on the meta device: no memory)."""
    with torch.device("meta"):
        return bool(batchnorm_layers(build_model(name)))


@torch.no_grad()
def check_input(model: nn.Module, in_shape, num_classes: int, device, field: str, name: str, data: str) -> None:
    """Refuse (UsageError) a model that cannot take the data's inputs or gives the wrong number of
    outputs, before any training: one forward pass of two zero samples in eval mode (BatchNorm
    statistics untouched)."""
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *in_shape, device=device))
    except RuntimeError as e:
        reason = (str(e).splitlines() or ["RuntimeError"])[0][:200]
        raise UsageError(f"{field}: {name} cannot take {data}'s {'×'.join(map(str, in_shape))} inputs ({reason}); "
                         f"allowed: a model for inputs of that shape") from None
    finally:
        model.train(was)
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{field}: {name} returns {shape} for a batch of 2, but {data} has {num_classes} classes; "
                         f"allowed: a model with outputs of shape (batch, {num_classes})")
