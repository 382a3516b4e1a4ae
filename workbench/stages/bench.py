"""bench: latency and throughput of every artifact the run has, on this machine, and their size on disk.

The artifacts are the benched rows of runtime/backends.py that the run holds: PyTorch FP32 on the CPU,
FP32 and FP16 (channels-last) on CUDA where present; ONNX Runtime FP32 (the original and, after
pruning, the pruned graph); ONNX Runtime on the TensorRT-style Q/DQ graph and on its ONNX Runtime
flavour (integer kernels); the TensorRT engine where the build stage made one. Each is warmed up, then
timed `repeats` times per batch size (median, p90, images/s) with a fixed thread count. Latency is end
to end, input from host memory and outputs back to it, as a caller sees it; the `*_cuda_compute` rows
are the GPU's compute alone (input resident, output left on the GPU, synchronised), the figure an
engine's GPU time compares with. Writes bench.json and bench.png; the report shows the table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from ..io import write_json
from ..report_text import fmt as _fmt
from ..runtime import backends
from ..schema import BatchSize, check_batch_sizes
from .registry import Restorer, StageOptions, metrics_only, register_stage


class BenchOptions(StageOptions):
    batch_sizes: list[BatchSize] = Field(default_factory=lambda: [1, 8], min_length=1, description="Batch sizes timed.")
    warmup: int = Field(5, ge=0, description="Untimed runs per batch size.")
    repeats: int = Field(50, ge=1, description="Timed runs per batch size.")
    threads: int | None = Field(None, ge=1,
                                description="CPU threads for every backend: PyTorch, ONNX Runtime, OpenVINO "
                                            "(default: all cores).")
    cuda_fp16: bool = Field(True, description="Also time the FP32 model in half precision on CUDA, where present.")

    _batch_sizes_once = field_validator("batch_sizes")(check_batch_sizes)


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _bench_section(run_dir: Path, metrics: dict) -> list[str]:
    bench = metrics.get("stages", {}).get("bench")
    if not bench:
        return []
    keys = [f"b{b}" for b in bench["batch_sizes"]]
    lines = ["## Latency and size on this machine", "",
             f"{bench['repeats']} timed runs per batch size, {bench['threads']} CPU threads; "
             "median ms (p90), images/s.",
             "", "| Artifact | Size MB | " + " | ".join(f"{k} ms | {k} img/s" for k in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for name, entry in bench["backends"].items():
        cells = [f"{_fmt(entry['latency'][k]['median_ms'])} ({_fmt(entry['latency'][k]['p90_ms'])}) | "
                 f"{entry['latency'][k]['images_per_s']:.0f}" for k in keys]
        unverified = " (unverified)" if entry.get("verified") is False else ""
        lines.append(f"| {backends.title(name)}{unverified} | {entry['bytes'] / 1e6:.2f} | " + " | ".join(cells)
                     + " |")
    return lines + ["", "![throughput](bench.png)", ""]


@register_stage("bench", BenchOptions, restorer=Restorer(metrics_only),
                report=_bench_section, report_position=60)
def bench(run, opts: BenchOptions) -> None:
    """Latency (median, p90) and throughput per batch size of every artifact, and its size."""
    import torch

    from ..plots import plot_throughput
    from ..qdq.numeric import require_numeric
    from ..runtime import backends
    from ..runtime.guard import engine_verified
    from ..runtime.latency import bench_artifacts, cpu_threads

    threads = cpu_threads(opts.threads)  # one count for every backend
    artifacts = backends.bench_artifacts(run, backends.Options(device="cpu", threads=threads),
                                         cuda=torch.cuda.is_available(), fp16=opts.cuda_fp16)
    for name in artifacts:
        model = backends.BACKENDS[name].model(run) if name in backends.BACKENDS else None
        if getattr(model, "suffix", None) == ".onnx":
            require_numeric(model)
    results = bench_artifacts(artifacts, tuple(run.recipe.model.input_size), opts.batch_sizes, opts.warmup,
                              opts.repeats, threads)
    for name, entry in results.items():
        if name in backends.BACKENDS and backends.BACKENDS[name].guarded_against:
            entry["verified"] = engine_verified(backends.BACKENDS[name].model(run))
    values = {"threads": threads, "batch_sizes": opts.batch_sizes, "repeats": opts.repeats, "backends": results}
    write_json(run.path("bench.json"), values)
    plot_throughput(run.path("bench.png"), results, opts.batch_sizes)
    run.record("bench", values)
