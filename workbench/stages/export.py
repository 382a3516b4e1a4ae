"""export: the run's model as ONNX (Q/DQ when calibrated) plus the FP32 model for comparison."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..artifacts import OnnxFiles
from ..qdq import WeightType
from ..report_text import md_name, md_text
from .registry import Restorer, StageOptions, register_stage


class ExportOptions(StageOptions):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+ for per-channel Q/DQ; 17 recommended).")
    dynamic_batch: bool = Field(True, description="Batch dimension dynamic in the exported graph.")
    dynamic_size: bool = Field(False, description="Height and width dynamic too.")
    fp32: bool = Field(True, description="Also export the FP32 model as model_fp32.onnx (the baseline in the report), "
                       "and a pruned model before quantization as model_pruned_fp32.onnx.")
    clean: bool = Field(True, description="Clean every exported graph with onnxslim (constant folding, dead and "
                        "duplicate nodes); Q/DQ nodes stay as they are.")
    ort_int8: bool = Field(True, description="For a calibrated model, also write model_int8_ort.onnx: the same ranges "
                           "laid out for ONNX Runtime's integer kernels (INT8 weight initializers, u8 activations).")
    ort_weights: WeightType = Field("auto", description="Weight type of model_int8_ort.onnx: exact (no saturation "
                                    "within the calibrated ranges), s8 (fastest; exact on VNNI CPUs), reduce_range "
                                    "(7-bit where needed), auto (s8 if the CPU running the export has VNNI or is Arm, "
                                    "exact otherwise: set it for the deployment CPU when that differs).")


def _makes(opts: ExportOptions, made: set[str]) -> set[str]:
    quantized = "quantized" in made
    out = {"onnx"}
    if opts.fp32 or not quantized:  # an unquantized model.onnx is itself the FP32 graph
        out.add("onnx_fp32")
    if opts.fp32 and quantized and "pruned" in made:
        out.add("onnx_pruned_fp32")
    if "ptq" in made:
        out.add("onnx_ptq")
    if quantized and opts.ort_int8:  # unless the converter cannot re-lay the graph: reported, not fatal
        out.add("ort_int8")
    return out


# File names, as export writes them and resume finds them again.
MODEL, FP32, PRUNED_FP32, PTQ, ORT_INT8 = (
    "model.onnx", "model_fp32.onnx", "model_pruned_fp32.onnx", "model_ptq.onnx", "model_int8_ort.onnx")


def onnx_files(run, written: set[str]) -> OnnxFiles:
    """The hand-over record of the ONNX files in the run directory named in `written`."""
    quantized = run.artifacts.quant is not None
    path = {name: run.path(name) if name in written else None for name in (MODEL, FP32, PRUNED_FP32, PTQ, ORT_INT8)}
    return OnnxFiles(model=path[MODEL], fp32=path[FP32] or (path[MODEL] if not quantized else None),
                     pruned_fp32=path[PRUNED_FP32], ptq=path[PTQ], ort_int8=path[ORT_INT8])


# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def _exported_files(options, values) -> list[str]:
    return [n for n, v in values.items() if isinstance(v, dict) and "bytes" in v]


def _exported(run, options, values, loaded) -> bool:
    """The ONNX files export wrote (their content already checked against the hashes it recorded)."""
    present = set(_exported_files(options, values))
    if MODEL not in present:
        return False
    run.artifacts.onnx = onnx_files(run, present)
    return True


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _export_section(run_dir: Path, metrics: dict) -> list[str]:
    exp = metrics.get("stages", {}).get("export")
    if not exp:
        return []
    lines = ["## Exported ONNX", ""]
    for name, entry in exp.items():
        if "error" in entry:  # the ONNX Runtime flavour could not be written
            lines.append(f"- `{name}`: not written: {md_text(entry['error'])}")
        elif "skipped" in entry:  # not written for this target (targets.py)
            lines.append(f"- `{name}`: not written: {md_text(entry['skipped'])}")
        elif "census" not in entry:
            lines += _ort_flavour_lines(name, entry)
        else:
            c = entry["census"]
            quantized = ", ".join(f"{v} {k}" for k, v in c["quantized"].items()) or "none"
            floating = ", ".join(f"{len(v)} {k}" for k, v in c["float"].items()) or "none"
            lines.append(
                f"- `{name}`: {entry['bytes'] / 1e6:.2f} MB, opset {c['opset']}, {c['QuantizeLinear']} QuantizeLinear "
                "/ "
                f"{c['DequantizeLinear']} DequantizeLinear; INT8 compute nodes: {quantized}; float compute nodes: "
                f"{floating}."
            )
            for fix in entry.get("shape_fixes", []):
                lines.append(f"  Fixed to run at the declared dynamic batch: {md_text(fix)}.")
            rules = entry.get("tensorrt_rules")
            if rules is not None:
                lines.append(f"  TensorRT Q/DQ rules (`workbench check-onnx`): {len(rules)} violation(s)"
                             + ("." if not rules else ":"))
                lines += [f"  - [{v['rule']}] {md_name(v['node'])}"
                          + (f" (module {md_name(v['module'])})" if v["module"] else "") + f": {md_text(v['message'])}"
                          for v in rules[:20]]
    return lines + [""]


def _ort_flavour_lines(name: str, entry: dict) -> list[str]:
    fused = ", ".join(f"{n} {op}" for op, n in entry["fused"].items())
    lines = [f"- `{name}`: {entry['bytes'] / 1e6:.2f} MB, the ONNX Runtime flavour: {entry['weights_folded']} "
             f"weights stored as 8-bit ({entry['weights']}: {entry['weights_unsigned']} unsigned, "
             f"{entry['weights_7bit']} 7-bit), {entry['absorbed']} Relu/Clip absorbed into quantization; "
             f"ONNX Runtime runs: {fused}."]
    in_float = entry["fused"].get("Conv", 0) + entry["fused"].get("FusedConv", 0)
    if in_float:
        lines.append(f"  {in_float} convolution(s) still run in float in ONNX Runtime: their outputs do not go "
                     "straight to a quantizer (an activation such as SiLU, a pooling head, the graph output), "
                     "so ONNX Runtime cannot make them QLinearConv."
                     + (" No convolution runs on integer kernels: for a CPU deployment `model_fp32.onnx` is faster."
                        if not entry["fused"].get("QLinearConv") else ""))
    return lines


_ORT_SKIPPED = ("target {target}: model.onnx is already in the target's arithmetic, which the ONNX Runtime flavour's "
                "re-lay (u8 shift, Relu/Clip absorbed, 7-bit weights) would change")


@register_stage("export", ExportOptions, makes=_makes, restorer=Restorer(_exported, _exported_files),
                report=_export_section, report_position=50)
def export(run, opts: ExportOptions) -> None:
    """ONNX export (Q/DQ for a calibrated model), checked with onnx.checker; the ONNX Runtime flavour beside it."""
    import json

    from ..errors import ExportError
    from ..qdq.export import export_onnx, shape_fixes
    from ..qdq.graph import qdq_census
    from ..qdq.ort_flavour import to_ort_int8
    from ..qdq.trt_rules import check_qdq
    from ..tasks import Classes

    example = run.example_input(batch=1)
    values = {}
    # What the task's own tools read from a graph (a detector's class names, stride, size: Ultralytics'), in all.
    classes = Classes(run.num_classes(), run.class_names())
    task_metadata = run.task.onnx_metadata(run.reference, classes, run.recipe.model.input_size, opts.dynamic_batch,
                                           opts.dynamic_size)
    task_metadata.update(preprocess_metadata(run.recipe.data))

    def write(model, name: str, metadata: dict | None = None):
        path = export_onnx(model, example, run.path(name), opts.opset, opts.dynamic_batch, opts.dynamic_size,
                           {**task_metadata, **(metadata or {})}, clean=opts.clean)
        values[name] = {"bytes": path.stat().st_size, "census": qdq_census(path)}
        if fixes := shape_fixes(path):  # Reshapes that pinned the declared dynamic batch, freed (qdq/shapes.py)
            values[name]["shape_fixes"] = fixes
        return path

    result = run.artifacts.quant
    if opts.fp32:
        write(run.reference, FP32)
        if run.artifacts.pruned_fp32 is not None and result is not None:
            write(run.artifacts.pruned_fp32, PRUNED_FP32)
    if run.artifacts.ptq_model is not None:  # after QAT: the PTQ graph too, to compare
        write(run.artifacts.ptq_model, PTQ)
    metadata = None
    if result is not None:
        # The precision plan travels with the graph: which layers were kept float, by PyTorch name.
        metadata = {
            "workbench.float_layers": json.dumps(result.float_units()),
            "workbench.int8_layers": str(len(result.quantized) - len(set(result.kept_float) & set(result.quantized))),
        }
        if result.arithmetic.target != "tensorrt":  # `workbench build` compiles such a graph as it is
            metadata["workbench.target"] = json.dumps(result.arithmetic.as_dict())
    path = write(run.model, MODEL, metadata)
    values[MODEL]["quantized"] = result is not None
    # The openvino target's graph has u8 activations with zero points: TensorRT's rules and the ONNX Runtime flavour
    # (a re-lay of a signed graph) are for the other targets' graphs.
    signed = result is None or result.arithmetic.activation_signed
    if result is not None and not signed:
        values[MODEL]["tensorrt_rules"] = None
        values[MODEL]["target"] = result.arithmetic.describe()
        if opts.ort_int8:
            values[ORT_INT8] = {"skipped": _ORT_SKIPPED.format(target=result.arithmetic.target)}
    if result is not None and signed:  # TensorRT's Q/DQ rules, node by node (workbench check-onnx)
        names = {n for n, _ in run.model.named_modules()}
        violations = check_qdq(path, names)
        values[MODEL]["tensorrt_rules"] = [v.as_dict() for v in violations]
        if violations:
            rules = sorted({v.rule for v in violations})
            run.warn(f"export: model.onnx fails check-onnx: {len(violations)} violation(s) of TensorRT's Q/DQ rules "
                     f"({', '.join(rules)}), e.g. {violations[0]}; TensorRT would run those nodes in float or not "
                     "fuse them (the report lists them)")
        if opts.ort_int8 and result.arithmetic.target != "tensorrt":
            values[ORT_INT8] = {"skipped": _ORT_SKIPPED.format(target=result.arithmetic.target)}
        elif opts.ort_int8:
            # The TensorRT artifact is written; a graph the converter cannot re-lay is reported, not fatal.
            try:
                conversion = to_ort_int8(path, run.path(ORT_INT8), opts.ort_weights)
            except ExportError as e:
                values[ORT_INT8] = {"error": str(e)}
            else:
                values[ORT_INT8] = {"bytes": conversion.path.stat().st_size, **conversion.as_dict()}
    run.artifacts.onnx = onnx_files(run, {name for name, v in values.items() if "bytes" in v})
    run.record("export", values)


def preprocess_metadata(data) -> dict[str, str]:
    """A detector's pre-processing as the evaluation saw it (letterbox or plain resize, channels, pixel scale), so
    whoever deploys the graph feeds it the same pixels; nothing for a classifier's transform."""
    from ..data.datasets import detector_prep

    transform = (data.evaluation.transform if data.evaluation is not None and data.evaluation.transform else None) \
        or data.transform
    fit = transform.detector_input()
    return detector_prep(transform).metadata(fit[0]) if fit is not None else {}
