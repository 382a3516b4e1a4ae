"""The ONNX side: export and cleaning (export), one graph index with one look-through rule and one scope-to-module
mapper (graph), TensorRT's Q/DQ rules (trt_rules), the ONNX Runtime flavour (ort_flavour), and the layer-by-layer
comparison with the PyTorch model (compare). Import the module you need: export and compare load torch."""

from typing import Literal

# Weight type of the ONNX Runtime flavour (ort_flavour.to_ort_int8): here, so the export stage's options need no onnx.
WeightType = Literal["auto", "exact", "s8", "reduce_range"]
