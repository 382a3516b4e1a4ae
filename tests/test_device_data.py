"""scripts/device_data.py: the bundles a GPU call carries give back the very pixels and bytes they were made from."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image

_spec = importlib.util.spec_from_file_location("device_data", Path(__file__).parents[1] / "scripts" / "device_data.py")
device_data = importlib.util.module_from_spec(_spec)
sys.modules["device_data"] = device_data  # its dataclasses look their module up
_spec.loader.exec_module(device_data)


def _assets(tmp_path: Path, per_class: int = 25) -> Path:
    assets = tmp_path / "assets"
    make_image_folder(assets / "data" / "cifar10" / "train", classes=3, per_class=per_class, seed=5)
    (assets / "models").mkdir(parents=True)
    (assets / "models" / "cifar10_resnet20.th").write_bytes(bytes(range(256)) * 7)
    return assets


def test_pack_and_unpack_give_back_the_same_pixels_and_bytes(tmp_path):
    assets = _assets(tmp_path)  # 75 images: one full sheet of 64 and one of 11
    out = tmp_path / "carry"
    assert device_data.main(["pack", "cifar10_train", "resnet20", "--assets", str(assets), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cifar10_train.npz", "resnet20.npz"]
    assert device_data.main(["unpack", "--from", str(out), "--into", str(tmp_path / "back")]) == 0
    originals = sorted(assets.rglob("*.png"))
    assert len(originals) == 75
    for f in originals:
        back = tmp_path / "back" / f.relative_to(assets)
        assert np.array_equal(np.asarray(Image.open(back).convert("RGB")), np.asarray(Image.open(f).convert("RGB")))
    model = "models/cifar10_resnet20.th"
    assert (tmp_path / "back" / model).read_bytes() == (assets / model).read_bytes()


def test_images_of_another_size_are_refused_naming_the_file(tmp_path, capsys):
    assets = _assets(tmp_path, per_class=3)
    odd = next((assets / "data" / "cifar10" / "train").rglob("*.png"))
    Image.new("RGB", (40, 32)).save(odd)
    assert device_data.main(["pack", "cifar10_train", "--assets", str(assets), "--out", str(tmp_path / "c")]) == 2
    assert str(odd) in capsys.readouterr().err and not list((tmp_path / "c").glob("*.npz"))


@pytest.mark.parametrize("damage", ["truncated", "escaping_name"])
def test_a_damaged_bundle_is_refused_and_writes_nothing(tmp_path, capsys, damage):
    out = tmp_path / "carry"
    out.mkdir()
    if damage == "truncated":
        (out / "x.npz").write_bytes(b"PK\x03\x04 not a zip")
    else:
        np.savez(out / "x.npz", names=np.array([b"../outside.txt"]), blob=np.frombuffer(b"hi", np.uint8),
                 offsets=np.array([0, 2]), webp_sheet=np.int64(0), shape=np.array((0, 0, 0)))
    assert device_data.main(["unpack", "--from", str(out), "--into", str(tmp_path / "back" / "in")]) == 2
    assert "x.npz" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_a_bundle_with_nothing_to_pack_names_the_patterns(tmp_path, capsys):
    assert device_data.main(["pack", "coco_tiny", "--assets", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "data/coco_tiny/*/*" in capsys.readouterr().err


def test_a_bundle_in_parts_unpacks_to_the_whole(tmp_path):
    assets = _assets(tmp_path, per_class=30)  # 90 images, 45 a part
    out = tmp_path / "carry"
    assert device_data.main(["pack", "cifar10_train", "--parts", "2", "--assets", str(assets), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cifar10_train-1of2.npz", "cifar10_train-2of2.npz"]
    assert device_data.main(["unpack", "--from", str(out), "--into", str(tmp_path / "back")]) == 0
    originals = sorted(f.relative_to(assets) for f in assets.rglob("*.png"))
    assert sorted(f.relative_to(tmp_path / "back") for f in (tmp_path / "back").rglob("*.png")) == originals
