"""The CPU a number was measured on: its model and the instruction sets INT8 kernels depend on.

Every CPU latency and every engine's sidecar records these: the same graph runs with other kernels (and,
for ONNX Runtime's U8S8 and OpenVINO's, other arithmetic) on an AVX2-only CPU, one with AVX-512 VNNI and
one with AMX.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

# The flags that decide which INT8 kernels run: 8-bit dot products without 16-bit saturation need VNNI
# (AVX-512 or AVX) or AMX; without them x86 kernels use VPMADDUBSW, whose pairwise sums saturate at 16 bits.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "amx_bf16")
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    cores: int
    flags: tuple[str, ...]  # those of INT8_FLAGS this CPU has

    @property
    def int8_dot(self) -> bool:
        """8-bit dot products accumulate in 32 bits: VNNI or AMX on x86; Arm's dot-product kernels always do."""
        if self.machine not in X86:
            return True
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"))

    def as_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "int8_dot": self.int8_dot}

    def describe(self) -> str:
        return f"{self.model} ({self.cores} cores; {', '.join(self.flags) or 'no AVX2'})"


@functools.cache
def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: the model as Python sees it, and no flags (assume the worst)
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():  # the first processor's entry says it for all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = capped_flags(set(fields.get("flags", "").split()), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    return CpuInfo(model=fields.get("model name") or platform.processor() or machine, machine=machine,
                   cores=os.cpu_count() or 1, flags=tuple(f for f in INT8_FLAGS if f in flags))


# What oneDNN (OpenVINO's CPU kernels) may use under ONEDNN_MAX_CPU_ISA=<cap>: the INT8 flags above that it drops.
# The facts describe the kernels that will run, so a capped AVX-512 VNNI machine is decided for as an AVX2 one (s8
# weights on AVX2 kernels saturate their 16-bit pair sums: the build would choose 7-bit weights there).
_AMX = {"amx_int8", "amx_bf16"}
_VNNI = {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}
_AVX512 = {"avx512f", "avx512_vnni"}


def capped_flags(flags: set[str], cap: str) -> set[str]:
    """`flags` less those oneDNN's ISA cap `cap` (ONEDNN_MAX_CPU_ISA's value; empty or ALL: no cap) rules out."""
    cap = cap.strip().upper()
    if not cap or cap == "ALL" or "AMX" in cap:
        return flags
    if cap in ("SSE41", "AVX"):
        return flags - _AMX - _VNNI - _AVX512 - {"avx2"}
    if cap == "AVX2":
        return flags - _AMX - _VNNI - _AVX512
    if cap.startswith("AVX2_VNNI"):
        return flags - _AMX - _AVX512
    if cap == "AVX512_CORE":
        return flags - _AMX - _VNNI
    return flags - _AMX  # AVX512_CORE_VNNI, _BF16, _FP16, AVX10_1_512: everything but AMX
