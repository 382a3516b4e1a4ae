"""YOLO users as they are: an Ultralytics data.yaml, class names, per-class mAP, ONNX metadata Ultralytics reads,
and agreement that says when it cannot be measured."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_tiny_yolov5_checkpoint
from test_detection_data import many_specs, write_detection_set

from workbench.cli import main

NAMES = ["red", "green", "blue"]  # the classes of write_detection_set's categories 1, 3, 7


def ultralytics_set(root: Path, specs=None, data_yaml: str | None = None) -> Path:
    """write_detection_set's images and YOLO labels laid out as Ultralytics expects: images/{train,val},
    labels/{train,val} and a data.yaml naming the classes."""
    images, _, labels = write_detection_set(root / "src", specs or many_specs(6))
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in images.iterdir():
            shutil.copy(image, root / "images" / split / image.name)
        for label in labels.iterdir():
            shutil.copy(label, root / "labels" / split / label.name)
    shutil.rmtree(root / "src")
    (root / "data.yaml").write_text(data_yaml or (
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES))))
    return root / "data.yaml"


def _recipe(tmp_path: Path, data: str, stages: str, ckpt: Path | None = None) -> Path:
    ckpt = ckpt or make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    text = (f'name: tinyyolo\nmodel: {{spec: "yolov5:{ckpt}", input_size: [3, 64, 64]}}\ndata: {data}\n'
            f'runs_dir: "{tmp_path / "runs"}"\nstages:\n{stages}')
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


STAGES = ("  - calibrate: {method: max}\n  - export: {}\n"
          "  - evaluate: {latency: false, backends: [pytorch_fp32, pytorch_int8, ort_int8_faithful]}\n")


def _metrics(tmp_path: Path) -> tuple[Path, dict]:
    run_dir = next((tmp_path / "runs").iterdir())
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_a_data_yaml_is_the_whole_data_section(tmp_path):
    """`data: data.yaml`: calibrated on train, scored on val, letterboxed to the model's size, classes named."""
    data_yaml = ultralytics_set(tmp_path / "set")
    assert main(["run", str(_recipe(tmp_path, str(data_yaml), STAGES))]) == 0
    run_dir, metrics = _metrics(tmp_path)
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "source: yolo" in recipe and "split: val" in recipe and "task: detection" in recipe
    fp32 = metrics["stages"]["evaluate"]["backends"]["pytorch_fp32"]["metrics"]
    assert fp32["samples"] == 6 and "map50_95" in fp32
    # the model's names (the tiny checkpoint's c0, c1, c2) name the classes; instances are the val labels'
    assert set(fp32["per_class"]) <= {"c0", "c1", "c2"} and sum(c["instances"] for c in fp32["per_class"].values()) == 6
    assert "## Per class" in (run_dir / "report.md").read_text()


def test_list_files_dict_or_list_names_background_images_and_empty_label_files(tmp_path):
    root = tmp_path / "set"
    data_yaml = ultralytics_set(root)
    val = sorted((root / "images" / "val").iterdir())
    (root / "val.txt").write_text("".join(f"./images/val/{p.name}\n" for p in val[:4]))
    (root / "labels" / "val" / f"{val[0].stem}.txt").write_text("")  # an empty label file: no objects
    (root / "labels" / "val" / f"{val[1].stem}.txt").unlink()  # no label file: a background image
    data_yaml.write_text("train: images/train\nval: val.txt\nnames: [red, green, blue]\n")  # path: the YAML's folder
    # The model has no names of its own here: the data.yaml's name the classes.
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3, names=False)
    assert main(["run", str(_recipe(tmp_path, str(data_yaml), STAGES, ckpt))]) == 0
    _, metrics = _metrics(tmp_path)
    fp32 = metrics["stages"]["evaluate"]["backends"]["pytorch_fp32"]["metrics"]
    assert fp32["samples"] == 4 and set(fp32["per_class"]) <= set(NAMES)
    assert sum(c["instances"] for c in fp32["per_class"].values()) == 2  # 4 images, two without objects


@pytest.mark.parametrize("export, dynamic_axes", [
    ("{}", ["batch"]), ("{dynamic_size: true}", ["batch", "height", "width"]), ("{dynamic_batch: false}", []),
])
def test_the_exported_graph_carries_the_metadata_ultralytics_reads(tmp_path, export, dynamic_axes):
    """Ultralytics' AutoBackend (what `yolo val` and `yolo predict` open a model with) reads the names, the stride and
    the size from every exported graph, and the metadata is true of the graph: `dynamic` (Ultralytics' word for a
    dynamic image size) only where height and width are, the export size, the output layout. YOLOv5's
    (B, N, 5 + classes) is not a layout Ultralytics decodes: the task names it rather than claim `detect`."""
    import ast

    import numpy as np
    import onnx
    import torch

    from workbench.models.registry import import_ultralytics
    from workbench.runtime.runners import OrtRunner

    import_ultralytics()  # first: imported this way, Ultralytics leaves PIL and torch unpatched for later tests
    from ultralytics.nn.autobackend import AutoBackend

    data_yaml = ultralytics_set(tmp_path / "set")
    stages = f"  - calibrate: {{method: max}}\n  - export: {export}\n"
    assert main(["run", str(_recipe(tmp_path, str(data_yaml), stages))]) == 0
    run_dir, _ = _metrics(tmp_path)
    for name in ("model.onnx", "model_fp32.onnx", "model_int8_ort.onnx"):
        graph = onnx.load(str(run_dir / name))
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims if d.dim_param] == dynamic_axes, name
        output = OrtRunner(run_dir / name, name)(np.zeros((1, 3, 64, 64), np.float32))
        assert output.shape[2] == 5 + 3 and output.shape[1] > 8, name  # (B, N, 5 + classes)
        meta = {p.key: p.value for p in graph.metadata_props}
        assert ast.literal_eval(meta["args"])["dynamic"] == ("height" in dynamic_axes), name
        assert ast.literal_eval(meta["imgsz"]) == [d.dim_value or 64 for d in dims][2:] == [64, 64], name
        assert meta["workbench.output_layout"].startswith("(batch, boxes, 5 + classes)"), name
        backend = AutoBackend(str(run_dir / name), device=torch.device("cpu"))
        assert backend.task != "detect" and "Ultralytics 8 cannot decode" in backend.task, name
        assert backend.names == {0: "c0", 1: "c1", 2: "c2"}, name
        assert backend.stride == 8 and backend.imgsz == [64, 64] and backend.batch == 1, name


def test_agreement_is_not_measurable_when_the_reference_finds_nothing(tmp_path, capsys):
    """A detector with no confident box (here: its objectness biased to zero) gives no agreement, not 100%."""
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3, objectness_bias=-30.0)
    data_yaml = ultralytics_set(tmp_path / "set")
    assert main(["run", str(_recipe(tmp_path, str(data_yaml), STAGES, ckpt))]) == 0
    run_dir, metrics = _metrics(tmp_path)
    int8 = metrics["stages"]["evaluate"]["backends"]["pytorch_int8"]["metrics"]
    assert int8["box_agreement"] is None and int8["box_agreement_compared"] == 0
    assert "Box agreement is not measurable" in (run_dir / "report.md").read_text()
    assert "Box agreement is not measurable" in capsys.readouterr().out


@pytest.mark.parametrize("change, expected", [
    (lambda root: (root / "data.yaml").write_text("train: images/train\nval: images/nowhere\nnames: [a, b, c]\n"),
     "data.yaml:2: 'val: images/nowhere' is"),
    (lambda root: (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a, b]\n"),
     "names 2 classes but the model has 3"),
    (lambda root: shutil.rmtree(root / "labels" / "val"),
     "of split 'val'"),
    (lambda root: (root / "labels" / "val" / "img00.txt").write_text("7 0.5 0.5 0.1 0.1\n"),
     "img00.txt line 1: class 7 is not below"),
    (lambda root: (root / "data.yaml").write_text("train: images/train\nnames: [a, b, c]\n"),
     "has no 'val:'"),
    (lambda root: (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: a, 2: c}\n"),
     "the keys of 'names' must be the class ids"),
])
def test_a_data_yaml_that_does_not_fit_is_refused_naming_the_file(tmp_path, capsys, change, expected):
    root = tmp_path / "set"
    ultralytics_set(root)
    change(root)
    assert main(["run", str(_recipe(tmp_path, str(root / "data.yaml"), STAGES))]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_key_of_another_source_is_refused(tmp_path, capsys):
    root = tmp_path / "set"
    data_yaml = ultralytics_set(root)
    split = f'{{source: yolo, yaml: "{data_yaml}", split: val, annotations: "{root}/instances.json"}}'
    data = f"\n  transform: {{letterbox: [64, 64]}}\n  calibration: {split}\n  evaluation: {split}"
    assert main(["validate", str(_recipe(tmp_path, data, STAGES))]) == 2
    assert "'annotations' is for source coco, and this split's source is yolo: remove it" in capsys.readouterr().err


def test_quantize_is_one_line_and_writes_the_recipe_it_ran(tmp_path, capsys):
    """`workbench quantize best.pt --data data.yaml` runs calibrate, export, the OpenVINO build and evaluate; the run's
    recipe.yaml runs again to the same numbers."""
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "best.pt", nc=3)
    data_yaml = ultralytics_set(tmp_path / "set", many_specs(18))  # 18 + 18 images: the guard's 90% needs 35
    runs = tmp_path / "runs"
    assert main(["quantize", str(ckpt), "--data", str(data_yaml), "--imgsz", "64", "--method", "max", "--engine",
                 "openvino", "--runs-dir", str(runs)]) == 0
    assert "the recipe it ran:" in capsys.readouterr().out
    (first,) = runs.iterdir()
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["recipe"] == "best_int8" and metrics["stage_names"] == ["calibrate", "export", "build", "evaluate"]
    assert metrics["stages"]["build"]["built"] and "openvino_int8" in metrics["stages"]["evaluate"]["backends"]
    assert main(["run", str(first / "recipe.yaml"), "stages.evaluate.latency=false"]) == 0
    second = next(p for p in runs.iterdir() if p != first)
    again = json.loads((second / "metrics.json").read_text())["stages"]["evaluate"]["backends"]
    for backend in ("pytorch_fp32", "pytorch_int8", "ort_int8_faithful", "openvino_int8"):
        got, want = again[backend]["metrics"], metrics["stages"]["evaluate"]["backends"][backend]["metrics"]
        assert got["map50_95"] == want["map50_95"] and got["per_class"] == want["per_class"], backend


def test_quantize_an_ultralytics_checkpoint_needs_trust(tmp_path, capsys):
    pytest.importorskip("ultralytics")
    from workbench.models.registry import import_ultralytics

    yolo = import_ultralytics().YOLO("yolov8n.yaml")
    yolo.save(str(tmp_path / "best.pt"))
    data_yaml = ultralytics_set(tmp_path / "set")
    assert main(["quantize", str(tmp_path / "best.pt"), "--data", str(data_yaml), "--imgsz", "64",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "trust_pickle" in err and "--trust-pickle" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_released_ultralytics_weights_are_fetched_only_when_allowed():
    from workbench.models.registry import spec_problems
    from workbench.schema import ModelConfig

    problems = spec_problems(ModelConfig(spec="ultralytics:yolov9zz.pt", trust_pickle=True))
    assert any("does not exist" in p and "model.allow_download: true lets Ultralytics fetch its released yolov9zz.pt"
               in p for p in problems)
    assert spec_problems(ModelConfig(spec="ultralytics:yolov9zz.pt", trust_pickle=True, allow_download=True)) == [] \
        or "ultralytics extra" in " ".join(spec_problems(ModelConfig(spec="ultralytics:yolov9zz.pt")))


def test_names_are_read_by_class_id_not_in_the_order_written(tmp_path):
    """`names: {1: car, 0: person}` names class 0 person: read in YAML order, per-class mAP, the report and the
    ONNX metadata would swap the two."""
    from workbench.data.yolo_yaml import read_data_yaml

    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("train: images/val\nval: images/val\nnames:\n  1: car\n  2: bus\n  0: person\n")
    assert read_data_yaml(tmp_path / "data.yaml", "data").names == ["person", "car", "bus"]


def test_the_label_path_replaces_the_last_images_folder(tmp_path):
    """Ultralytics replaces the last `/images/` only: a dataset kept under a parent folder named `images` keeps
    that parent, and a file name with dots keeps all but its suffix."""
    from workbench.data.yolo_yaml import label_path

    image = tmp_path / "images" / "coco" / "images" / "val" / "a.b.jpg"
    assert label_path(image) == tmp_path / "images" / "coco" / "labels" / "val" / "a.b.txt"
