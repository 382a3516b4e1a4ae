"""The ONNX side: export and cleaning (export), one graph index with one look-through rule and one scope-to-module
mapper (graph), TensorRT's Q/DQ rules (trt_rules), the ONNX Runtime flavour (ort_flavour), and the layer-by-layer
comparison with the PyTorch model (compare). Import the module you need: export and compare load torch."""
