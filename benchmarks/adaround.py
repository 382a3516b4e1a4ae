"""AdaRound (issue 25): the accuracy it wins back and its time per model, on the CPU or a GPU.

    python benchmarks/adaround.py efficientnet_lite0 --weights per_tensor            # issue 18's 516 held-out images
    python benchmarks/adaround.py resnet20 --weights per_channel                      # 2,000 CIFAR-10 test images
    python benchmarks/adaround.py efficientnet_lite0 --weights per_tensor --device cuda --iterations 10000
    python benchmarks/adaround.py resnet20 --configs PTQ +AdaRound --iterations 500  # fewer steps on a CPU

The same splits as benchmarks/ptq_algorithms.py: EfficientNet-Lite0 calibrated on the 128 skimage photos and
evaluated on the 516 `imagenet_samples` with an odd last WordNet-id digit; ResNet-20 calibrated on 512 CIFAR-10 train
images, evaluated on 2,000 test images (seed 0). Every configuration quantizes the FP32 model with mse ranges
(quant.ptq.quantize_, the calibrate stage's verb) and its algorithms, on --device (the model, the calibration and
AdaRound's optimisation), and is scored in fake-quant: top-1, its difference with FP32 and with plain PTQ as 95%
paired bootstrap intervals over the evaluation images, agreement with FP32, and the seconds of each algorithm.
--json writes the rows and the machine (CPU model and flags, GPU name) to a file.

A device that cannot score (no evaluation images there) quantizes and AdaRounds, and scoring happens elsewhere:
--save-states DIR writes each configuration's calibrated state (activation ranges, and what the algorithms changed,
the AdaRounded weights as their integer codes and ranges: a few MB); --from-states DIR rebuilds exactly those models
with quant.ptq.restore_ (as --resume does) and scores them here, with the seconds measured where they ran.
--skip-cuda-extension leaves out modelopt's CUDA fake-quant kernels (compiled on first use, about a minute); its
PyTorch fallback computes the same fake quantization.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptq_algorithms  # noqa: E402  (beside this script)

from workbench.data import build_dataset  # noqa: E402
from workbench.models import resolve_model  # noqa: E402
from workbench.quant.algorithms import AlgorithmStep  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_, restore_  # noqa: E402
from workbench.schema import DataConfig  # noqa: E402
from workbench.tasks.classification import ClassificationScorer, ClassificationTask  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def configs(iterations: int, max_images: int | None = None) -> dict[str, list]:
    ada = {"name": "adaround", "iterations": iterations, **({"max_images": max_images} if max_images else {})}
    return {"PTQ": [], "+AdaRound": [ada], "+CLE+AdaRound": ["cle", ada]}


# The same models, splits and calibration as benchmarks/ptq_algorithms.py, so the two scripts' rows compare.
SETUPS = ptq_algorithms.SETUPS


def machine(device: torch.device) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    out = {"cpu": cpu, "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags],
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def load_batches(data: DataConfig, split: str):
    return list(torch.utils.data.DataLoader(build_dataset(data, split), batch_size=data.batch_size, num_workers=2))


def score(model, batches, device, reference=None) -> dict:
    scorer = ClassificationScorer(labeled=True)
    outputs = []
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            out = model(x.to(device)).float().cpu()
            outputs.append(out)
            scorer.update(out, y, reference[i] if reference is not None else None)
    return {**scorer.result(), "outputs": outputs, "scorer": scorer}


def interval(result: dict, reference: dict) -> dict:
    d = ClassificationTask().delta(result["scorer"], reference["scorer"])
    return {"delta": d.delta, "low": d.low, "high": d.high}


def shown(d: dict | None) -> str:
    return "-" if d is None else f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def pack_state(model, result) -> dict:
    """The activation ranges and the algorithms' state, each AdaRounded weight as int8 codes and its range."""
    from workbench.quant.adaround import WeightGrid

    modules = dict(model.named_modules())
    tensors = {}
    for key, value in (result.ptq_state or {"tensors": {}})["tensors"].items():
        layer = modules.get(key.rpartition(".")[0])
        if key.endswith(".weight") and getattr(layer, "weight_quantizer", None) is not None:
            grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
            q = torch.round(value.float().to(grid.amax.device) * grid.inverse_scale())
            if torch.equal(grid.to_weight(q).cpu(), value.float().cpu()):  # on the grid: codes are exact
                tensors[key + "@codes"] = q.to(torch.int8).cpu()
                tensors[key + "@amax"] = grid.amax.cpu()
                tensors[key + "@bits"] = torch.tensor([grid.num_bits, int(grid.unsigned), int(grid.narrow_range)])
                continue
        tensors[key] = value.cpu()
    state = result.ptq_state or {"format": 1, "modules": {}}
    return {"activation_amax": result.activation_amax,
            "state": {"format": state["format"], "modules": state["modules"], "tensors": tensors}}


def unpack_state(saved: dict) -> dict:
    from workbench.quant.adaround import WeightGrid

    packed = saved["state"]["tensors"]
    tensors = {k: v for k, v in packed.items() if "@" not in k}
    for key in [k.removesuffix("@codes") for k in packed if k.endswith("@codes")]:
        bits, unsigned, narrow = packed[key + "@bits"].tolist()
        grid = WeightGrid(packed[key + "@amax"], bits, bool(unsigned), bool(narrow))
        tensors[key] = grid.to_weight(packed[key + "@codes"].float())
    return {**saved["state"], "tensors": tensors}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=list(SETUPS))
    p.add_argument("--weights", choices=["per_channel", "per_tensor"], default="per_channel")
    p.add_argument("--iterations", type=int, default=10_000, help="AdaRound steps per layer (AIMET: 10,000)")
    p.add_argument("--max-images", type=int, default=None, help="AdaRound's max_images (default: its own, 256)")
    p.add_argument("--configs", nargs="*", default=None, help="of PTQ, +AdaRound, +CLE+AdaRound")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--save-states", default=None, help="write each configuration's state into this folder")
    p.add_argument("--from-states", default=None, help="score the states saved in this folder instead of quantizing")
    p.add_argument("--skip-cuda-extension", action="store_true")
    args = p.parse_args()
    if args.skip_cuda_extension:
        from modelopt.torch.quantization.extensions import get_cuda_ext

        get_cuda_ext.extension = None  # modelopt falls back to its PyTorch fake quantization
    if not (ASSETS / "models").is_dir() and not (ASSETS / "data").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    table = configs(args.iterations, args.max_images)
    chosen = args.configs or list(table)
    if unknown := [c for c in chosen if c not in table]:
        sys.exit(f"unknown configuration(s) {unknown}; known: {list(table)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    setup = SETUPS[args.model]
    fp32 = resolve_model(setup["model"]).eval().to(device)
    calib = load_batches(setup["data"], "calibration")
    evals = [] if args.save_states else load_batches(setup["data"], "evaluation")  # the device only quantizes
    example = calib[0][0][:4].to(device)
    n_calib, n_eval = sum(len(x) for x, *_ in calib), max(sum(len(x) for x, _ in evals), 1)
    info = machine(device)
    print(f"# {args.model}: {args.weights} weights, mse ranges, {n_calib} calibration images, {n_eval} evaluation "
          f"images (one image = {100 / n_eval:.2f} points); AdaRound {args.iterations} iterations per layer on "
          f"{info.get('gpu', info['cpu'])}\n{json.dumps(info)}\n", flush=True)
    saved = json.loads((Path(args.from_states) / "states.json").read_text()) if args.from_states else {}
    if saved:
        chosen = [c for c in chosen if c in saved["configs"]]
        print(f"scoring states quantized on {saved['machine'].get('gpu', saved['machine']['cpu'])}: "
              f"{json.dumps(saved['machine'])}\n", flush=True)
    ref = score(fp32, evals, device) if evals else None
    rows = [{"config": "FP32", "top1": ref["top1"] if ref else None}]
    ptq = None
    states: dict = {}
    if args.save_states:
        Path(args.save_states).mkdir(parents=True, exist_ok=True)

    def loop(m):
        with torch.no_grad():
            for x, *_ in calib:
                m(x.to(device))

    for title in chosen:
        model = copy.deepcopy(fp32)
        steps = [AlgorithmStep.model_validate(a) for a in table[title]]
        config = Int8Config(method="mse", weights=args.weights)
        if saved:
            entry = saved["configs"][title]
            state = torch.load(Path(args.from_states) / entry["file"], weights_only=True)
            restore_(model, config, state["activation_amax"], example, ptq_state=unpack_state(state))
            seconds, records = entry["quantize_seconds"], entry["algorithms"]
        else:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = quantize_(model, config, loop, example, algorithms=steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            records = {r.name: {"seconds": r.seconds, "skipped": r.skipped, "notes": r.notes[:1]}
                       for r in result.algorithms}
            if args.save_states:
                file = f"state_{len(rows)}.pt"
                torch.save(pack_state(model, result), Path(args.save_states) / file)
                states.setdefault("configs", {})[title] = {"file": file, "quantize_seconds": seconds,
                                                           "algorithms": records}
                states["machine"] = info
                (Path(args.save_states) / "states.json").write_text(json.dumps(states, indent=1))
                print(f"  saved {title}: {seconds:.1f} s {json.dumps(records)[:600]}", flush=True)
                continue
        fq = score(model, evals, device, ref["outputs"])
        ptq = ptq or (fq if not steps else None)
        row = {"config": title, "top1": fq["top1"], "vs_fp32": interval(fq, ref),
               "vs_ptq": interval(fq, ptq) if ptq is not None and steps else None,
               "agreement": fq["agreement_top1"], "quantize_seconds": seconds, "algorithms": records}
        rows.append(row)
        print(f"  done {title}: {fq['top1']:.2f} in {seconds:.1f} s "
              f"({', '.join(n + ' ' + format(r['seconds'], '.1f') + ' s' for n, r in records.items()) or 'none'})",
              file=sys.stderr, flush=True)
        for n, r in records.items():
            if r["notes"]:
                print(f"    {n}: {r['notes'][0]}", file=sys.stderr)
            if r["skipped"]:
                print(f"    {n} skipped {len(r['skipped'])}: {list(r['skipped'].items())[:2]}", file=sys.stderr)
        del model
    if args.save_states:
        return
    print("| configuration | top-1 | - FP32 [95% CI] | - PTQ [95% CI] | agreement with FP32 % | seconds per "
          "algorithm |\n|---|---|---|---|---|---|")
    for row in rows:
        algos = ", ".join(f"{n} {a['seconds']:.1f}" for n, a in row.get("algorithms", {}).items()) or "-"
        print(f"| {row['config']} | {row['top1']:.2f} | {shown(row.get('vs_fp32'))} | {shown(row.get('vs_ptq'))} | "
              f"{row.get('agreement', 100.0):.2f} | {algos} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "weights": args.weights, "iterations":
                                               args.iterations, "calibration_images": n_calib,
                                               "evaluation_images": n_eval, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
