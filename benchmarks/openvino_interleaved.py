"""OpenVINO models timed interleaved in one process: batch-1 latency, best of several rounds' medians.

    python benchmarks/openvino_interleaved.py RUN/model.onnx OTHER/nncf_full_int8.xml ... [--rounds 6] [--size 224]

Each file (an ONNX graph or an OpenVINO IR) is compiled for the CPU with 2 threads and the latency hint; each round
times every model in turn (10 warm-up runs, 50 timed), so load on the machine falls on all of them alike. Printed
per model: the layers OpenVINO left unfused (Eltwise) and its reorders, from the compiled runtime model, and the
best of the rounds' median latencies.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    image = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    requests = {}
    for path in args.models:
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_NUM_THREADS": str(args.threads),
                                                                    "PERFORMANCE_HINT": "LATENCY"})
        layers = collections.Counter(op.get_rt_info()["layerType"].astype(str)
                                     for op in compiled.get_runtime_model().get_ordered_ops())
        print(f"{path}: {layers.get('Eltwise', 0)} Eltwise, {layers.get('Reorder', 0)} Reorder")
        requests[path] = compiled.create_infer_request()
    medians: dict[str, list[float]] = {path: [] for path in requests}
    for _ in range(args.rounds):
        for path, request in requests.items():
            for _ in range(10):
                request.infer({0: image})
            times = []
            for _ in range(50):
                start = time.perf_counter()
                request.infer({0: image})
                times.append(time.perf_counter() - start)
            medians[path].append(float(np.median(times)) * 1000)
    print("\n| model | b1 ms (best of the rounds' medians) |\n|---|---|")
    for path, values in medians.items():
        print(f"| {path} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
