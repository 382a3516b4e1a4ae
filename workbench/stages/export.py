"""export: the run's model as ONNX (Q/DQ when calibrated) plus the FP32 model for comparison."""

from __future__ import annotations

import json

from pydantic import Field

from ..errors import ExportError
from ..qdq.export import export_onnx
from ..qdq.graph import qdq_census
from ..qdq.ort_flavour import WeightType, to_ort_int8
from ..qdq.trt_rules import check_qdq
from .registry import StageOptions, register_stage


class ExportOptions(StageOptions):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+ for per-channel Q/DQ; 17 recommended).")
    dynamic_batch: bool = Field(True, description="Batch dimension dynamic in the exported graph.")
    dynamic_size: bool = Field(False, description="Height and width dynamic too.")
    fp32: bool = Field(True, description="Also export the FP32 model as model_fp32.onnx (the baseline in the report), "
                       "and a pruned model before quantization as model_pruned_fp32.onnx.")
    clean: bool = Field(True, description="Clean every exported graph with onnxslim (constant folding, dead and duplicate "
                        "nodes); Q/DQ nodes stay as they are.")
    ort_int8: bool = Field(True, description="For a calibrated model, also write model_int8_ort.onnx: the same ranges laid "
                           "out for ONNX Runtime's integer kernels (INT8 weight initializers, u8 activations).")
    ort_weights: WeightType = Field("auto", description="Weight type of model_int8_ort.onnx: exact (no saturation within "
                                    "the calibrated ranges), s8 (fastest; exact on VNNI CPUs), reduce_range (7-bit where "
                                    "needed), auto (s8 if the CPU running the export has VNNI or is Arm, exact otherwise: "
                                    "set it for the deployment CPU when that differs).")


@register_stage("export", ExportOptions)
def export(run, opts: ExportOptions) -> None:
    """ONNX export (Q/DQ for a calibrated model), checked with onnx.checker; the ONNX Runtime flavour beside it."""
    example = run.example_input(batch=1)
    values = {}

    def write(model, name: str, metadata: dict | None = None):
        path = export_onnx(model, example, run.path(name), opts.opset, opts.dynamic_batch, opts.dynamic_size, metadata,
                           clean=opts.clean)
        values[name] = {"bytes": path.stat().st_size, "census": qdq_census(path)}
        return path

    quantized = "quant" in run.state
    if opts.fp32:
        write(run.reference, "model_fp32.onnx")
        if "pruned_fp32" in run.state and quantized:
            write(run.state["pruned_fp32"], "model_pruned_fp32.onnx")
    if "ptq_model" in run.state:  # after QAT: the PTQ graph too, to compare
        write(run.state["ptq_model"], "model_ptq.onnx")
    metadata = None
    if quantized:
        result = run.state["quant"]
        # The precision plan travels with the graph: which layers were kept float, by PyTorch name.
        metadata = {
            "workbench.float_layers": json.dumps(sorted(set(result.excluded) | set(result.kept_float))),
            "workbench.int8_layers": str(len(result.quantized) - len(set(result.kept_float) & set(result.quantized))),
        }
    path = write(run.model, "model.onnx", metadata)
    values["model.onnx"]["quantized"] = quantized
    ort_path = None
    if quantized:  # TensorRT's Q/DQ rules, node by node (workbench check-onnx)
        names = {n for n, _ in run.model.named_modules()}
        values["model.onnx"]["tensorrt_rules"] = [v.as_dict() for v in check_qdq(path, names)]
        if opts.ort_int8:
            # The TensorRT artifact is written; a graph the converter cannot re-lay is reported, not fatal.
            try:
                conversion = to_ort_int8(path, run.path("model_int8_ort.onnx"), opts.ort_weights)
            except ExportError as e:
                values["model_int8_ort.onnx"] = {"error": str(e)}
            else:
                ort_path = conversion.path
                values["model_int8_ort.onnx"] = {"bytes": ort_path.stat().st_size, **conversion.as_dict()}
    run.state["onnx"] = {
        "model": path,
        "fp32": run.path("model_fp32.onnx") if opts.fp32 else None,
        "pruned_fp32": run.path("model_pruned_fp32.onnx") if "model_pruned_fp32.onnx" in values else None,
        "ptq": run.path("model_ptq.onnx") if "model_ptq.onnx" in values else None,
        "ort_int8": ort_path,
    }
    run.record("export", values)
