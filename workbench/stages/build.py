"""build: a TensorRT engine from the run's exported ONNX (see runtime/tensorrt.py).

Without `tensorrt` (or a GPU) the stage records why no engine was built and the run goes
on to its reports, unless `required: true`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import MAX_BATCH, ImageSide
from .registry import StageOptions, register_stage


class BuildOptions(StageOptions):
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="int8: the Q/DQ graph (model.onnx); fp16/fp32: the FP32 graph.")
    min_batch: int = Field(1, ge=1, le=MAX_BATCH, description="Smallest batch of the optimization profile.")
    opt_batch: int = Field(8, ge=1, le=MAX_BATCH, description="Batch TensorRT tunes for.")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="Largest batch.")
    min_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="Smallest (H, W), for graphs exported with dynamic_size.")
    opt_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="(H, W) TensorRT tunes for (default: the recipe's input size).")
    max_size: tuple[ImageSide, ImageSide] | None = Field(None, description="Largest (H, W).")
    strongly_typed: bool = Field(True, description="Precisions from the graph (TensorRT 10's recommended mode for "
                                 "Q/DQ).")
    fp16: bool = Field(True, description="Weakly typed builds: allow FP16 for the layers the graph keeps float.")
    workspace_mib: int = Field(4096, ge=16, description="Builder workspace limit.")
    timing_cache: str | None = Field(None, description="Timing cache file, read and updated by every build "
                                     "(default: ~/.cache/workbench).")
    sparse_weights: bool = Field(False, description="Let TensorRT use 2:4 sparse kernels (after prune: sparsity_2to4).")
    required: bool = Field(False, description="Fail the run when TensorRT is missing (default: record why and go on).")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch}")
        return self


def _needs(opts: BuildOptions) -> tuple[str, ...]:
    # INT8 compiles the Q/DQ graph, so the model must have been calibrated; FP16/FP32 the FP32 graph.
    return ("quantized", "onnx") if opts.precision == "int8" else ("onnx_fp32",)


@register_stage("build", BuildOptions, needs=_needs, makes=("engine",))
def build(run, opts: BuildOptions) -> None:
    """TensorRT engine (explicit quantization from the Q/DQ ONNX), with a sidecar of what it was built for."""
    from pathlib import Path

    from ..runtime.tensorrt import (
        BuildRequest,
        TensorRTUnavailable,
        build_engine,
        check_request,
        default_timing_cache,
        profile_for,
    )

    onnx = run.artifacts.onnx
    c, h, w = run.recipe.model.input_size
    cache = Path(opts.timing_cache) if opts.timing_cache else default_timing_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    req = BuildRequest(
        onnx=onnx.model if opts.precision == "int8" else onnx.fp32,
        engine=run.path(f"model_{opts.precision}.engine"),
        profile=profile_for(c, (opts.min_batch, opts.opt_batch, opts.max_batch),
                            [opts.min_size or (h, w), opts.opt_size or (h, w), opts.max_size or (h, w)]),
        precision=opts.precision, strongly_typed=opts.strongly_typed, fp16=opts.fp16,
        workspace_mib=opts.workspace_mib, timing_cache=cache, sparse_weights=opts.sparse_weights,
    )
    check_request(req)  # a bad profile or a graph without Q/DQ fails with or without TensorRT
    try:
        sidecar = build_engine(req)
    except TensorRTUnavailable as e:
        if opts.required:
            raise
        run.record("build", {"built": False, "reason": str(e)})
        return
    run.artifacts.engine = req.engine
    run.record("build", {"built": True, **sidecar})
