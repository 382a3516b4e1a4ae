"""build: a TensorRT engine from the run's exported ONNX (see runtime/tensorrt.py).

Without `tensorrt` (or a GPU) the stage records why no engine was built and the run goes
on to its reports, unless `required: true`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import RecipeError
from ..runtime.tensorrt import BuildRequest, Profile, TensorRTUnavailable, build_engine, check_request
from ..recipe import MAX_BATCH, ImageSide
from .registry import StageOptions, register_stage


def default_timing_cache() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench")) / "tensorrt_timing.cache"


class BuildOptions(StageOptions):
    precision: Literal["int8", "fp16", "fp32"] = Field("int8", description="int8: the Q/DQ graph (model.onnx); fp16/fp32: the FP32 graph.")
    min_batch: int = Field(1, ge=1, le=MAX_BATCH, description="Smallest batch of the optimization profile.")
    opt_batch: int = Field(8, ge=1, le=MAX_BATCH, description="Batch TensorRT tunes for.")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="Largest batch.")
    min_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="Smallest (H, W), for graphs exported with dynamic_size.")
    opt_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="(H, W) TensorRT tunes for (default: the recipe's input size).")
    max_size: tuple[ImageSide, ImageSide] | None = Field(None, description="Largest (H, W).")
    strongly_typed: bool = Field(True, description="Precisions from the graph (TensorRT 10's recommended mode for Q/DQ).")
    fp16: bool = Field(True, description="Weakly typed builds: allow FP16 for the layers the graph keeps float.")
    workspace_mib: int = Field(4096, ge=16, description="Builder workspace limit.")
    timing_cache: str | None = Field(None, description="Timing cache file, read and updated by every build (default: ~/.cache/workbench).")
    sparse_weights: bool = Field(False, description="Let TensorRT use 2:4 sparse kernels (after prune: sparsity_2to4).")
    required: bool = Field(False, description="Fail the run when TensorRT is missing (default: record why and go on).")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        return self


def build_request(run, opts: BuildOptions) -> BuildRequest:
    onnx = run.state.get("onnx", {})
    path = onnx.get("model") if opts.precision == "int8" else (onnx.get("fp32") or onnx.get("model"))
    if path is None:
        raise RecipeError("stages.build: there is no exported ONNX yet; put export before build")
    c, h, w = run.recipe.model.input_size
    sizes = [opts.min_size or (h, w), opts.opt_size or (h, w), opts.max_size or (h, w)]
    profile = Profile(*[(b, c, *s) for b, s in zip((opts.min_batch, opts.opt_batch, opts.max_batch), sizes)])
    cache = Path(opts.timing_cache) if opts.timing_cache else default_timing_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    return BuildRequest(Path(path), run.path(f"model_{opts.precision}.engine"), profile, opts.precision, opts.strongly_typed,
                        opts.fp16, opts.workspace_mib, cache, opts.sparse_weights)


@register_stage("build", BuildOptions)
def build(run, opts: BuildOptions) -> None:
    """TensorRT engine (explicit quantization from the Q/DQ ONNX), with a sidecar of what it was built for."""
    req = build_request(run, opts)
    check_request(req)  # a bad profile or a graph without Q/DQ fails with or without TensorRT
    try:
        sidecar = build_engine(req)
    except TensorRTUnavailable as e:
        if opts.required:
            raise
        run.record("build", {"built": False, "reason": str(e)})
        return
    run.state["engine"] = req.engine
    run.record("build", {"built": True, **sidecar})
