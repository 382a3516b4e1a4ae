"""prune: structured channel pruning over a dependency graph, unstructured magnitude pruning
(in steps, optionally fine-tuned between) or 2:4 sparsity.

Every method writes `pruned_model.pt` (shapes and weights, no pickled classes; re-saved
by a later finetune stage); `model.pruned: <path>` in a later recipe reloads it on the
same architecture.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import RecipeError
from ..report_text import fmt as _fmt
from ..report_text import training_subset as _subset
from ..train.options import FinetuneOptions
from .registry import Restorer, StageOptions, register_stage


class PruneOptions(StageOptions):
    method: Literal["structured", "magnitude", "sparsity_2to4"] = Field(
        ..., description="structured: remove channels; magnitude: zero the smallest weights; sparsity_2to4: 2 of "
                         "every 4."
    )
    sparsity: float = Field(0.5, gt=0, lt=1, description="magnitude: the share of weights zeroed at the end.")
    ratio: float | None = Field(None, gt=0, lt=1,
                                description="structured: the share of channels removed (or give macs_target).")
    macs_target: float | None = Field(None, gt=0, lt=1,
                                      description="structured: prune until MACs are at most this share of the "
                                      "original.")
    importance: Literal["magnitude", "bn_scale", "taylor"] = Field("magnitude",
                                                                   description="structured: how channels are ranked.")
    round_to: int = Field(
        8, ge=1, le=256,
        description="structured: channel counts kept a multiple of this (TensorRT INT8 kernels like 8/16/32).")
    latency: bool = Field(True, description="Report ONNX Runtime CPU latency (batch 1) and ONNX size of the FP32 "
                          "model before and after.")
    scope: Literal["global", "layer"] = Field("global", description="Rank weights (magnitude) or channels "
                                              "(structured) across all layers, or within each layer.")
    steps: int = Field(1, ge=1, le=100, description="magnitude: reach the sparsity in this many equal steps.")
    finetune_between: FinetuneOptions | None = Field(None, description="Fine-tune after each step but the last "
                                                     "(distillation from FP32).")
    ignore: list[str] = Field(default_factory=list, description="Layer-name glob patterns left dense, e.g. the "
                              "classifier 'fc'.")

    @model_validator(mode="after")
    def _structured_has_one_target(self) -> "PruneOptions":
        given = [k for k in ("ratio", "macs_target") if getattr(self, k) is not None]
        if self.method == "structured" and len(given) != 1:
            raise ValueError("method structured needs exactly one of ratio (share of channels removed) or macs_target "
                             f"(share of MACs kept), e.g. ratio: 0.3; got {' and '.join(given) or 'neither'}")
        if self.method != "structured" and given:
            raise ValueError(f"{' and '.join(given)} are for method structured; "
                             f"method {self.method} prunes to sparsity")
        return self


def _needs_data(opts: PruneOptions) -> tuple[str, ...]:
    """Fine-tuning between steps, and Taylor importance (gradients), read the fine-tune split."""
    taylor = opts.method == "structured" and opts.importance == "taylor"
    return ("finetune",) if opts.finetune_between is not None or taylor else ()


def _preflight(opts: PruneOptions, where: str, recipe) -> list[str]:
    """Taylor importance needs the task's loss against labels."""
    if opts.method == "structured" and opts.importance == "taylor":
        from ..tasks import get_task  # the task's adapter loads torch: only asked when it matters

        if not get_task(recipe.task).has_label_loss:
            return [f"{where}.importance: taylor needs a labeled classification fine-tune split "
                    f"(task is {recipe.task})"]
    return []


# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def _pruned_files(options, values) -> list[str]:
    return ["pruned_model.pt"]


def _pruned(run, options, values, loaded) -> bool:
    """prune: the pruned model from pruned_model.pt (as a later finetune re-saved it, when it finished too)."""
    from ..models import resolve_model

    path = run.path("pruned_model.pt")
    model = resolve_model(run.recipe.model.model_copy(update={"pruned": str(path)}))
    run.model = model.to(run.device).eval()
    run.artifacts.pruned_fp32 = run.model
    run.artifacts.pruned_file = path
    return True


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _prune_section(run_dir: Path, metrics: dict) -> list[str]:
    stages = metrics.get("stages", {})
    p = stages.get("prune")
    if not p:
        return []
    lines = ["## Pruning", ""]
    if p["method"] == "structured":
        lines += ["| | Parameters | MMACs | ONNX MB | ORT latency b1 ms |", "|---|---|---|---|---|"]
        for key in ("before", "after"):
            size = p.get(f"onnx_bytes_{key}")
            lat = p.get(f"ort_latency_b1_ms_{key}")
            lines.append(f"| {key} | {p[f'params_{key}']:,} | {p[f'macs_{key}'] / 1e6:.1f} | "
                         f"{_fmt(size / 1e6 if size else None)} | {_fmt(lat)} |")
        lines += ["", f"Structured ({p['importance']} importance, channels rounded to {p['round_to']}): MACs "
                      f"x{p['macs_ratio']:.2f}"
                  + (f", ONNX Runtime {p['ort_speedup_b1']:.2f}x faster at batch 1." if "ort_speedup_b1" in p
                     else "."), ""]
    else:
        lines += [f"{p['method']}: {100 * p['sparsity']:.1f}% of {p['weights']:,} weights are zero ({p['layers']} "
                  f"layers). {p['note']}.", ""]
    ft = stages.get("finetune")
    if ft and ft.get("eval"):
        start = f"{_fmt(ft['eval_before']['value'])} after pruning, " if ft.get("eval_before") else ""
        fp32 = f", FP32 before pruning {_fmt(ft['eval_fp32']['value'])}" if ft.get("eval_fp32") else ""
        lines += [f"{ft['eval']['metric']} after each epoch, on {_subset(ft, metrics)}: {start}"
                  f"{_fmt(ft['eval']['value'])} after fine-tuning ({ft['epochs']} epochs){fp32}.", ""]
    if ft and (run_dir / "training_curve.png").is_file():
        lines += ["![fine-tuning curve](training_curve.png)", ""]
    return lines


@register_stage("prune", PruneOptions, makes=("pruned", "pruned_file"), refuses=("quantized",), needs_data=_needs_data,
                restorer=Restorer(_pruned, _pruned_files), preflight=_preflight,
                report=_prune_section, report_position=20)
def prune_stage(run, opts: PruneOptions) -> None:
    """Pruning: structured channels over a dependency graph, magnitude (global or per layer, in steps) or 2:4."""
    from ..prune import (
        hand_on_pruned,
        magnitude_prune_,
        make_permanent,
        prunable_layers,
        sparsity_2to4_,
        weight_sparsity,
    )
    from ..train.finetuning import train_on_finetune_split

    names = [n for n, _ in run.model.named_modules() if n]
    if missing := [p for p in opts.ignore if not any(fnmatch.fnmatchcase(n, p) for n in names)]:
        raise RecipeError(f"stages.prune.ignore: pattern(s) {missing} match no layer; layer names look like "
                          f"{names[1]!r}")
    layers = prunable_layers(run.model, opts.ignore)
    if not layers:
        raise RecipeError("stages.prune: no Conv/Linear layer left to prune after `ignore`")
    if opts.method == "structured":
        return _structured(run, opts, layers)
    dense_params = sum(m.weight.numel() for m in layers.values())
    history = []
    skipped: list[str] = []
    if opts.method == "sparsity_2to4":
        skipped = sparsity_2to4_(layers)
    else:
        for step in range(1, opts.steps + 1):
            # torch's pruning composes: each call prunes `amount` of the weights still unpruned.
            target = opts.sparsity * step / opts.steps
            done = opts.sparsity * (step - 1) / opts.steps
            magnitude_prune_(run.model, layers, (target - done) / (1 - done), opts.scope)
            if opts.finetune_between is not None and step < opts.steps:
                if not run.recipe.data.finetune:
                    raise RecipeError("stages.prune.finetune_between needs data.finetune (images to fine-tune on)")
                history += train_on_finetune_split(run, opts.finetune_between, None, f"prune step {step}")
    make_permanent(layers)
    sparsity = weight_sparsity(layers)
    hand_on_pruned(run)
    run.record("prune", {
        "method": opts.method,
        "layers": len(layers) - len(skipped),
        "skipped_layers": skipped,
        "weights": dense_params,
        "zero_weights": round(sparsity["all"] * dense_params),
        "sparsity": sparsity["all"],
        "per_layer_sparsity": {k: v for k, v in sparsity.items() if k != "all"},
        "finetune_history": history,
        "note": "dense runtimes (ONNX Runtime, PyTorch) run these zeros at dense speed; 2:4 sparsity is faster only "
                "on sparse tensor cores (TensorRT, Ampere and newer)",
    })


def _structured(run, opts: PruneOptions, layers: dict) -> None:
    from ..prune import hand_on_pruned
    from ..prune.structured import ChannelPruning, prune_channels_
    from ..prune.unstructured import PRUNABLE as PRUNABLE_OUTPUTS

    # The layers the recipe leaves alone, and those whose outputs are the task's (a classifier's classes, a
    # detector's head: boxes and classes), keep their channels.
    keep = [m for name, m in run.model.named_modules()
            if name and name not in layers and isinstance(m, PRUNABLE_OUTPUTS)]
    keep += run.task.output_layers(run.model)
    example = run.example_input()
    gradients = None
    if opts.importance == "taylor":
        gradients = _gradient_batches(run)
    # On the CPU: a model the pruning breaks then fails with a Python error we can report, where on a
    # GPU an out-of-range index is a device-side assert that poisons the CUDA context for the process.
    run.model.cpu()
    try:
        how = ChannelPruning(opts.ratio, opts.macs_target, opts.importance, opts.scope == "global", opts.round_to)
        counts = prune_channels_(run.model, example.cpu(), keep, how, gradients)
    finally:
        run.model.to(run.device)
    path = hand_on_pruned(run)
    channels = {n: int(m.weight.shape[0]) for n, m in run.model.named_modules() if isinstance(m, PRUNABLE_OUTPUTS)}
    run.record("prune", {"method": "structured", "importance": opts.importance, "ratio": opts.ratio,
                         "macs_target": opts.macs_target, "round_to": opts.round_to, **counts,
                         "macs_ratio": counts["macs_after"] / counts["macs_before"], "out_channels": channels,
                         "saved": path.name, **(_onnx_before_after(run) if opts.latency else {})})


def _onnx_before_after(run) -> dict:
    """FP32 ONNX size and ONNX Runtime batch-1 latency of the model before (the reference) and after pruning."""
    import tempfile
    from pathlib import Path

    from ..qdq.export import export_onnx
    from ..runtime.latency import measure_latency
    from ..runtime.runners import OrtRunner

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in (("before", run.reference), ("after", run.model)):
            path = export_onnx(model, run.example_input(), Path(tmp) / f"{key}.onnx")
            latency = measure_latency(OrtRunner(path, key, "default"), tuple(run.recipe.model.input_size), [1],
                                      repeats=20)
            out[f"onnx_bytes_{key}"] = path.stat().st_size
            out[f"ort_latency_b1_ms_{key}"] = latency["b1"]["median_ms"]
    out["ort_speedup_b1"] = out["ort_latency_b1_ms_before"] / out["ort_latency_b1_ms_after"]
    return out


def _gradient_batches(run):
    """Backward passes of the task's label loss on a few labeled fine-tune batches (Taylor importance needs
    gradients)."""
    import torch

    from ..data import make_loader

    if not run.task.has_label_loss or not run.recipe.data.finetune:
        raise RecipeError("stages.prune.importance taylor needs a labeled classification fine-tune split "
                          "(data.finetune)")
    dataset = run.dataset("finetune")
    if not getattr(dataset, "labeled", False):
        raise RecipeError("stages.prune.importance taylor needs labels in data.finetune; use magnitude or bn_scale")
    loader = make_loader(dataset, run.recipe.data, shuffle=False)

    def run_batches(model):
        for i, (images, labels) in enumerate(loader):
            if i >= 4:
                break
            device = next(model.parameters()).device
            run.task.label_loss(model(images.to(device)), torch.as_tensor(labels)).backward()

    return run_batches
