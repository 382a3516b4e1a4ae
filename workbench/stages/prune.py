"""prune: unstructured magnitude pruning (in steps, optionally fine-tuned between) or 2:4 sparsity.

Structured channel pruning over a dependency graph is not built yet (see the open issue).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field

from ..data import make_loader
from ..errors import CalibrationError, RecipeError
from ..prune import magnitude_prune_, make_permanent, prunable_layers, sparsity_2to4_, weight_sparsity
from ..train import fit
from .finetune import FinetuneOptions, epoch_evaluator, training_losses
from .registry import StageOptions, register_stage


class PruneOptions(StageOptions):
    method: Literal["magnitude", "sparsity_2to4"] = Field(..., description="magnitude: zero the smallest weights; sparsity_2to4: 2 of every 4.")
    sparsity: float = Field(0.5, gt=0, lt=1, description="magnitude: the share of weights zeroed at the end.")
    scope: Literal["global", "layer"] = Field("global", description="magnitude: rank weights across all layers or within each.")
    steps: int = Field(1, ge=1, description="magnitude: reach the sparsity in this many equal steps.")
    finetune_between: FinetuneOptions | None = Field(None, description="Fine-tune after each step but the last (distillation from FP32).")
    ignore: list[str] = Field(default_factory=list, description="Layer-name glob patterns left dense, e.g. the classifier 'fc'.")


@register_stage("prune", PruneOptions)
def prune_stage(run, opts: PruneOptions) -> None:
    """Unstructured pruning: magnitude (global or per layer, in steps) or 2:4 sparsity; masks made permanent."""
    if "quant" in run.state:
        raise CalibrationError("stages.prune: the model is already quantized; prune before calibrate")
    names = [n for n, _ in run.model.named_modules() if n]
    if missing := [p for p in opts.ignore if not any(fnmatch.fnmatchcase(n, p) for n in names)]:
        raise RecipeError(f"stages.prune.ignore: pattern(s) {missing} match no layer; layer names look like {names[1]!r}")
    layers = prunable_layers(run.model, opts.ignore)
    if not layers:
        raise RecipeError("stages.prune: no Conv/Linear layer left to prune after `ignore`")
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
                ft = opts.finetune_between
                dataset = run.dataset("finetune") if run.recipe.data.finetune else None
                if dataset is None:
                    raise RecipeError("stages.prune.finetune_between needs data.finetune (images to fine-tune on)")
                loss_fn = training_losses(run, ft, len(getattr(dataset, "category_ids", [])) or None, bool(getattr(dataset, "labeled", False)))
                history += fit(run.model, make_loader(dataset, run.recipe.data, shuffle=True), ft, loss_fn, run.device,
                               run.recipe.task, None, epoch_evaluator(run, ft.eval_samples), f"prune step {step}")
    make_permanent(layers)
    sparsity = weight_sparsity(layers)
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
