"""qat: quantization-aware training of the calibrated model, by distillation from the FP32 model.

Starts from the calibrate stage's model (BatchNorm already folded into the convolutions,
ranges calibrated; with a mixed-precision plan applied, its float layers stay float) and
trains the weights through the fake quantizers (straight-through estimator) with the
shared training loop. Activation ranges stay as calibrated; weight ranges follow the
weights after every step unless `freeze_ranges`. Distillation from the FP32 model needs
only images, so QAT works without labels.

Hands on the PTQ model (`run.artifacts.ptq_model`) so export and evaluate show FP32, PTQ and
QAT side by side; writes `qat.json`, `training_curve_qat.png`, `qat_model.pt` (the
fake-quant state dict) and a checkpoint per epoch (`checkpoints/qat_epoch<N>.pt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..io import atomic_path
from ..report_text import fmt as _fmt
from ..report_text import training_subset as _subset
from ..train.options import FinetuneOptions
from .registry import register_stage


class QatOptions(FinetuneOptions):
    epochs: int = Field(3, ge=1, le=1000, description="Passes over the fine-tune split (QAT needs few).")
    lr: float = Field(1e-4, gt=0, le=0.1, description="Peak learning rate: small, the weights are already trained.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="SGD with Nesterov momentum, or AdamW.")
    freeze_bn_stats: bool = Field(True, description="Keep BatchNorm statistics fixed (those not folded at "
                                  "calibration).")
    freeze_ranges: bool = Field(False, description="Keep the calibrated weight ranges too (default: they follow the "
                                "weights).")


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _qat_section(run_dir: Path, metrics: dict) -> list[str]:
    q = metrics.get("stages", {}).get("qat")
    if not q:
        return []
    lines = ["## Quantization-aware training", ""]
    if q.get("eval") and q.get("eval_before"):
        lines.append(f"{q['eval']['metric']} after each epoch, on {_subset(q, metrics)}: PTQ "
                     f"{_fmt(q['eval_before']['value'])}, after {q['epochs']} QAT epochs {_fmt(q['eval']['value'])}"
                     + (f", FP32 {_fmt(q['eval_fp32']['value'])}" if q.get("eval_fp32") else "") + ".")
    per_epoch = q.get("seconds_per_epoch") or []
    if per_epoch:
        lines.append(f"{sum(per_epoch) / len(per_epoch):.1f} s per epoch. FP32, PTQ and QAT side by side, in PyTorch "
                     "and "
                     "ONNX Runtime: the accuracy table above. Loss and metric per epoch: `training_curve_qat.png`.")
    lines += ["", "![QAT training curve](training_curve_qat.png)", ""]
    return lines


@register_stage("qat", QatOptions, needs=("quantized",), makes=("ptq",), needs_data=("finetune",),
                report=_qat_section, report_position=30)
def qat(run, opts: QatOptions) -> None:
    """Quantization-aware training of the calibrated model (distillation from FP32, STE through the fake quantizers)."""
    import copy

    import torch

    from ..quant.ptq import refresh_weight_ranges_
    from ..train.finetuning import train_stage

    result = run.artifacts.quant
    run.artifacts.ptq_model = copy.deepcopy(run.model)
    after_step = None if opts.freeze_ranges else (lambda: refresh_weight_ranges_(run.model, result))
    summary = train_stage(run, opts, "qat", "training_curve_qat.png", after_step)
    with atomic_path(run.path("qat_model.pt")) as tmp:
        torch.save(run.model.state_dict(), tmp)
    run.record("qat", {**summary, "seconds_per_epoch": [h["seconds"] for h in summary["history"]]})
