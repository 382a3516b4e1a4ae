"""Data sources, deterministic sampling, calibration sets, and bad-data errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.data import build_calib_set, build_dataset, check_readable, verify_calib_set
from workbench.errors import DataError
from workbench.schema import DataConfig, DataSplit, TransformConfig


def _data(**splits) -> DataConfig:
    return DataConfig(transform=TransformConfig(), **{k: DataSplit(**v) for k, v in splits.items()})


def test_imagefolder_labels_and_seeded_sampling(images):
    data = _data(evaluation={"source": "imagefolder", "path": str(images), "count": 7, "seed": 3})
    ds = build_dataset(data, "evaluation")
    again = build_dataset(data, "evaluation")
    assert len(ds) == 7 and ds.labeled
    assert [s.key for s in ds.samples] == [s.key for s in again.samples]
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y in (0, 1, 2)
    other = build_dataset(_data(evaluation={"source": "imagefolder", "path": str(images), "count": 7, "seed": 4}),
                          "evaluation")
    assert [s.key for s in other.samples] != [s.key for s in ds.samples]


def test_random_crops_are_reproducible_and_distinct(images):
    split = {"source": "imagefolder", "path": str(images), "count": 40, "seed": 1,
             "transform": {"random_resized_crop": 16, "scale": [0.3, 1.0]}}
    a = build_dataset(_data(calibration=split), "calibration")
    b = build_dataset(_data(calibration=split), "calibration")
    assert len(a) == 40  # more than the 18 images: cycling with distinct crops
    assert torch.equal(a[25][0], b[25][0])
    assert a[0][0].shape == (3, 16, 16)
    same_image = [i for i in range(40) if a.samples[i].key == a.samples[0].key and i != 0]
    assert not torch.equal(a[0][0], a[same_image[0]][0])


def test_training_augmentation_varies_per_draw_and_keeps_the_size(images):
    aug = {"source": "imagefolder", "path": str(images), "transform": {"pad_crop": 4, "hflip": True}}
    ds = build_dataset(_data(finetune=aug), "finetune")
    plain = build_dataset(_data(finetune={"source": "imagefolder", "path": str(images)}), "finetune")
    torch.manual_seed(0)
    draws = torch.stack([ds[0][0] for _ in range(8)])
    assert draws.shape == (8, 3, 32, 32)
    assert len({d.sum().item() for d in draws}) > 1  # a new crop and flip on every draw
    original = plain[0][0]

    def is_shifted_copy(d):  # the interior of each draw is the image moved by at most 4 pixels, maybe mirrored
        return any(torch.equal(v[:, 8:24, 8:24], original[:, 8 + dy : 24 + dy, 8 + dx : 24 + dx])
                   for v in (d, d.flip(-1)) for dy in range(-4, 5) for dx in range(-4, 5))

    assert all(is_shifted_copy(d) for d in draws)


@pytest.mark.parametrize("where", ["transform", "evaluation"])
def test_augmentation_outside_the_finetune_split_is_refused(images, where):
    transform = {"hflip": True}
    with pytest.raises(ValueError, match="training augmentation; set them on data.finetune.transform"):
        if where == "transform":
            DataConfig(transform=TransformConfig(**transform))
        else:
            _data(evaluation={"source": "imagefolder", "path": str(images), "transform": transform})


def test_count_beyond_images_without_crops_is_an_error(images):
    with pytest.raises(DataError, match="count is 100 but the source holds only 18"):
        build_dataset(_data(calibration={"source": "imagefolder", "path": str(images), "count": 100}), "calibration")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="data.evaluation.path.*does not exist"):
        build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path / "nope")}), "evaluation")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path / "empty")}), "evaluation")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path / "flat")}), "evaluation")


def test_unreadable_image_is_named(images):
    bad = images / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = build_dataset(_data(evaluation={"source": "imagefolder", "path": str(images)}), "evaluation")
    with pytest.raises(DataError, match="broken.png cannot be read"):
        check_readable(ds, "data.evaluation")


def test_files_with_wordnet_prefix_labels(tmp_path):
    # Class indices of the full ImageNet-1k list (tench 0, goldfish 1, toilet tissue 999), not of the ids present.
    for name in ["n01443537_b.png", "n01440764_a.png", "n15075141_c.png", "n01440764_d.png"]:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    ds = build_dataset(_data(evaluation={"source": "files", "path": str(tmp_path), "labels": "wnid_prefix"}),
                       "evaluation")
    assert {s.key.rsplit("/", 1)[1]: s.label for s in ds.samples} == {
        "n01440764_a.png": 0, "n01440764_d.png": 0, "n01443537_b.png": 1, "n15075141_c.png": 999}


def test_package_images(tmp_path):
    pytest.importorskip("skimage", reason="scikit-image not installed")
    ds = build_dataset(_data(calibration={"source": "package", "package": "skimage",
                                          "pattern": ["data/*.png", "data/*.jpg"]}), "calibration")
    assert len(ds) > 10 and not ds.labeled
    with pytest.raises(DataError, match="not installed"):
        build_dataset(_data(calibration={"source": "package", "package": "no_such_pkg_abc"}), "calibration")


def test_hf_load_from_disk(tmp_path, images):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.open(p).convert("RGB") for p in sorted(images.glob("*/*.png"))[:5]]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "label": [0, 1, 2, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    built = build_dataset(_data(evaluation={"source": "hf", "path": str(tmp_path / "hf")}), "evaluation")
    assert len(built) == 5 and [s.label for s in built.samples] == [0, 1, 2, 1, 0]
    assert built[2][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="label_column: 'cls' is not a column"):
        build_dataset(_data(evaluation={"source": "hf", "path": str(tmp_path / "hf"), "label_column": "cls"}),
                      "evaluation")


def test_calib_set_build_is_reproducible(tmp_path, images, monkeypatch):
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "mini.yaml").write_text(
        f"description: test set\nsource: imagefolder\npath: {images}\ncount: 10\nseed: 2\n"
        "transform: {random_resized_crop: 16}\n"
    )
    monkeypatch.setenv("WORKBENCH_CALIBRATION_DATA", str(defs))
    m1 = json.loads(build_calib_set("mini", tmp_path / "a").read_text())
    m2 = json.loads(build_calib_set("mini", tmp_path / "b").read_text())
    assert m1["count"] == 10 and [f["sha256"] for f in m1["files"]] == [f["sha256"] for f in m2["files"]]
    assert verify_calib_set(tmp_path / "a") == []
    (tmp_path / "a" / "0003.png").write_bytes((tmp_path / "a" / "0004.png").read_bytes())
    assert verify_calib_set(tmp_path / "a") == ["0003.png"]
    # The materialised folder reproduces the on-the-fly tensors exactly.
    data = DataConfig(calibration=DataSplit(calib_set="mini"),
                      evaluation=DataSplit(source="files", path=str(tmp_path / "b"), pattern="*.png"))
    live, saved = build_dataset(data, "calibration"), build_dataset(data, "evaluation")
    assert all(torch.equal(live[i][0], saved[i][0]) for i in range(10))
    with pytest.raises(DataError, match="not empty"):
        build_calib_set("mini", tmp_path / "a")
    with pytest.raises(DataError, match="no calibration set named 'maxi'"):
        build_calib_set("maxi", tmp_path / "c")


def test_hf_imagefolder_builder(images, monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    built = build_dataset(_data(evaluation={"source": "hf", "name": "imagefolder", "path": str(images)}), "evaluation")
    assert len(built) == 18 and built.labeled
    assert sorted({s.label for s in built.samples}) == [0, 1, 2]


def test_calib_set_count_and_seed_overrides(tmp_path, images, monkeypatch):
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "mini.yaml").write_text(f"source: imagefolder\npath: {images}\ncount: 10\nseed: 5\n")
    monkeypatch.setenv("WORKBENCH_CALIBRATION_DATA", str(defs))

    def keys(**kw):
        return [s.key for s in build_dataset(DataConfig(calibration=DataSplit(calib_set="mini", **kw)),
                                             "calibration").samples]

    assert len(keys()) == 10 and len(keys(count=4)) == 4
    assert keys() == keys(seed=5) != keys(seed=0)
