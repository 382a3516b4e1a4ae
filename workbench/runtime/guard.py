"""The engine guard: an engine is handed on only if it computes the function of the graph it was built from.

An INT8 engine (OpenVINO, TensorRT) picks its own kernels for the Q/DQ graph; on some CPUs a kernel choice
has broken the function silently (OpenVINO on the TensorRT-style yolov5n graph: mAP 0.310 -> 0.039, with
nothing said). The build stage runs the engine beside the faithful execution of the same graph (ONNX
Runtime with graph optimisations off) on calibration images and compares: the task's agreement (top-1,
or the reference's confident boxes found again) and the SQNR of the raw outputs. Below the thresholds the
engine is refused, with what was measured and, where the graph can be tapped, the first layer whose
output diverges.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class GuardResult:
    engine: str
    samples: int
    agreement: float | None  # percent; None where nothing was there to agree on (no confident box)
    compared: int  # what the agreement counts: samples (classifiers) or reference boxes (detectors)
    sqnr_db: float
    min_agreement: float
    min_sqnr_db: float

    @property
    def passed(self) -> bool:
        if self.agreement is not None:
            return self.agreement >= self.min_agreement
        return self.sqnr_db >= self.min_sqnr_db  # no confident output to agree on: the raw outputs must match

    def describe(self) -> str:
        agree = (f"agreement {self.agreement:.2f}% over {self.compared} compared" if self.agreement is not None
                 else "no agreement measurable (the faithful graph makes no confident prediction)")
        return (f"{self.engine} against the faithful graph on {self.samples} calibration images: {agree}, output SQNR "
                f"{self.sqnr_db:.1f} dB (needs agreement >= {self.min_agreement:g}%, or SQNR >= "
                f"{self.min_sqnr_db:g} dB where no agreement is measurable)")

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_engine(engine, faithful, batches, task, num_classes: int | None, min_agreement: float,
                   min_sqnr_db: float) -> GuardResult:
    """Run `engine` and `faithful` (runners) on `batches` of images and compare their outputs."""
    agreeing = compared = samples = 0
    signal = noise = 0.0
    for images in batches:
        ref, out = faithful(images), engine(images)
        a, c = task.agreement_counts(out, ref, num_classes)
        agreeing, compared, samples = agreeing + a, compared + c, samples + int(images.shape[0])
        ref64, out64 = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
        signal += float((ref64 ** 2).sum())
        noise += float(((out64 - ref64) ** 2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return GuardResult(engine=getattr(engine, "name", "engine"), samples=samples,
                       agreement=100.0 * agreeing / compared if compared else None, compared=compared, sqnr_db=sqnr,
                       min_agreement=min_agreement, min_sqnr_db=min_sqnr_db)
