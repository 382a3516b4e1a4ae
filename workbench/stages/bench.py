"""bench: latency and throughput of every artifact the run has, on this machine, and their size on disk.

Artifacts: PyTorch FP32 on the CPU; PyTorch FP32 and FP16 (channels-last) on CUDA where present; ONNX
Runtime FP32 (the original and, after pruning, the pruned graph); ONNX Runtime on the TensorRT-style
Q/DQ graph and on its ONNX Runtime flavour (integer kernels); the TensorRT engine where the build
stage made one. Each is warmed up, then timed `repeats` times per batch size (median, p90, images/s)
with a fixed thread count. Latency is end to end, input from host memory and outputs back to it, as
a caller sees it; the `*_cuda_compute` rows are the GPU's compute alone (input resident, output left
on the GPU, synchronised), the figure an engine's GPU time compares with.
Writes bench.json and bench.png; the report shows the table.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field, field_validator

from ..io import atomic_path, write_json
from ..recipe import BatchSize, check_batch_sizes
from ..runtime import DeviceResidentRunner, OrtRunner, TorchRunner
from ..runtime.latency import bench_artifacts
from .registry import StageOptions, register_stage


class BenchOptions(StageOptions):
    batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1, 8], min_length=1, description="Batch sizes timed.")
    warmup: int = Field(5, ge=0, description="Untimed runs per batch size.")
    repeats: int = Field(50, ge=1, description="Timed runs per batch size.")
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch and ONNX Runtime (default: all cores).")
    cuda_fp16: bool = Field(True, description="Also time the FP32 model in half precision on CUDA, where present.")

    _batch_sizes_once = field_validator("batch_sizes")(check_batch_sizes)


def _artifacts(run, opts: BenchOptions) -> dict[str, tuple]:
    """name -> (runner factory, bytes on disk or in parameters)."""
    onnx = run.state.get("onnx", {})
    params = sum(p.numel() * p.element_size() for p in run.reference.parameters())
    out = {"pytorch_fp32_cpu": (lambda: TorchRunner(copy.deepcopy(run.reference).cpu(), "pytorch_fp32_cpu"), params)}
    if torch.cuda.is_available():
        fp32 = lambda: copy.deepcopy(run.reference).cuda()  # noqa: E731
        # FP16 in channels-last memory, the layout cuDNN's tensor-core convolutions want.
        fp16 = lambda: copy.deepcopy(run.reference).cuda().half().to(memory_format=torch.channels_last)  # noqa: E731
        out["pytorch_fp32_cuda"] = (lambda: TorchRunner(fp32(), "pytorch_fp32_cuda", "cuda"), params)
        out["pytorch_fp32_cuda_compute"] = (lambda: DeviceResidentRunner(fp32(), "pytorch_fp32_cuda_compute"), params)
        if opts.cuda_fp16:
            out["pytorch_fp16_cuda"] = (lambda: TorchRunner(fp16(), "pytorch_fp16_cuda", "cuda", torch.float16), params // 2)
            out["pytorch_fp16_cuda_compute"] = (lambda: DeviceResidentRunner(fp16(), "pytorch_fp16_cuda_compute", torch.float16,
                                                                             channels_last=True), params // 2)
    for key, name in (("fp32", "ort_fp32"), ("pruned_fp32", "ort_fp32_pruned"), ("model", "ort_int8_default"),
                      ("ort_int8", "ort_int8_native")):
        path = onnx.get(key)
        if path is not None and (key != "model" or "quant" in run.state):
            out[name] = (lambda p=path, n=name: OrtRunner(p, n, "default", opts.threads), path.stat().st_size)
    if run.state.get("engine"):
        from ..runtime.tensorrt import TensorRTRunner

        engine = run.state["engine"]
        out["tensorrt"] = (lambda: TensorRTRunner(engine, "tensorrt"), engine.stat().st_size)
    return out


@register_stage("bench", BenchOptions)
def bench(run, opts: BenchOptions) -> None:
    """Latency (median, p90) and throughput per batch size of every artifact, and its size."""
    results = bench_artifacts(_artifacts(run, opts), tuple(run.recipe.model.input_size), opts.batch_sizes, opts.warmup,
                              opts.repeats, opts.threads)
    threads = torch.get_num_threads()
    values = {"threads": opts.threads or threads, "batch_sizes": opts.batch_sizes, "repeats": opts.repeats,
              "cpu_threads_default": threads, "backends": results}
    write_json(run.path("bench.json"), values)
    plot_throughput(run.path("bench.png"), results, opts.batch_sizes)
    run.record("bench", values)


def plot_throughput(path, results: dict, batch_sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(results)
    width = 0.8 / max(1, len(batch_sizes))
    for i, b in enumerate(batch_sizes):
        ax.bar([k + i * width for k in range(len(names))], [results[n]["latency"][f"b{b}"]["images_per_s"] for n in names],
               width, label=f"batch {b}")
    ax.set_xticks([k + width * (len(batch_sizes) - 1) / 2 for k in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("images / s")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
