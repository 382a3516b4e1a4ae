"""export: the run's model as ONNX (Q/DQ when calibrated) plus the FP32 model for comparison."""

from __future__ import annotations

import json

from pydantic import Field

from ..onnx_tools import export_onnx, qdq_census
from ..qdq_check import check_qdq
from .registry import StageOptions, register_stage


class ExportOptions(StageOptions):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+ for per-channel Q/DQ; 17 recommended).")
    dynamic_batch: bool = Field(True, description="Batch dimension dynamic in the exported graph.")
    dynamic_size: bool = Field(False, description="Height and width dynamic too.")
    fp32: bool = Field(True, description="Also export the FP32 model as model_fp32.onnx (the baseline in the report), "
                       "and a pruned model before quantization as model_pruned_fp32.onnx.")


@register_stage("export", ExportOptions)
def export(run, opts: ExportOptions) -> None:
    """ONNX export (Q/DQ for a calibrated model), checked with onnx.checker."""
    example = run.example_input(batch=1)
    values = {}
    if opts.fp32:
        path = export_onnx(run.reference, example, run.path("model_fp32.onnx"), opts.opset, opts.dynamic_batch, opts.dynamic_size)
        values["model_fp32.onnx"] = {"bytes": path.stat().st_size, "census": qdq_census(path)}
        if "pruned_fp32" in run.state and "quant" in run.state:
            path = export_onnx(run.state["pruned_fp32"], example, run.path("model_pruned_fp32.onnx"), opts.opset,
                               opts.dynamic_batch, opts.dynamic_size)
            values["model_pruned_fp32.onnx"] = {"bytes": path.stat().st_size, "census": qdq_census(path)}
    if "ptq_model" in run.state:  # after QAT: the PTQ graph too, to compare
        path = export_onnx(run.state["ptq_model"], example, run.path("model_ptq.onnx"), opts.opset, opts.dynamic_batch,
                           opts.dynamic_size)
        values["model_ptq.onnx"] = {"bytes": path.stat().st_size, "census": qdq_census(path)}
    metadata = None
    if "quant" in run.state:
        result = run.state["quant"]
        # The precision plan travels with the graph: which layers were kept float, by PyTorch name.
        metadata = {
            "workbench.float_layers": json.dumps(sorted(set(result.excluded) | set(result.kept_float))),
            "workbench.int8_layers": str(len(result.quantized) - len(set(result.kept_float) & set(result.quantized))),
        }
    path = export_onnx(run.model, example, run.path("model.onnx"), opts.opset, opts.dynamic_batch, opts.dynamic_size, metadata)
    values["model.onnx"] = {"bytes": path.stat().st_size, "census": qdq_census(path), "quantized": "quant" in run.state}
    if "quant" in run.state:  # TensorRT's Q/DQ rules, node by node (workbench check-onnx)
        names = {n for n, _ in run.model.named_modules()}
        values["model.onnx"]["tensorrt_rules"] = [v.as_dict() for v in check_qdq(path, names)]
    run.state["onnx"] = {"model": path, "fp32": run.path("model_fp32.onnx") if opts.fp32 else None,
                         "pruned_fp32": run.path("model_pruned_fp32.onnx") if "model_pruned_fp32.onnx" in values else None,
                         "ptq": run.path("model_ptq.onnx") if "model_ptq.onnx" in values else None}
    run.record("export", values)
