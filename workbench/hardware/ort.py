"""ONNX Runtime's session options for the two ways of running a Q/DQ graph.

- mode "faithful" (graph optimisations off): QuantizeLinear/DequantizeLinear run as plain ops and the convolutions in
  float. That is the arithmetic TensorRT performs on the same graph, so it must match the fake-quant model.
- mode "default" (ONNX Runtime's optimisations on): Q/DQ fuse into ORT's own integer kernels, which is what a CPU
  deployment runs.

On the ground floor beside the CPU facts: qdq/ (ORT's own INT8 flavour, checked in a session) and runtime/ (the
runners, the guard's graph comparison) both open sessions with them.
"""

from __future__ import annotations

from typing import Literal


def ort_session_options(mode: Literal["faithful", "default"] = "faithful", threads: int | None = None):
    """ONNX Runtime session options for one of the two ways of running a Q/DQ graph (module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if mode == "faithful" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options
