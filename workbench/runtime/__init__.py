"""Runtimes: one Runner protocol (numpy batch in, numpy outputs out) for every backend."""

from .latency import measure_latency
from .runners import DeviceResidentRunner, OrtRunner, Runner, TorchRunner, ort_available_providers

__all__ = ["DeviceResidentRunner", "OrtRunner", "Runner", "TorchRunner", "measure_latency", "ort_available_providers"]
