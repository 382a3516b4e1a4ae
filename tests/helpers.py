"""Small models and generated images for the tests (no network, no shared assets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


class PaddedConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward, like EfficientNet-Lite's static-padding convs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 3, subclass_conv: bool = False):
        super().__init__()
        conv = PaddedConv2d if subclass_conv else (lambda i, o, k, **kw: nn.Conv2d(i, o, k, padding=1, **kw))
        self.conv1 = conv(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = conv(8, 16, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = conv(16, 16, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        torch.manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                # Non-trivial statistics so folding BN really changes the weights.
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(x.mean((2, 3)))


def tiny_cnn(num_classes: int = 3, subclass_conv: bool = False) -> TinyCNN:
    return TinyCNN(num_classes, subclass_conv).eval()


def nan_cnn(num_classes: int = 3) -> TinyCNN:
    """A model whose second layer sees NaN: calibration must refuse it."""
    model = TinyCNN(num_classes)
    with torch.no_grad():
        model.bn1.running_var.fill_(-1.0)  # sqrt of a negative variance -> NaN activations
    return model.eval()


def make_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """root/<class>/<n>.png with seeded colour blobs, a different mean colour per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3))
            base[..., c % 3] = 160
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
