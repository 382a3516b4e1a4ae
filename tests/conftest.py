import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WORKBENCH_NO_PROGRESS", "1")

from helpers import make_image_folder  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


@pytest.fixture
def images(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def assets() -> Path:
    if not (ASSETS / "models").is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set WORKBENCH_ASSETS to ../shared/assets)")
    return ASSETS


def tiny_recipe(images: Path, runs: Path, stages: str = None, extra_model: str = "") -> str:
    stages = stages or ("  - calibrate: {method: max}\n  - export: {}\n"
                        "  - evaluate: {latency_repeats: 2, latency_batch_sizes: [1]}\n")
    return f"""name: tiny
model:
  spec: "import:helpers:tiny_cnn"
  input_size: [3, 32, 32]
  trust_code: true
{extra_model}data:
  calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}
  evaluation: {{source: imagefolder, path: "{images}"}}
  batch_size: 4
runs_dir: "{runs}"
stages:
{stages}"""
