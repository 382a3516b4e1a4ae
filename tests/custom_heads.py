"""Two detectors of no known family, written as a user would: each class decodes its own head in forward.

- `FastestDetLike`: a ShuffleNet-ish backbone (channel split, depthwise convolution, channel
  shuffle) and one 1x1 convolution emitting (B, 5 + C, H, W) raw maps at stride 16, decoded with
  sigmoid (objectness, box size), tanh + grid (box centre) and softmax (classes) into
  (B, H * W, 5 + C) with boxes cx, cy, w, h in 0..1 of the input (model.detector.units: normalized).
- `MultiScaleAnchorNet`: three scales (strides 8, 16, 32), three anchors each, a YOLOv5-style
  decode ((2 sigmoid - 0.5 + grid) x stride, (2 sigmoid)^2 x anchor) into (B, N, 5 + C) in pixels,
  in a head class named nothing the workbench knows.
- `DistributionHeadNet`: anchor-free boxes as the expectation of a softmax over distance bins,
  taken by a fixed 1x1 convolution of a class not named DFL: a layer inside the decode.

The factories build them with random weights from a fixed seed: the plumbing's test, not accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    # -1 for the batch, not x.shape[0]: a traced constant batch would pin the export to batch 1
    _, c, h, w = x.shape
    return x.reshape(-1, groups, c // groups, h, w).transpose(1, 2).reshape(-1, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels and transforms half; stride 2 transforms both halves."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        self.branch = nn.Sequential(conv_bn(branch_in, half, 1), conv_bn(half, half, 3, stride, groups=half, act=False),
                                    conv_bn(half, half, 1))
        self.shortcut = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, act=False), conv_bn(cin, half, 1)) \
            if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        return channel_shuffle(out)


class FastestDetLike(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.stem = conv_bn(3, width // 2, 3, 2)  # /2
        self.stages = nn.Sequential(
            ShuffleBlock(width // 2, width, 2), ShuffleBlock(width, width, 1),  # /4
            ShuffleBlock(width, width * 2, 2), ShuffleBlock(width * 2, width * 2, 1),  # /8
            ShuffleBlock(width * 2, width * 2, 2), ShuffleBlock(width * 2, width * 2, 1),  # /16
        )
        self.neck = conv_bn(width * 2, width * 2, 1)
        self.head = nn.Conv2d(width * 2, 5 + num_classes, 1)  # obj, box x4, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.head(self.neck(self.stages(self.stem(x))))  # (B, 5 + C, H, W) raw maps
        _, _, h, w = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, dtype=p.dtype, device=p.device),
                                torch.arange(w, dtype=p.dtype, device=p.device), indexing="ij")
        obj = p[:, 0].sigmoid()
        cx = (p[:, 1].tanh() + gx) / w  # FastestDet's centre: the cell plus an offset in (-1, 1), in 0..1
        cy = (p[:, 2].tanh() + gy) / h
        bw, bh = p[:, 3].sigmoid(), p[:, 4].sigmoid()
        cls = p[:, 5:].softmax(1)
        out = torch.cat([torch.stack([cx, cy, bw, bh, obj], 1), cls], 1)  # (B, 5 + C, H, W)
        return out.flatten(2).transpose(1, 2)  # (B, H * W, 5 + C), boxes in 0..1


class AnchorHead(nn.Module):
    """Three 1x1 convolutions (one per scale) and a YOLOv5-style decode, under a class name of its own."""

    def __init__(self, num_classes: int, channels: tuple[int, ...], strides=(8, 16, 32),
                 anchors=((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))):
        super().__init__()
        self.no, self.na = 5 + num_classes, 3
        self.strides = strides
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(len(strides), 3, 2))
        self.convs = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, (f, conv) in enumerate(zip(features, self.convs)):
            p = conv(f)
            b, _, h, w = p.shape
            p = p.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            gy, gx = torch.meshgrid(torch.arange(h, dtype=p.dtype, device=p.device),
                                    torch.arange(w, dtype=p.dtype, device=p.device), indexing="ij")
            grid = torch.stack([gx, gy], -1).view(1, 1, h, w, 2)
            xy = (p[..., :2] * 2 - 0.5 + grid) * self.strides[i]
            wh = (p[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, self.na, 1, 1, 2)
            out.append(torch.cat([xy, wh, p[..., 4:]], -1).view(b, -1, self.no))
        return torch.cat(out, 1)


class MultiScaleAnchorNet(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 16):
        super().__init__()
        self.c3 = nn.Sequential(conv_bn(3, width, 3, 2), conv_bn(width, width * 2, 3, 2), conv_bn(width * 2, width * 2,
                                                                                                   3, 2))  # /8
        self.c4 = conv_bn(width * 2, width * 4, 3, 2)  # /16
        self.c5 = conv_bn(width * 4, width * 4, 3, 2)  # /32
        self.head = AnchorHead(num_classes, (width * 2, width * 4, width * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.c3(x)
        p4 = self.c4(p3)
        return self.head([p3, p4, self.c5(p4)])


class Expectation(nn.Module):
    """The expected bin of a softmax over `bins` distance bins, by a fixed 1x1 convolution (weights 0..bins-1)."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.proj = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.proj.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4 * bins, N) -> (B, 4, N)
        b, _, n = x.shape
        return self.proj(x.view(b, 4, self.bins, n).transpose(2, 1).softmax(1)).view(b, 4, n)


class DistributionHeadNet(nn.Module):
    """Single-scale anchor-free: (B, 4 + C, N) with boxes decoded from distance distributions (ltrb, in strides)."""

    def __init__(self, num_classes: int = 3, width: int = 16, bins: int = 8, stride: int = 16):
        super().__init__()
        self.stride, self.bins = stride, bins
        self.body = nn.Sequential(conv_bn(3, width, 3, 2), conv_bn(width, width, 3, 2), conv_bn(width, width * 2, 3, 2),
                                  conv_bn(width * 2, width * 2, 3, 2))
        self.box = nn.Conv2d(width * 2, 4 * bins, 1)
        self.cls = nn.Conv2d(width * 2, num_classes, 1)
        self.expect = Expectation(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        b, _, h, w = f.shape
        ltrb = self.expect(self.box(f).flatten(2))  # (B, 4, N) in strides
        gy, gx = torch.meshgrid(torch.arange(h, dtype=f.dtype, device=f.device),
                                torch.arange(w, dtype=f.dtype, device=f.device), indexing="ij")
        centre = torch.stack([gx, gy]).view(1, 2, -1) + 0.5
        x1y1, x2y2 = centre - ltrb[:, :2], centre + ltrb[:, 2:]
        box = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.stride
        return torch.cat([box, self.cls(f).flatten(2).sigmoid()], 1)


def _seeded(cls, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(**kwargs)
    # random BatchNorm statistics, so folding them is exercised; scores spread over (0, 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def fastestdet_like(num_classes: int = 3, seed: int = 0) -> nn.Module:
    return _seeded(FastestDetLike, seed, num_classes=num_classes)


def multiscale_anchor(num_classes: int = 3, seed: int = 0) -> nn.Module:
    return _seeded(MultiScaleAnchorNet, seed, num_classes=num_classes)


def distribution_head(num_classes: int = 3, seed: int = 0) -> nn.Module:
    return _seeded(DistributionHeadNet, seed, num_classes=num_classes)
