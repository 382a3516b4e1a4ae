"""Target profiles: the arithmetic of the deployment target, which calibration, every PTQ algorithm, sensitivity,
mixed precision, QAT and the exported Q/DQ graph all use, so that what is measured is what the target computes.

A recipe names its target at the top level (`target: tensorrt`, the default; `target: {name: openvino, cpu: auto}`;
`target: fixed_point`), and `resolve_target` turns it into one frozen `Arithmetic`:

- tensorrt: signed 8-bit symmetric activations (zero point 0, TensorRT's only kind), signed 8-bit weights per
  channel (or per tensor where the calibrate stage says so). modelopt's quantizers, unchanged.
- openvino: unsigned 8-bit activations with a zero point, so a range may be asymmetric (after SiLU the values lie in
  [-0.28, amax]: a symmetric signed range spends half its levels on nothing); signed symmetric weights, 8 bits where
  the deployment CPU's INT8 dot product accumulates in 32 bits (VNNI, AMX), 7 bits where it multiplies through
  VPMADDUBSW, whose 16-bit pair sums saturate when u8 activations near 255 meet weights near 127. `cpu: auto` reads
  this CPU (hardware.cpu.cpu_info, which follows ONEDNN_MAX_CPU_ISA); `cpu: avx2|avx512_vnni|amx` quantizes for
  another one.
- fixed_point: per-tensor weights and activations, symmetric, scales that are powers of two (2^-k): what FPGA and
  DSP toolchains (Vitis AI, say) require, where a rescale is a shift.

Plain data (pydantic only, no torch): a recipe is read and validated without loading either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

TARGET_NAMES = ("tensorrt", "openvino", "fixed_point")
DEFAULT_TARGET = TARGET_NAMES[0]  # what a recipe without `target:` quantizes for
CPU_KINDS = ("avx2", "avx512_vnni", "amx")


class _TargetBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorRTTarget(_TargetBase):
    name: Literal["tensorrt"] = "tensorrt"


class OpenVINOTarget(_TargetBase):
    name: Literal["openvino"] = "openvino"
    cpu: Literal["auto", "avx2", "avx512_vnni", "amx"] = Field(
        "auto", description="The deployment CPU's INT8 instructions: auto (this CPU, as oneDNN's ISA cap leaves it), "
        "avx2 (7-bit weights: no VNNI), avx512_vnni or amx (8-bit weights).")


class FixedPointTarget(_TargetBase):
    name: Literal["fixed_point"] = "fixed_point"
    bits: Literal[8] = Field(8, description="Bits of weights and activations (8; FPGA/DSP INT8).")


def _target_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("name")
    return getattr(value, "name", None)


TargetSpec = Annotated[
    Union[Annotated[TensorRTTarget, Tag("tensorrt")], Annotated[OpenVINOTarget, Tag("openvino")],
          Annotated[FixedPointTarget, Tag("fixed_point")]],
    Discriminator(_target_tag, custom_error_type="target",
                  custom_error_message=f"target is one of {', '.join(TARGET_NAMES)}, or a mapping with name: one "
                                       "of them and its options, e.g. {name: openvino, cpu: avx2}"),
]


def target_from_name(value: Any) -> Any:
    """`target: openvino` is `target: {name: openvino}` (a pydantic before-validator of the recipe's field)."""
    return {"name": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Arithmetic:
    """What the target computes: every quantizer the workbench inserts follows it.

    weight_granularity "per_channel" lets the calibrate stage's `weights` option choose (per_tensor too);
    "per_tensor" is required by the target (fixed point) and wins. `why` says how the profile chose (the CPU variant).
    """

    target: str = "tensorrt"
    weight_bits: int = 8
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    activation_bits: int = 8
    activation_signed: bool = True  # False: unsigned 8-bit with a zero point (asymmetric ranges)
    activation_zero_point: bool = False  # ranges may be asymmetric [lo, hi] (u8 with zero point)
    power_of_two_scales: bool = False
    cpu: str | None = None  # openvino: the CPU variant quantized for
    why: str = "TensorRT's INT8: signed symmetric activations (zero point 0), signed per-channel weights"

    @property
    def modelopt_native(self) -> bool:
        """modelopt's own quantizers and Q/DQ export (TensorRT's arithmetic): anything else needs quant.affine."""
        return (self.weight_bits == 8 and self.activation_signed and not self.activation_zero_point
                and not self.power_of_two_scales)

    def weights_for(self, requested: str) -> str:
        """The weight granularity the quantizers use, given the calibrate stage's `weights` option."""
        return "per_tensor" if self.weight_granularity == "per_tensor" else requested

    def for_weights(self, requested: str) -> "Arithmetic":
        """This arithmetic with the weight granularity the quantizers use (what a calibration records)."""
        return replace(self, weight_granularity=self.weights_for(requested))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Any) -> "Arithmetic":
        """The arithmetic a run's calibration.json recorded (untrusted: every field checked), or ValueError."""
        if not isinstance(saved, dict) or set(saved) - set(cls.__dataclass_fields__):
            raise ValueError(f"an object with the fields {', '.join(cls.__dataclass_fields__)}")
        out = cls(**saved)
        checks = {"target": out.target in TARGET_NAMES, "weight_bits": out.weight_bits in (7, 8),
                  "activation_bits": out.activation_bits == 8,
                  "weight_granularity": out.weight_granularity in ("per_channel", "per_tensor"),
                  "cpu": out.cpu is None or out.cpu in CPU_KINDS, "why": isinstance(out.why, str)}
        checks.update({k: isinstance(getattr(out, k), bool) for k in
                       ("activation_signed", "activation_zero_point", "power_of_two_scales")})
        if bad := [k for k, ok in checks.items() if not ok]:
            raise ValueError(f"an arithmetic the workbench writes; {', '.join(bad)} is not")
        return out

    def describe(self) -> str:
        acts = ("u8 asymmetric (zero point)" if self.activation_zero_point
                else f"s{self.activation_bits} symmetric")
        scales = ", power-of-two scales" if self.power_of_two_scales else ""
        return (f"{self.target}: activations {acts}, weights s{self.weight_bits} {self.weight_granularity}{scales}"
                + (f", for CPU {self.cpu}" if self.cpu else ""))


TENSORRT = Arithmetic()


def resolve_target(target: TensorRTTarget | OpenVINOTarget | FixedPointTarget | None) -> Arithmetic:
    """The frozen arithmetic of a recipe's target (reads this CPU for `openvino` with `cpu: auto`)."""
    if target is None or target.name == "tensorrt":
        return TENSORRT
    if target.name == "fixed_point":
        return Arithmetic(
            target="fixed_point", weight_bits=target.bits, activation_bits=target.bits,
            weight_granularity="per_tensor", power_of_two_scales=True,
            why="fixed point (FPGA/DSP): per-tensor symmetric weights and activations, scales 2^-k so every rescale "
                "is a shift")
    cpu, how = _openvino_cpu(target.cpu)
    int8_dot = cpu != "avx2"
    bits = 8 if int8_dot else 7
    why = (f"OpenVINO on {cpu} ({how}): u8 activations with zero points (asymmetric ranges); "
           + ("8-bit weights: its INT8 dot products (VNNI/AMX) accumulate in 32 bits" if int8_dot else
              "7-bit weights: without VNNI, u8 x s8 products are summed in pairs into 16 bits (VPMADDUBSW), which "
              "saturate for activations near 255 and weights near 127"))
    return Arithmetic(target="openvino", weight_bits=bits, activation_signed=False, activation_zero_point=True,
                      cpu=cpu, why=why)


def _openvino_cpu(requested: str) -> tuple[str, str]:
    """(cpu variant, how it was chosen)."""
    if requested != "auto":
        return requested, "as the recipe asks (target.cpu)"
    from .hardware import cpu as cpu_facts  # no torch: /proc/cpuinfo and oneDNN's ISA cap

    info = cpu_facts.cpu_info()
    if any(f.startswith("amx") for f in info.flags):
        variant = "amx"
    elif info.int8_dot:
        variant = "avx512_vnni"  # VNNI (AVX-512 or AVX) or a non-x86 CPU: 32-bit accumulation either way
    else:
        variant = "avx2"
    return variant, f"cpu: auto, read from this CPU ({info.model}; {', '.join(info.flags) or 'no AVX2'})"


def engine_problems(target: Any, engines: list[tuple[str, str]]) -> list[str]:
    """Why an engine the recipe builds cannot honour its target: (field, engine) pairs of the build stages."""
    name = getattr(target, "name", "tensorrt")
    problems = []
    for where, engine in engines:
        if engine != "tensorrt" or name == "tensorrt":
            continue
        if name == "openvino":
            why = ("TensorRT computes only signed INT8 with zero point 0 and 8-bit weights, so the openvino target's "
                   "u8 activations with zero points (and 7-bit weights) cannot be built into its engine")
        else:
            why = ("TensorRT requantizes between its fused layers with float multipliers of its own choosing, not the "
                   "power-of-two shifts of the fixed_point target, so its engine would not compute that arithmetic")
        problems.append(f"target: {name} with {where}.engine: tensorrt: {why}. Use target: tensorrt for a TensorRT "
                        f"build, or engine: openvino (the CPU engine)")
    return problems
