"""CIFAR-10 ResNets (He et al. 2016, option A shortcuts), as in Yerlan Idelbayev's pytorch_resnet_cifar10.

The architecture matches his checkpoints key for key, so `cifar10_resnet20.th`
and friends load with strict=True. Option A: the shortcut of a downsampling
block subsamples by 2 and zero-pads the missing channels (no parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LambdaLayer(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channel padding."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.in_planes, self.planes = in_planes, planes
        self.pad_channels = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))


class ZeroPadShortcut(nn.Conv2d):
    """The option-A shortcut as the 1x1 stride-2 convolution it equals: weight[pad + i, i] = 1, frozen.

    F.pad places input channel i at output channel pad + i, a coupling that a dependency
    graph cannot see, so channel pruning would misalign the residual Add. As a convolution
    the coupling is explicit: pruning removes its rows with the block's output channels and
    its columns with the input's, and the function stays exact. Its weights are 0 and 1,
    which INT8 represents exactly; it adds 2 x 131k MACs to ResNet-20's 41M.
    """

    def __init__(self, in_planes: int, planes: int):
        super().__init__(in_planes, planes, 1, stride=2, bias=False)
        pad = (planes - in_planes) // 2
        with torch.no_grad():
            self.weight.zero_()
            self.weight[pad : pad + in_planes, :, 0, 0] = torch.eye(in_planes)
        self.weight.requires_grad_(False)


def option_a_as_convolutions_(model: nn.Module) -> list[tuple[str, LambdaLayer, ZeroPadShortcut]]:
    """Replace every option-A LambdaLayer shortcut with its ZeroPadShortcut (same outputs); returns what was replaced
    (name, the shortcut, its convolution), for the caller to prove."""
    replaced = []
    for parent_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LambdaLayer):
                conv = ZeroPadShortcut(child.in_planes, child.planes).to(next(model.parameters()).device)
                setattr(module, name, conv)
                replaced.append((f"{parent_name}.{name}" if parent_name else name, child, conv))
    return replaced


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def cifar_resnet(name: str, num_classes: int = 10) -> CifarResNet:
    n = DEPTHS[name]
    return CifarResNet((n, n, n), num_classes=num_classes)
