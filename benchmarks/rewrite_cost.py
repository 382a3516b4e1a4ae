"""What the rewrite checks cost inside `quantize_`: yolov5n (shared assets), 32 random images at 640 px in batches
of 8, the checks on the first 4 (as the calibrate stage does), cProfile's cumulative seconds.

    WORKBENCH_ASSETS=../shared/assets python benchmarks/rewrite_cost.py
"""

import cProfile
import os
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.models.yolov5_legacy import load_yolov5_checkpoint  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402

warnings.filterwarnings("ignore")
m = load_yolov5_checkpoint(Path(os.environ.get("WORKBENCH_ASSETS", "../shared/assets")) / "models" / "yolov5n.pt")
torch.manual_seed(0)
batches = [torch.rand(8, 3, 640, 640) for _ in range(4)]


def loop(model):
    with torch.no_grad():
        for b in batches:
            model(b)


pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
r = quantize_(m, Int8Config(method="max"), loop, batches[0][:4])
pr.disable()
total = time.perf_counter() - t
st = pstats.Stats(pr)


def cum(fn):
    return sum(v[3] for k, v in st.stats.items() if k[2] == fn and "workbench" in k[0])


print(f"quantize_ {total:.1f} s; of which the checked rewrites (fold + residual rule, with their checks) "
      f"{cum('checked_rewrite'):.1f} s, the residual block proofs {cum('insert_residual_quantizers'):.1f} s; "
      f"residual Adds {r.census().get('Add (residual)')}, left alone {len(r.residual_left_alone)}, "
      f"BatchNorms folded {len(r.folded)}")
