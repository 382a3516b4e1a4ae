"""Legacy YOLOv5 (v6.x) checkpoints, loaded without YOLOv5's code and without running arbitrary pickles.

A YOLOv5 `.pt` file pickles the whole model: objects of `models.common.Conv`,
`models.yolo.Detect` and so on. Rather than installing the `yolov5` package
(GPL-3.0, and its loaders reach for a hub), a restricted unpickler maps exactly
those class names onto the small modules below and refuses every other global
but an exact list of torch.nn layers and tensor rebuilders. Unpickling restores
attributes (weights, `f`/`i` wiring, anchors, strides); the forward passes are
written here from the published architecture.

The output is YOLOv5's inference tensor (B, N, 5 + classes): cx, cy, w, h in
input pixels, objectness and class probabilities, already sigmoid-decoded.
"""

from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .checkpoints import check_checkpoint_file, check_loaded_tensors
from .guards import refuse_torchscript


class Conv(nn.Module):
    """conv -> BatchNorm -> activation (attributes conv, bn, act as pickled)."""

    def forward(self, x):
        if hasattr(self, "bn"):
            return self.act(self.bn(self.conv(x)))
        return self.act(self.conv(x))  # fused checkpoints drop bn


class Bottleneck(nn.Module):
    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Anchor-based head: per level a 1x1 conv, then the box decode (kept in float by the quantizer).

    YOLOv5's decode, xy = (2 s + grid) * stride and wh = (2 s)^2 * anchor of the sigmoid s, written as one
    elementwise expression over all channels, s * scale + s^2 * square + offset, instead of splitting the channels
    and concatenating them again: the same function (to float rounding), without the split and concat along the
    last axis that engines run as slow reference kernels (OpenVINO: about a third of yolov5n's INT8 time).
    """

    def forward(self, xs):
        outputs = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            s = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            scale, square, offset = self._decode_terms(nx, ny, i, s)
            outputs.append((s * scale + s * s * square + offset).reshape(bs, -1, self.no))
        return torch.cat(outputs, 1)

    def split_decode(self, xs):
        """YOLOv5's own decode (v6.x models/yolo.py): the channels split into xy, wh and scores, decoded and
        concatenated again. The reference `forward` is proved against when a checkpoint loads."""
        outputs = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            y = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
            grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).to(y) - 0.5
            anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).to(y)
            xy, wh, conf = y.split((2, 2, self.no - 4), 4)
            xy = (xy * 2 + grid) * self.stride[i].to(y)
            wh = (wh * 2) ** 2 * anchor_grid
            outputs.append(torch.cat((xy, wh, conf), 4).view(bs, -1, self.no))
        return torch.cat(outputs, 1)

    def _decode_terms(self, nx: int, ny: int, i: int, like: torch.Tensor):
        """Per channel of (batch, anchor, y, x, channel): scale (2 * stride for xy, 1 for the scores), square
        (4 * anchor for wh) and offset ((grid - 0.5) * stride for xy). Built from the feature map's shape each call,
        so export keeps height and width dynamic."""
        stride = self.stride[i].to(like.dtype)
        ones = torch.ones(self.no, device=like.device, dtype=like.dtype)
        scale = torch.cat((2 * stride * ones[:2], 0 * ones[2:4], ones[4:])).view(1, 1, 1, 1, self.no)
        anchors = (self.anchors[i] * stride).to(like.dtype).view(self.na, 2)
        square = torch.cat((0 * anchors, 4 * anchors, torch.zeros(self.na, self.no - 4, device=like.device,
                                                                  dtype=like.dtype)), 1).view(1, self.na, 1, 1, self.no)
        ys = torch.arange(ny, device=like.device, dtype=like.dtype)
        xs = torch.arange(nx, device=like.device, dtype=like.dtype)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        grid = (torch.stack((xv, yv), 2) - 0.5) * stride
        offset = torch.cat((grid, torch.zeros(ny, nx, self.no - 2, device=like.device, dtype=like.dtype)), 2)
        return scale, square, offset.view(1, 1, ny, nx, self.no)


class Model(nn.Module):
    """The layer graph: each layer reads the previous output or the saved outputs its `f` names."""

    def forward(self, x):
        saved = []
        for layer in self.model:
            if layer.f != -1:
                x = saved[layer.f] if isinstance(layer.f, int) else [x if j == -1 else saved[j] for j in layer.f]
            x = layer(x)
            saved.append(x if layer.i in self.save else None)
        return x


_YOLOV5_CLASSES = {
    ("models.common", "Conv"): Conv,
    ("models.common", "Bottleneck"): Bottleneck,
    ("models.common", "C3"): C3,
    ("models.common", "SPPF"): SPPF,
    ("models.common", "Concat"): Concat,
    ("models.yolo", "Detect"): Detect,
    ("models.yolo", "Model"): Model,
    ("models.yolo", "DetectionModel"): Model,
}
# Exactly the globals a YOLOv5 v6 checkpoint references (logged while loading the released yolov5n.pt):
# never a whole module, since `torch.os`, `torch.hub.os` and `builtins.getattr` each reach os.system.
# Storages are not listed: torch.load resolves every "...Storage" name itself, to a storage type.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("__builtin__", "set"),  # protocol-2 pickles spell builtins so
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch.nn.modules.activation", "SiLU"),
    ("torch.nn.modules.batchnorm", "BatchNorm2d"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("torch.nn.modules.linear", "Identity"),  # Conv(act=False)
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.upsampling", "Upsample"),
}


# The only globals the unpickler may call (REDUCE): a checkpoint builds its modules with NEWOBJ (cls.__new__, no
# __init__) and fills them from their pickled __dict__, so calling a layer class, as in a crafted
# `Conv2d(1, 1, 20000)` that allocates 1.6 GB while unpickling, is never needed and is refused.
_CALLABLE = (collections.OrderedDict, set, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter)


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden, the C one's cannot), restricted to `_ALLOWED` and
    YOLOv5's classes, calling only `_CALLABLE`. A checkpoint's pickle is tens of kilobytes: the speed is no matter."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in _YOLOV5_CLASSES:
            return _YOLOV5_CLASSES[(module, name)]
        # Exact names only: `name` is never a dotted path, which pickle would walk attribute by attribute (so
        # 'torch.nn.modules.module' + 'torch.os.system' reaches os.system through the module's own imports).
        if (module, name) in _ALLOWED and "." not in name:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which a YOLOv5 v6 checkpoint does not need, so it was refused "
            "(the loader unpickles only YOLOv5's classes Conv, C3, Bottleneck, SPPF, Concat, Detect, Model, "
            "the torch.nn layers they use and tensors)"
        )

    def load_reduce(self):
        func = self.stack[-2]
        if not any(func is allowed for allowed in _CALLABLE):  # identity: a restored object may be callable too
            name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"
            raise pickle.UnpicklingError(
                f"it calls {name}(...) while unpickling, which a YOLOv5 v6 checkpoint never does (its layers are "
                "restored from their saved attributes, never constructed), so it was refused"
            )
        super().load_reduce()

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):
        """OBJ and INST call `klass(*args)` as REDUCE does: the same rule (a crafted OBJ `Conv2d(1, 1, 20000)`
        would otherwise allocate while unpickling)."""
        if not any(klass is allowed for allowed in _CALLABLE):
            name = f"{getattr(klass, '__module__', '?')}.{getattr(klass, '__qualname__', type(klass).__name__)}"
            raise pickle.UnpicklingError(
                f"it constructs {name}(...) while unpickling, which a YOLOv5 v6 checkpoint never does (its layers "
                "are restored from their saved attributes, never constructed), so it was refused"
            )
        super()._instantiate(klass, args)


# torch.load takes a module-like object with an Unpickler and load().
_pickle_module = types.SimpleNamespace(Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
                                       __name__="yolov5_restricted")


def load_yolov5_checkpoint(path: str | Path) -> nn.Module:
    """The FP32 eval-mode model from a YOLOv5 v6 `.pt` (its 'ema' if present, else 'model')."""
    path = Path(path)
    check_checkpoint_file(path, "model.spec", "a YOLOv5 v6 checkpoint (.pt)")
    refuse_torchscript(path, "model.spec")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"model.spec: {path} is not a YOLOv5 v6 checkpoint this loader can read: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"model.spec: {path} nests its objects too deeply to be a YOLOv5 checkpoint") from None
    except Exception as e:
        raise ModelLoadError(f"model.spec: cannot read {path} as a PyTorch checkpoint ({e})") from None
    check_loaded_tensors(ckpt, "model.spec", path)  # before .float() or a forward pass copies a tensor
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, Model) or not isinstance(getattr(model, "model", None), nn.Sequential) \
            or not len(model.model) or not isinstance(model.model[-1], Detect):
        raise ModelLoadError(
            f"model.spec: {path} holds no YOLOv5 detector (expected a 'model' entry whose last layer is Detect)"
        )
    _refuse_shadowed_methods(model, path)
    try:
        model = model.float().eval()
        for m in model.modules():
            if isinstance(m, nn.Upsample):
                m.recompute_scale_factor = None  # attribute missing from checkpoints made by older torch
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))  # the restored wiring runs (64: two cells at YOLOv5's stride 32)
    except Exception as e:  # attributes of the wrong type or shape: the file is no YOLOv5 model this code runs
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.spec: {path} holds a YOLOv5 model whose layers do not run on a 64x64 image "
                             f"({type(e).__name__}: {reason[:300]}): the checkpoint is damaged or crafted") from None
    check_decode(model)
    return model


# Attributes YOLOv5 itself sets over an nn.Module method: `type` holds the layer's class name as a string.
_YOLOV5_SHADOWS = {"type"}


def _refuse_shadowed_methods(model: nn.Module, path: Path) -> None:
    """Refuse a layer whose restored attributes replace a method of its class (`forward = "boom"`): unpickling
    restores any attribute a file names, and the model's code would then call the file's value."""
    for name, module in model.named_modules():
        for attr in vars(module):
            if attr not in _YOLOV5_SHADOWS and callable(getattr(type(module), attr, None)):
                raise ModelLoadError(
                    f"model.spec: {path}: layer '{name or type(module).__name__}' ({type(module).__name__}) has an "
                    f"attribute {attr!r} that replaces its class's method of that name: the checkpoint is damaged or "
                    "crafted, and was not run"
                )


def check_decode(model: Model) -> None:
    """Prove the one-expression decode computes YOLOv5's split decode with this checkpoint's anchors and strides, on
    random feature maps of uneven height and width (a swapped x and y shows): a RewriteError otherwise."""
    from .equivalence import require_same

    detect = model.model[-1]
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, conv.in_channels, 3 + i, 5 + 2 * i, generator=generator) for i, conv in enumerate(detect.m)]
    with torch.no_grad():
        ours, reference = detect(xs), detect.split_decode(xs)
    require_same(f"model.{len(model.model) - 1}", reference, ours, 2,
                 what="loading YOLOv5: the box decode written as one expression (instead of YOLOv5's split and concat)",
                 advice="This is a workbench defect, not the checkpoint's: report it.")


_MAX_PICKLE_BYTES = 64 * 2**20  # yolov5x's data.pkl is a few hundred kilobytes: its tensors live in other records


def is_yolov5_checkpoint(path: str | Path) -> bool:
    """Whether a .pt file pickles YOLOv5's own classes (models.yolo.*), read from its pickle's opcodes without
    unpickling anything: an Ultralytics checkpoint names ultralytics.* instead."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
            if info.file_size > _MAX_PICKLE_BYTES:  # inflated, it could be any size: not read here
                return False
            data = archive.read(info)
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):
        return False
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2 and strings[-2].startswith("models."):
                return True
            elif op.name == "GLOBAL" and str(arg).startswith("models."):
                return True
    except Exception:  # a malformed pickle: not one we read as YOLOv5; the loader will say why
        return False
    return False
