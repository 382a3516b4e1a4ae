"""benchmarks/ptq_peers.py compares the workbench with NNCF, AIMET and Brevitas only if every one of them sees the same
files: its split must be the same on every call, and calibration and evaluation must not share an image."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.assets, pytest.mark.slow]


@pytest.fixture
def ptq_peers(assets):
    import ptq_peers

    return ptq_peers


@pytest.mark.parametrize("model", ["resnet20", "efficientnet_lite0"])
def test_the_split_is_the_same_on_every_call_and_disjoint(ptq_peers, model):
    first, again = ptq_peers.split_files(model), ptq_peers.split_files(model)
    assert first == again  # a seeded draw, in a fixed order: NNCF's images are the workbench's
    assert first["calibration"] and first["evaluation"]
    assert not set(first["calibration"]) & set(first["evaluation"])


def test_efficientnet_follows_issue_18s_wnid_split(ptq_peers):
    files = ptq_peers.split_files("efficientnet_lite0", calib_count=300)
    digit = {split: {int(re.match(r"n\d*(\d)_", Path(f).name).group(1)) % 2 for f in names}
             for split, names in files.items()}
    assert digit == {"calibration": {0}, "evaluation": {1}}  # even wnids calibrate, odd ones evaluate
    assert len(files["calibration"]) == 300
    # The evaluation half is all odd-wnid images, whatever the calibration count: the same 516 as issue 18's QAT.
    assert files["evaluation"] == ptq_peers.split_files("efficientnet_lite0", calib_count=100)["evaluation"]
    assert len(files["evaluation"]) == len(list(Path(files["evaluation"][0]).parent.glob("n*[13579]_*.JPEG")))
