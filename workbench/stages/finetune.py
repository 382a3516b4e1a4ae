"""finetune: train the run's model on the fine-tune split, by distillation from the FP32 model and/or the task loss.

Distillation from the run's reference model (the FP32 model as loaded) needs only
images; with labels, a classifier also gets cross-entropy. Writes a checkpoint per
epoch (`checkpoints/finetune_epoch<N>.pt`, resumable with `resume:`), `finetune.json`
(the history) and `training_curve.png`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field

from ..data import make_loader, subset_loader
from ..errors import CalibrationError, RecipeError
from ..io import atomic_path, write_json
from ..recipe import StrictModel
from ..tasks import metric_points, new_scorer
from ..train import HeadTaps, TrainOptions, distillation_loss, fit, head_distillation
from .registry import register_stage


class FinetuneOptions(TrainOptions, StrictModel):
    distill: bool = Field(True, description="Distil from the FP32 model (needs no labels).")
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation loss.")
    temperature: float = Field(4.0, gt=0, description="Classifier distillation temperature.")
    task_loss: bool = Field(True, description="Add cross-entropy where the fine-tune split has labels (classifiers).")
    eval_samples: int | None = Field(512, gt=0, description="Evaluation samples scored after every epoch (None: all; needs data.evaluation).")


def training_losses(run, opts, num_classes: int | None, labeled: bool):
    """The loss function of (outputs, batch) for `fit`: distillation and/or cross-entropy."""
    task = run.recipe.task
    use_ce = opts.task_loss and labeled and task == "classification"
    if not opts.distill and not use_ce:
        what = "a detector has no built-in task loss" if task == "detection" else "the fine-tune split has no labels"
        raise RecipeError(f"stages.finetune: nothing to learn from: distill is off and {what}; turn distill on")
    teacher = run.reference.eval()
    image_size = float(max(run.recipe.model.input_size[1:]))
    # Detectors: distil the raw head outputs where the head is known (see train.losses).
    student_taps, teacher_taps = (HeadTaps(run.model), HeadTaps(teacher)) if task == "detection" else (None, None)

    def loss_fn(outputs, batch):
        images, targets = batch
        parts, total = {}, 0.0
        if opts.distill:
            with torch.no_grad():
                teacher_out = teacher(images.to(run.device))
            if student_taps and teacher_taps:
                kd = head_distillation(student_taps.outputs, teacher_taps.outputs)
            else:
                kd = distillation_loss(task, outputs, teacher_out, opts.temperature, num_classes, image_size)
            total = total + opts.distill_weight * kd
            parts["distill"] = kd.item()
        if use_ce:
            logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            ce = F.cross_entropy(logits.float(), torch.as_tensor(targets).to(run.device))
            total = total + ce
            parts["cross_entropy"] = ce.item()
        return total, parts

    loss_fn.taps = [t for t in (student_taps, teacher_taps) if t is not None]  # removed after training
    return loss_fn


def epoch_evaluator(run, samples: int | None):
    """Scores the model on an evaluation subset after every epoch (None when the recipe has no evaluation split)."""
    if run.recipe.data.evaluation is None:
        return None
    dataset = run.dataset("evaluation")
    loader = subset_loader(dataset, run.recipe.data, samples)

    def evaluate(model) -> dict[str, float]:
        scorer = new_scorer(run.recipe, dataset)
        with torch.no_grad():
            for images, targets in loader:
                images = images.to(run.device)
                scorer.update(model(images), targets, run.reference(images))
        name, value = metric_points(scorer.result())
        return {"metric": name, "value": value}

    return evaluate


def fingerprint(run, opts, label: str) -> dict:
    """What a checkpoint's training was: resuming it under other settings is refused."""
    return {
        "stage": label,
        "model": run.recipe.model.model_dump(mode="json"),
        "data.finetune": run.recipe.data.finetune.model_dump(mode="json") if run.recipe.data.finetune else None,
        "options": opts.model_dump(mode="json", exclude={"resume"}),
    }


def train_on_finetune_split(run, opts: FinetuneOptions, checkpoint_dir, label: str, after_step=None) -> list[dict]:
    """Train the run's model on data.finetune with the options' losses; the history per epoch."""
    dataset = run.dataset("finetune")
    num_classes = run.num_classes()
    loader = make_loader(dataset, run.recipe.data, shuffle=True)
    loss_fn = training_losses(run, opts, num_classes, bool(getattr(dataset, "labeled", False)))
    evaluate = epoch_evaluator(run, opts.eval_samples)
    try:
        return fit(run.model, loader, opts, loss_fn, run.device, run.recipe.task, checkpoint_dir, evaluate, label,
                   after_step, fingerprint(run, opts, label))
    finally:
        for taps in loss_fn.taps:
            taps.remove()


@register_stage("finetune", FinetuneOptions, needs_data=("finetune",))
def finetune(run, opts: FinetuneOptions) -> None:
    """Fine-tune (after pruning): distillation from the FP32 model and/or the task loss, checkpoints per epoch."""
    if "quant" in run.state:
        raise CalibrationError("stages.finetune: the model is already quantized; fine-tune before calibrate (training a fake-quant model is QAT)")
    summary = train_stage(run, opts, "finetune", "training_curve.png")
    if "pruned_model" in run.state:  # the saved pruned model gets the fine-tuned weights
        from .prune import keep_pruned_fp32

        keep_pruned_fp32(run)
    run.record("finetune", summary)


def train_stage(run, opts: FinetuneOptions, label: str, curve: str, after_step=None) -> dict:
    """The body both training stages share: score the start, train, write `<label>.json` and the curve.

    Returns the stage's metrics (epochs, steps, final loss, evaluation before and after, history).
    """
    torch.manual_seed(0)  # the shuffling order
    evaluate = epoch_evaluator(run, opts.eval_samples)
    before = evaluate(run.model.eval()) if evaluate is not None and not opts.resume else None  # the starting point
    history = train_on_finetune_split(run, opts, run.path("checkpoints"), label, after_step)
    write_json(run.path(f"{label}.json"), {"options": opts.model_dump(mode="json"), "history": history})
    plot_history(run.path(curve), history, label if label != "qat" else "QAT")
    last = history[-1] if history else {}
    return {"epochs": len(history), "steps": last.get("steps", 0), "final_loss": last.get("loss"),
            "eval_before": before, "eval": last.get("eval"), "history": history}


def plot_history(path, history: list[dict], title: str) -> None:
    """Loss (and the evaluation metric, when measured) per epoch."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    has_eval = all("eval" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(10 if has_eval else 5, 3.4), squeeze=False)
    axes[0][0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss")
    if has_eval:
        axes[0][1].plot(epochs, [h["eval"]["value"] for h in history], marker="o", color="#C44E52")
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel(history[0]["eval"]["metric"])
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
