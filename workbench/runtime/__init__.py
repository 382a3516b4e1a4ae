"""Runtimes: one Runner protocol (numpy batch in, numpy outputs out) for every backend, the table of backends
(backends.py), latency measured one way (latency.py), TensorRT engines (tensorrt.py). Import the module you need."""
