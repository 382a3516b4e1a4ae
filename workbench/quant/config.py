"""The INT8 preset's options: what `quantize_` takes and the calibrate stage's options extend.

Plain data (pydantic only), so a recipe is read and validated without loading torch or modelopt.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Module types the preset can quantize (quant/ptq.py maps them to the torch classes).
QUANTIZABLE_TYPE_NAMES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                          "Linear")


class Int8Config(BaseModel):
    """The INT8 preset for CNNs and its calibration method."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # mse is the default: the best or near-best top-1 and FP32 agreement on both ResNet-20 and
    # EfficientNet-Lite0 (docs/BENCHMARKS.md); entropy lost 0.7 points on EfficientNet-Lite0.
    method: Literal["max", "entropy", "percentile", "mse"] = Field(
        "mse", description="How activation ranges are chosen from the calibration data."
    )
    percentile: float = Field(99.99, description="For method percentile: the share of |x| kept unclipped, in percent.")
    num_bins: int = Field(2048, ge=256, le=65536, description="Histogram bins for entropy/percentile/mse.")
    weights: Literal["per_channel", "per_tensor"] = Field("per_channel", description="Weight scale granularity.")
    layer_types: list[str] = Field(
        default_factory=lambda: ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear"],
        description="Module types quantized (their subclasses too). Choices: " + ", ".join(QUANTIZABLE_TYPE_NAMES),
    )
    exclude: list[str] = Field(default_factory=list, description="Module-name glob patterns kept in float, e.g. 'fc', "
                                                                 "'layer1.*'.")
    decode_float: bool = Field(
        True, description="Find the output decode from the traced graph (the ops after each head's last convolution: "
                          "sigmoid/exp/grid arithmetic/concat/softmax, and layers reading them such as DFL) and keep "
                          "it float; the report lists it. exclude adds to it. The calibrate stage turns it on for "
                          "task: detection and, unless set, off for other tasks.")
    fold_batchnorm: bool = Field(True, description="Fold BatchNorm into the preceding convolution first (refused, "
                                                   "exit 2, if the folded float model computes other outputs).")
    residual_add: bool = Field(
        True, description="Quantize both inputs of residual Adds (YOLO Bottlenecks, ResNet blocks), so TensorRT fuses "
                          "them into the convolution. Only blocks whose rewrite is proved to keep their output are "
                          "rewritten; the others keep a float Add and are reported."
    )

    @field_validator("percentile")
    @classmethod
    def _percentile_range(cls, v: float) -> float:
        if not 0 < v <= 100:
            raise ValueError("percentile is in percent: 0 < percentile <= 100, e.g. 99.99")
        return v

    @field_validator("layer_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in QUANTIZABLE_TYPE_NAMES]
        if unknown:
            raise ValueError(f"unknown layer types {unknown}; choose from {', '.join(QUANTIZABLE_TYPE_NAMES)}")
        return v
