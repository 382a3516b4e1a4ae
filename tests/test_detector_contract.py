"""Issue 27: any detector. The decode found in the traced graph and kept float (quant/decode_scope.py), the
detector contract (model.detector), and the pre-processing the model was trained with (resize, channels)."""

import json

import numpy as np
import pytest
import torch
from custom_heads import distribution_head, fastestdet_like, multiscale_anchor
from PIL import Image, ImageDraw
from test_detection_data import write_detection_set

from workbench.cli import main
from workbench.data.detection import ImageInput, coco_dataset, plain_resize
from workbench.quant.config import Int8Config
from workbench.quant.decode_scope import find_decode_scope
from workbench.quant.ptq import quantize_
from workbench.schema import DetectorConfig, ModelConfig, Recipe
from workbench.tasks.detection import UnknownHeadError, decode, model_num_classes
from workbench.tasks.detection_contract import attach_contract

# --- the decode, found in the traced graph ---------------------------------------------------------------------


def test_single_scale_head_decode_is_everything_after_its_one_conv():
    model = fastestdet_like()
    scope = find_decode_scope(model, torch.rand(1, 3, 96, 96))
    assert scope.traced
    assert scope.head_layers == ["head"]  # the features end at the 1x1 head; it stays INT8
    assert scope.layers == {}  # no layer inside the decode
    # its own decode: objectness and box sizes by sigmoid, centres by tanh, classes by softmax
    assert scope.ops["Sigmoid"] == 3 and scope.ops["Tanh"] == 2 and scope.ops["Softmax"] == 1


def test_multi_scale_anchor_head_stops_at_each_scales_conv():
    model = multiscale_anchor()
    scope = find_decode_scope(model, torch.rand(1, 3, 64, 64))
    assert sorted(scope.head_layers) == ["head.convs.0", "head.convs.1", "head.convs.2"]
    assert scope.layers == {} and scope.ops["Sigmoid"] == 3  # one sigmoid per scale; the backbone's ReLUs not
    assert "Relu" not in scope.ops


def test_a_layer_reading_a_softmax_is_part_of_the_decode_whatever_its_class_name():
    model = distribution_head()
    scope = find_decode_scope(model, torch.rand(1, 3, 64, 64))
    assert set(scope.layers) == {"expect.proj"}  # a DFL under another name
    assert sorted(scope.head_layers) == ["box", "cls"]


def test_silu_sigmoids_are_activations_not_decode_marks():
    class SiluExpect(torch.nn.Module):  # a conv after x * sigmoid(x) is a feature layer
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.nn.functional.silu(self.a(x))).flatten(2)

    scope = find_decode_scope(SiluExpect(), torch.rand(1, 3, 8, 8))
    assert scope.layers == {} and scope.head_layers == ["b"]


def test_an_untraceable_model_is_reported_not_fatal():
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"boxes": self.c(x)}, object()  # ONNX cannot export an arbitrary object

    scope = find_decode_scope(Untraceable(), torch.rand(1, 3, 8, 8))
    assert not scope.traced and scope.reason and "not traced" in scope.summary()


def test_calibration_keeps_the_decode_layer_float_and_exclude_still_adds(tmp_path):
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = distribution_head()
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), example_input=x[:1])
    assert "expect.proj" in result.excluded and "expect.proj" not in result.quantized
    assert {"box", "cls"} <= set(result.quantized)
    assert result.decode.layers.keys() == {"expect.proj"}
    off = quantize_(distribution_head(), Int8Config(method="max", decode_float=False), lambda m: m(x),
                    example_input=x[:1])
    assert "expect.proj" in off.quantized and off.decode is None
    both = quantize_(distribution_head(), Int8Config(method="max", exclude=["cls"]), lambda m: m(x),
                     example_input=x[:1])
    assert set(both.excluded) == {"expect.proj", "cls"}


@pytest.fixture
def yolov5n(assets):
    from workbench.models.registry import resolve_model

    return resolve_model(ModelConfig(spec=f"yolov5:{assets / 'models/yolov5n.pt'}")).float()


def test_yolov5n_decode_has_no_layer_and_ends_at_its_three_head_convs(yolov5n):
    scope = find_decode_scope(yolov5n, torch.zeros(1, 3, 128, 128))
    assert sorted(scope.head_layers) == ["model.24.m.0", "model.24.m.1", "model.24.m.2"]
    assert scope.layers == {}


@pytest.mark.parametrize("family", ["yolov8n", "yolo11n"])
def test_ultralytics_decode_keeps_exactly_the_dfl_conv(family):
    pytest.importorskip("ultralytics")
    from workbench.models.registry import resolve_model

    model = resolve_model(ModelConfig(spec=f"ultralytics:{family}.yaml"))
    dfl = [n for n, m in model.named_modules() if type(m).__name__ == "DFL"]
    scope = find_decode_scope(model, torch.zeros(1, 3, 128, 128))
    assert set(scope.layers) == {f"{dfl[0]}.conv"}
    assert len(scope.head_layers) == 6  # box and class branches at three scales


# --- the contract ------------------------------------------------------------------------------------------------


class _Boxes(torch.nn.Module):
    """A fixed output (B, N, 5 + C) in the scorer's form, or the same boxes as xyxy in 0..1 with logit scores."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        g = torch.Generator().manual_seed(0)
        cxcy, wh = torch.rand(200, 2, generator=g) * 64, torch.rand(200, 2, generator=g) * 20 + 4
        self.scores = torch.rand(200, 4, generator=g).clamp(0.01, 0.99)  # objectness + 3 classes
        self.canonical = torch.cat([cxcy, wh, self.scores], 1)
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        if self.form == "canonical":
            y = self.canonical
        else:
            cxcy, wh = self.canonical[:, :2], self.canonical[:, 2:4]
            xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) / 64
            y = torch.cat([xyxy, self.scores.logit()], 1)
        return (y + self.p).expand(x.shape[0], -1, -1)


def test_a_declared_form_decodes_to_the_same_boxes_as_the_scorers_own():
    x = torch.zeros(2, 3, 64, 64)
    reference = decode(_Boxes("canonical")(x), 3)
    model = attach_contract(_Boxes("other"), DetectorConfig(layout="anchor_objectness", boxes="xyxy",
                                                            units="normalized", scores="logits"))
    converted = decode(model(x), 3)
    for a, b in zip(converted, reference):
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_declared_layout_the_output_contradicts_names_the_field():
    model = attach_contract(_Boxes("canonical"), DetectorConfig(layout="anchor_free"))
    with pytest.raises(UnknownHeadError, match=r"model\.detector\.layout: declared anchor_free.*reads as "
                                               r"anchor_objectness"):
        model(torch.zeros(1, 3, 64, 64))


def test_a_declared_layout_decides_the_class_count():
    model = attach_contract(_Boxes("canonical"), DetectorConfig(layout="anchor_objectness"))
    assert model_num_classes(model, (3, 64, 64)) == 3


def test_export_metadata_reads_a_single_number_stride():
    from workbench.tasks import Classes
    from workbench.tasks.detection import DetectionTask

    model = distribution_head()  # its own `stride = 16`, an int, not a head's list of strides
    meta = DetectionTask().onnx_metadata(model, Classes(3, None), (3, 64, 64), False, False)
    assert meta["stride"] == "16" and meta["workbench.output_layout"].startswith("(batch, 4 + classes, boxes)")


def test_the_contract_and_plain_resize_belong_to_detectors():
    base = {"name": "r", "model": {"spec": "torchvision:resnet18", "detector": {"units": "normalized"}},
            "data": {}, "stages": []}
    with pytest.raises(ValueError, match="model.detector: declares a detector's output"):
        Recipe.model_validate(base)
    base["model"].pop("detector")
    base["data"] = {"transform": {"resize": [224, 224]}}
    with pytest.raises(ValueError, match=r"data\.transform\.resize: \[height, width\] is a detector's"):
        Recipe.model_validate(base)
    base["data"] = {"transform": {"resize": [224, 224], "letterbox": [224, 224]}}
    with pytest.raises(ValueError, match="letterbox and resize"):
        Recipe.model_validate({**base, "task": "detection"})
    with pytest.raises(ValueError, match="detector"):
        Recipe.model_validate({**base, "task": "detection", "data": {},
                               "model": {"spec": "x:y", "detector": {"boxes": "ltrb"}}})


# --- pre-processing ----------------------------------------------------------------------------------------------


def test_plain_resize_maps_a_known_box_back_exactly():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([40, 20, 119, 59], fill=(255, 0, 0))  # x 40..120, y 20..60 (exclusive ends)
    pixels, lb = plain_resize(img, (80, 50))  # x0.25 in width, x0.8 in height: the aspect ratio is not kept
    assert pixels.shape == (80, 50, 3) and (lb.ratio, lb.ry) == (0.25, 0.8)
    box = np.array([[40, 20, 120, 60]], dtype=np.float64)
    on_input = lb.to_input(box)
    np.testing.assert_allclose(on_input, [[10, 16, 30, 48]])
    red = (pixels[..., 0] > 128) & (pixels[..., 1] < 64)
    ys, xs = np.nonzero(red)  # the rectangle is where the mapping says, give or take the bilinear edge
    assert abs(xs.min() - 10) <= 1 and abs(xs.max() + 1 - 30) <= 1 and abs(ys.min() - 16) <= 1
    assert abs(ys.max() + 1 - 48) <= 1
    np.testing.assert_allclose(lb.to_original(on_input), box)


def test_bgr_model_scores_as_its_rgb_twin_when_the_recipe_says_bgr(tmp_path):
    images, ann, _ = write_detection_set(tmp_path / "set")
    rgb = fastestdet_like()
    bgr = fastestdet_like()
    with torch.no_grad():  # the same network trained on BGR: its first conv reads the channels reversed
        bgr.stem[0].weight.copy_(rgb.stem[0].weight.flip(1))
    as_rgb = coco_dataset(images, ann, (64, 64), 16)
    as_bgr = coco_dataset(images, ann, (64, 64), 16)
    as_bgr.prep = ImageInput(channels="bgr")
    right = wrong = 0.0
    with torch.no_grad():
        for i in range(len(as_rgb)):
            x_rgb, _ = as_rgb[i]
            x_bgr, _ = as_bgr[i]
            assert torch.equal(x_bgr, x_rgb.flip(0))
            right = max(right, (bgr(x_bgr[None]) - rgb(x_rgb[None])).abs().max().item())
            # without the declaration the BGR model sees the wrong channels
            wrong = max(wrong, (bgr(x_rgb[None]) - rgb(x_rgb[None])).abs().max().item())
    assert right < 1e-5 and wrong > 100 * max(right, 1e-7)


def test_a_custom_detector_runs_from_the_recipe_alone(tmp_path):
    """import: + trust_code + model.detector + resize: calibrate, export (metadata), evaluate on ONNX Runtime."""
    images, ann, _ = write_detection_set(tmp_path / "set")
    recipe = tmp_path / "r.yaml"
    tests_dir = __import__("pathlib").Path(__file__).parent
    recipe.write_text(f"""name: custom
task: detection
model:
  spec: "import:custom_heads:fastestdet_like"
  trust_code: true
  import_path: "{tests_dir}"
  input_size: [3, 64, 64]
  detector: {{layout: anchor_objectness, units: normalized}}
data:
  transform: {{resize: [64, 64], stride: 16, channels: bgr}}
  calibration: {{source: coco, path: "{images}", annotations: "{ann}"}}
  evaluation: {{source: coco, path: "{images}", annotations: "{ann}"}}
  batch_size: 2
detection: {{conf: 0.001}}
runs_dir: "{tmp_path / 'runs'}"
stages:
  - calibrate: {{method: max}}
  - export: {{}}
  - evaluate: {{latency_repeats: 1, latency_batch_sizes: [1],
                backends: [pytorch_fp32, pytorch_int8, ort_int8_faithful]}}
""")
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    decode_float = metrics["stages"]["calibrate"]["decode_float"]
    assert decode_float["traced"] and decode_float["head_layers"] == ["head"]
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(run_dir / "model.onnx")).metadata_props}
    assert meta["workbench.resize"] == "resize" and meta["workbench.channels"] == "bgr"
    assert "Output decode, kept float: decode after 1 head layer(s)" in (run_dir / "report.md").read_text()
    backends = metrics["stages"]["evaluate"]["backends"]
    assert backends["pytorch_int8"]["metrics"]["samples"] == backends["pytorch_fp32"]["metrics"]["samples"] > 0


def test_a_wrong_declared_layout_stops_the_run_at_preflight_naming_the_field(tmp_path, capsys):
    images, ann, _ = write_detection_set(tmp_path / "set")
    tests_dir = __import__("pathlib").Path(__file__).parent
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: wrong
task: detection
model: {{spec: "import:custom_heads:fastestdet_like", trust_code: true, import_path: "{tests_dir}",
        input_size: [3, 64, 64], detector: {{layout: anchor_free, units: normalized}}}}
data:
  transform: {{resize: [64, 64], stride: 16}}
  calibration: {{source: coco, path: "{images}", annotations: "{ann}"}}
  evaluation: {{source: coco, path: "{images}", annotations: "{ann}"}}
runs_dir: "{tmp_path / 'runs'}"
stages: [calibrate: {{method: max}}]
""")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.detector.layout: declared anchor_free" in err and "Traceback" not in err



def test_the_build_guard_feeds_a_detector_graph_the_input_its_export_recorded(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from workbench.api import _guard_images

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 64])])
    model = helper.make_model(graph)
    meta = {"task": "detect", **ImageInput(fit="resize", channels="bgr").metadata((32, 64))}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, tmp_path / "model.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    img = Image.new("RGB", (48, 48), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([0, 0, 23, 47], fill=(255, 0, 0))  # red left half: B and R tell BGR from RGB
    img.save(folder / "a.png")
    _, _, batches = _guard_images(tmp_path / "model.onnx", [1, 3, 32, 64], str(folder), None)
    (_, images), = list(batches)
    expected, _ = ImageInput(fit="resize", channels="bgr")(img, (32, 64), 16)
    np.testing.assert_array_equal(images[0], expected.numpy())  # stretched (no grey pad) and BGR


def test_normalized_boxes_scale_by_the_input_size_in_a_dynamic_size_export(tmp_path):
    """units: normalized multiplies by the input's width and height: traced from the input's shape, so a graph
    exported with dynamic height and width scales each size by its own (not the export's, as a constant would)."""
    import onnxruntime as ort

    from workbench.tasks.detection_contract import DetectorContract

    contract = DetectorContract("anchor_objectness", "cxcywh", "normalized", "probabilities")

    class Normalized(torch.nn.Module):  # 20 boxes of (cx, cy, w, h, obj, cls) in 0..1, from the image's mean
        def forward(self, x):
            rows = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True).flatten(1)[:, :1]).expand(-1, 6)
            return contract.convert(rows[:, None, :].expand(-1, 20, -1).contiguous(), x)

    path = tmp_path / "n.onnx"
    torch.onnx.export(Normalized(), (torch.rand(1, 3, 64, 64),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((64, 64), (96, 128)):
        x = torch.rand(1, 3, h, w)
        got = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, Normalized()(x).numpy(), rtol=1e-5, atol=1e-5)
