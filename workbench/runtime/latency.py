"""Latency measured the same way for every runner: warm-up, repeats, median and p90."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np


def measure_latency(runner, input_shape: tuple[int, ...], batch_sizes=(1, 8), warmup: int = 3, repeats: int = 20,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """{"b1": {"median_ms", "p90_ms", "images_per_s"}, ...} for a runner on random input of (C, H, W)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in batch_sizes:
        x = rng.standard_normal((b, *input_shape), dtype=np.float32)
        for _ in range(warmup):
            runner(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        out[f"b{b}"] = {
            "median_ms": 1000 * median,
            "p90_ms": 1000 * float(np.percentile(times, 90)),
            "images_per_s": b / median,
        }
    return out


def cpu_threads(requested: int | None = None) -> int:
    """The CPU threads every backend is timed with: `requested`, else OMP_NUM_THREADS where the user set it, else
    the physical cores this process may run on."""
    if requested:
        return requested
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    # Physical cores, as ONNX Runtime's own default: two hyper-threads of one core share its vector units.
    siblings = set()
    for cpu in cpus:
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(siblings) or len(cpus)


@contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op threads set to `threads` for the block, as ONNX Runtime's and OpenVINO's are: without
    it PyTorch picks its own count, and on a busy 2-core machine its spinning OpenMP threads made eager FP32 look
    10-300x slower than ONNX Runtime."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_bench_options(batch_sizes, warmup: int, repeats: int, threads: int | None) -> None:
    from ..errors import WorkbenchError

    if not batch_sizes or min(batch_sizes) < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise WorkbenchError(f"bench: batch sizes and repeats must be >= 1, warmup >= 0, threads >= 1 (got batch sizes "
                             f"{list(batch_sizes)}, repeats {repeats}, warmup {warmup}, threads {threads})")


def bench_artifacts(artifacts: dict[str, tuple[Callable[[], object], int]], input_shape: tuple[int, ...],
                    batch_sizes=(1, 8), warmup: int = 5, repeats: int = 50,
                    threads: int | None = None) -> dict[str, dict]:
    """Time each artifact, one in memory at a time: name -> {"bytes", "latency": measure_latency(...)}.

    `artifacts` maps a name to (a function making its runner, its size in bytes). `threads` (default: all
    cores) fixes PyTorch's CPU threads here; make the ONNX Runtime and OpenVINO runners with the same count.
    """
    from ..errors import WorkbenchError

    check_bench_options(batch_sizes, warmup, repeats, threads)
    results = {}
    with torch_threads(cpu_threads(threads)):
        for name, (make, size) in artifacts.items():
            try:
                runner = make()
                latency = measure_latency(runner, input_shape, batch_sizes, warmup, repeats)
            except WorkbenchError:
                raise
            except Exception as e:  # ORT's and TensorRT's errors for a model that cannot run at this shape
                raise WorkbenchError(f"{name}: cannot run a batch of shape (B, {', '.join(map(str, input_shape))}) "
                                     f"for B in {list(batch_sizes)}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            results[name] = {"bytes": int(size), "latency": latency}
            del runner
    return results


def model_files(paths: list[Path], suffixes: list[str]) -> list[Path]:
    """The model files named (files with one of `suffixes`), a directory standing for those in it (a run directory)."""
    from ..errors import WorkbenchError

    kinds = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in suffixes)
        elif path.is_file() and path.suffix in suffixes:
            files.append(path)
        else:
            raise WorkbenchError(f"{path}: not an {kinds} file, nor a directory holding some")
    if not files:
        raise WorkbenchError(f"{', '.join(map(str, paths))}: no {kinds} files to time")
    return files


def model_input_shape(path: Path) -> tuple[tuple[int, ...] | None, int | None]:
    """((C, H, W) when the file fixes them, else None; the fixed batch size, else None) of a model file's input,
    from the ONNX graph or OpenVINO IR input, or an engine's sidecar (the profile's opt shape; engines take any
    batch in it)."""
    from ..qdq.export import onnx_input_dims
    from . import engines

    path = Path(path)
    if engine := engines.for_suffix(path.suffix):
        return engine.input_shape(path)
    fixed = onnx_input_dims(path)
    shape = tuple(fixed[1:]) if len(fixed) > 1 and all(fixed[1:]) else None
    return shape, (fixed[0] if fixed else None)
