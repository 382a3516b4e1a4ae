"""Detector loading: legacy YOLOv5 checkpoints through a restricted unpickler, Ultralytics models offline."""


import pytest
import torch
from helpers import make_tiny_yolov5_checkpoint

from workbench.errors import ModelLoadError
from workbench.models import resolve_model
from workbench.schema import ModelConfig


def test_tiny_yolov5_checkpoint_loads_and_decodes(tmp_path):
    path = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    model = resolve_model(ModelConfig(spec=f"yolov5:{path}"))
    out = model(torch.rand(2, 3, 64, 64))
    # two levels (stride 4 and 8), 3 anchors each: 3 * (16*16 + 8*8) boxes of 5 + 3 values
    assert out.shape == (2, 3 * (16 * 16 + 8 * 8), 8)
    assert out.dtype == torch.float32
    assert (out[..., 4:] >= 0).all() and (out[..., 4:] <= 1).all()  # objectness, class probs
    wide = model(torch.rand(1, 3, 64, 96))
    assert wide.shape == (1, 3 * (16 * 24 + 8 * 12), 8)  # non-square input


def test_yolov5_loader_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ModelLoadError, match=r"__builtin__.print, which a YOLOv5 v6 checkpoint does not need"):
        resolve_model(ModelConfig(spec=f"yolov5:{path}"))


def test_checkpoint_that_is_not_a_detector(tmp_path):
    path = tmp_path / "cls.pt"
    torch.save({"model": torch.nn.Conv2d(2, 2, 1)}, path)  # a layer the loader admits, but no detector
    with pytest.raises(ModelLoadError, match="no YOLOv5 detector"):
        resolve_model(ModelConfig(spec=f"yolov5:{path}"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(ModelConfig(spec=f"yolov5:{tmp_path / 'none.pt'}"))


def test_shared_yolov5n(assets):
    model = resolve_model(ModelConfig(spec=f"yolov5:{assets / 'models/yolov5n.pt'}"))
    assert sum(p.numel() for p in model.parameters()) == 1872157
    assert model(torch.rand(1, 3, 640, 640)).shape == (1, 25200, 85)
    assert model(torch.rand(1, 3, 480, 640)).shape == (1, 18900, 85)


def test_ultralytics_yaml_builds_offline(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics", reason="ultralytics extra not installed")
    model = resolve_model(ModelConfig(spec="ultralytics:yolov8n.yaml"))
    assert model(torch.rand(1, 3, 320, 320)).shape == (1, 84, 2100)
    with pytest.raises(ModelLoadError, match="does not exist: Ultralytics weights are not downloaded here"):
        resolve_model(ModelConfig(spec=f"ultralytics:{tmp_path / 'yolov8n.pt'}"))


def test_ultralytics_dfl_stays_float():
    pytest.importorskip("ultralytics", reason="ultralytics extra not installed")
    from workbench.quant.ptq import Int8Config, quantize_

    model = resolve_model(ModelConfig(spec="ultralytics:yolov8n.yaml"))
    result = quantize_(model, Int8Config(method="max"), lambda m: m(torch.rand(2, 3, 128, 128)),
                       torch.rand(1, 3, 128, 128))
    assert result.excluded == {"model.model.22.dfl.conv": "Conv2d"}
    assert result.census()["Conv2d"] == {"int8": 63, "float": 1}
