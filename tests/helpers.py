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
        torch.manual_seed(0)  # before the layers: every TinyCNN starts as the same model, whatever ran before
        conv = PaddedConv2d if subclass_conv else (lambda i, o, k, **kw: nn.Conv2d(i, o, k, padding=1, **kw))
        self.conv1 = conv(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = conv(8, 16, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = conv(16, 16, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        torch.manual_seed(0)  # the BN statistics as before the seed above existed (trained_cnn's weights unchanged)
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


def colour_blob_batch(
    n_per_class: int = 16, classes: int = 3, size: int = 32, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images like make_image_folder's, as a normalised batch (ImageNet mean/std) with labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            base = np.zeros((size, size, 3))
            base[..., c % 3] = 160
            images.append(np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8) / 255.0)
            labels.append(c)
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                 torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    return (x - mean) / std, torch.tensor(labels)


def trained_cnn(num_classes: int = 3, steps: int = 40) -> TinyCNN:
    """TinyCNN trained for a second on colour blobs: its predictions depend on the image, as a real model's do."""
    key = (num_classes, steps)
    if key not in _TRAINED:
        _TRAINED[key] = _train_tiny(num_classes, steps).state_dict()
    model = TinyCNN(num_classes)
    model.load_state_dict(_TRAINED[key])
    return model.eval()


_TRAINED: dict = {}  # trained once per test session


def _train_tiny(num_classes: int, steps: int) -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN(num_classes)
    x, y = colour_blob_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def outlier_cnn(num_classes: int = 3) -> TinyCNN:
    """A trained model with one layer that INT8 ruins: channel 0 of conv2's input is a constant 5000
    that conv2 ignores (zero weights), so a max-calibrated range of 5000 rounds every other channel to 0."""
    model = trained_cnn(num_classes)
    with torch.no_grad():
        model.bn1.bias[0] = 5000.0
        model.bn1.weight[0] = 0.0
        model.conv2.weight[:, 0] = 0.0
    return model


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


def make_tiny_yolov5_checkpoint(path: Path, nc: int = 3, names: bool = True,
                                objectness_bias: float | None = None, tamper=None) -> Path:
    """A randomly initialised YOLOv5-v6-style detector pickled as YOLOv5 pickles it (models.common.*, models.yolo.*).

    The classes are ours, renamed into fake `models.common` / `models.yolo` modules while
    saving, so the file references exactly the globals a real YOLOv5 checkpoint does.
    names: the model carries class names c0, c1, ...; objectness_bias: every box's objectness logit is shifted by it
    (-30: the detector is never confident); tamper: a function given the half-precision model just before it is
    saved (hostile-checkpoint tests edit it there).
    """
    import sys
    import types

    from workbench.models import yolov5_legacy as y

    fake = {"models": types.ModuleType("models"), "models.common": types.ModuleType("models.common"),
            "models.yolo": types.ModuleType("models.yolo")}
    renamed = {}
    for cls, mod in [(y.Conv, "models.common"), (y.Bottleneck, "models.common"), (y.C3, "models.common"),
                     (y.SPPF, "models.common"), (y.Concat, "models.common"), (y.Detect, "models.yolo"),
                     (y.Model, "models.yolo")]:
        new = type(cls.__name__, (cls,), {"__module__": mod})
        setattr(fake[mod], cls.__name__, new)
        renamed[cls.__name__] = new

    def conv(c1, c2, k=1, s=1):
        m = renamed["Conv"]()
        m.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        m.bn = nn.BatchNorm2d(c2)
        m.act = nn.SiLU()
        return m

    def c3(c1, c2):
        m = renamed["C3"]()
        m.cv1, m.cv2, m.cv3 = conv(c1, c2 // 2), conv(c1, c2 // 2), conv(c2, c2)
        b = renamed["Bottleneck"]()
        b.cv1, b.cv2, b.add = conv(c2 // 2, c2 // 2), conv(c2 // 2, c2 // 2, 3), True
        m.m = nn.Sequential(b)
        return m

    def sppf(c1, c2):
        m = renamed["SPPF"]()
        m.cv1, m.cv2, m.m = conv(c1, c1 // 2), conv(c1 * 2, c2), nn.MaxPool2d(5, 1, 2)
        return m

    torch.manual_seed(0)
    layers = [conv(3, 8, 3, 2), conv(8, 16, 3, 2), c3(16, 16), conv(16, 32, 3, 2), sppf(32, 32)]
    detect = renamed["Detect"]()
    detect.nc, detect.no, detect.nl, detect.na = nc, nc + 5, 2, 3
    detect.register_buffer("anchors", torch.tensor([[[2.5, 3.25], [4.0, 7.5], [8.25, 5.75]],
                                                    [[1.9, 3.8], [3.9, 2.8], [3.7, 7.4]]]))
    detect.stride = torch.tensor([4.0, 8.0])
    detect.m = nn.ModuleList([nn.Conv2d(16, 3 * (nc + 5), 1), nn.Conv2d(32, 3 * (nc + 5), 1)])
    layers.append(detect)
    for i, layer in enumerate(layers):
        layer.f, layer.i, layer.type, layer.np = (-1 if i < 5 else [2, 4]), i, type(layer).__name__, 0
    model = renamed["Model"]()
    model.model, model.save, model.stride = nn.Sequential(*layers), [2, 4], detect.stride
    if names:
        model.names = [f"c{k}" for k in range(nc)]
    if objectness_bias is not None:
        with torch.no_grad():
            for head_conv in detect.m:
                head_conv.bias.view(3, nc + 5)[:, 4] += objectness_bias
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    for p in model.parameters():  # as YOLOv5 saves its checkpoints
        p.requires_grad_(False)
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        model = model.half()
        if tamper is not None:
            tamper(model)
        torch.save({"model": model, "epoch": -1}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return path


class PadShortcutNet(nn.Module):
    """A downsampling residual block whose shortcut zero-pads channels with F.pad, inline in forward."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        shortcut = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
        x = torch.relu(self.conv2(x) + shortcut)
        return self.fc(self.conv3(x).mean((2, 3)))


def pad_shortcut_net(num_classes: int = 3) -> PadShortcutNet:
    torch.manual_seed(0)
    return PadShortcutNet(num_classes).eval()


class NanAfterSteps(TinyCNN):
    """Trains normally for 10 training-mode forwards, then outputs NaN (a run that diverges mid-training)."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.training_calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.training_calls += 1
            if self.training_calls > 10:
                return out * float("nan")
        return out


def nan_after_steps_cnn(num_classes: int = 3) -> NanAfterSteps:
    model = NanAfterSteps(num_classes)
    model.load_state_dict(trained_cnn(num_classes).state_dict())
    return model.eval()


def stretched_cnn(num_classes: int = 3, factor: float = 16.0) -> TinyCNN:
    """trained_cnn with one conv1 channel's output `factor` x larger and conv2's reading of it `factor` x smaller.

    The same function (ReLU is positively homogeneous), but per-tensor INT8 now spends its
    range on that channel: the other channels of conv1's folded weights and of conv2's
    input get `factor` x coarser steps. PTQ loses accuracy that QAT can win back.
    """
    model = trained_cnn(num_classes)
    c = int(model.conv1.weight.abs().flatten(1).amax(1).argmax())
    with torch.no_grad():
        model.bn1.weight[c] *= factor
        model.bn1.bias[c] *= factor
        model.conv2.weight[:, c] /= factor
    return model.eval()


class BiasedConvBN(nn.Module):
    """Convolutions with their own bias before BatchNorm (as torchvision's and many hand-written models have):
    folding must keep that bias, scaled by the BN."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.bias.uniform_(-1.0, 1.0)  # large next to the outputs: dropping it moves them far
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def biased_conv_bn_net(num_classes: int = 3) -> BiasedConvBN:
    return BiasedConvBN(num_classes).eval()


class ConcatNet(nn.Module):
    """Two signed branches (Tanh) concatenated into a convolution: the pattern (Concat -> signed Q/DQ -> Conv) that
    OpenVINO computes wrongly on CPUs without AMX, where it shifts signed activations to u8."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.mix = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        x = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], 1)
        return self.fc(torch.tanh(self.mix(x)).mean((2, 3)))


def concat_net(num_classes: int = 10) -> ConcatNet:
    return ConcatNet(num_classes)
