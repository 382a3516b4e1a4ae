"""Quantization: our INT8 preset over NVIDIA Model Optimizer, our calibrators, BN folding."""
