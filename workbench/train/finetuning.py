"""The body both training stages share (finetune after pruning, qat): the run's losses, an evaluation after
every epoch, checkpoints that refuse to resume under other settings, the history and its curve.

Losses come from the run's task: distillation from the FP32 reference model (images only; the task says
what to match) and, where the split has labels and the task has a loss for them, that loss too.
"""

from __future__ import annotations

import torch

from ..data import make_loader, subset_loader
from ..errors import RecipeError
from ..io import write_json
from ..plots import plot_history
from ..progress import track
from .loop import FitSetup, fit
from .options import FinetuneOptions


def training_losses(run, opts: FinetuneOptions, labeled: bool):
    """(the loss function of (outputs, batch) for `fit`, the distiller whose hooks to remove after training)."""
    task = run.task
    use_labels = opts.task_loss and labeled and task.has_label_loss
    if not opts.distill and not use_labels:
        what = ("the fine-tune split has no labels" if task.has_label_loss
                else f"task {task.name} has no loss of its own")
        raise RecipeError(f"stages.finetune: nothing to learn from: distill is off and {what}; turn distill on")
    teacher = run.reference.eval()
    image_size = float(max(run.recipe.model.input_size[1:]))
    distiller = task.distiller(run.model, teacher, opts.temperature, run.num_classes(), image_size) \
        if opts.distill else None

    def loss_fn(outputs, batch):
        images, targets = batch
        parts, total = {}, 0.0
        if distiller is not None:
            with torch.no_grad():
                teacher_out = teacher(images.to(run.device))
            kd = distiller.loss(outputs, teacher_out)
            total = total + opts.distill_weight * kd
            parts["distill"] = kd.item()
        if use_labels:
            label_loss = task.label_loss(outputs, targets)
            total = total + label_loss
            parts["cross_entropy"] = label_loss.item()
        return total, parts

    return loss_fn, distiller


def epoch_evaluator(run, samples: int | None):
    """Scores the model on an evaluation subset after every epoch (None when the recipe has no evaluation split)."""
    if run.recipe.data.evaluation is None:
        return None
    dataset = run.dataset("evaluation")
    loader = subset_loader(dataset, run.recipe.data, samples)

    def evaluate(model, what: str = "score the epoch's model") -> dict:
        scorer = run.task.scorer(run.recipe, dataset)
        seen = 0
        with torch.no_grad():
            for images, targets in track(loader, f"{what} on {samples or len(dataset)} evaluation images"):
                images = images.to(run.device)
                scorer.update(model(images), targets, run.reference(images))
                seen += images.shape[0]
        name, value = run.task.headline_points(scorer.result())
        return {"metric": name, "value": value, "samples": seen}

    return evaluate


def fingerprint(run, opts: FinetuneOptions, label: str) -> dict:
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
    loader = make_loader(dataset, run.recipe.data, shuffle=True)
    loss_fn, distiller = training_losses(run, opts, bool(getattr(dataset, "labeled", False)))
    setup = FitSetup(device=run.device, auto_mode=run.task.train_mode, label=label, checkpoint_dir=checkpoint_dir,
                     evaluate=epoch_evaluator(run, opts.eval_samples), after_step=after_step,
                     fingerprint=fingerprint(run, opts, label),
                     on_epoch=lambda entry: run.trackers.epoch(label, entry))
    try:
        return fit(run.model, loader, opts, loss_fn, setup)
    finally:
        if distiller is not None:
            distiller.remove()


def train_stage(run, opts: FinetuneOptions, label: str, curve: str, after_step=None) -> dict:
    """Score the start, train, write `<label>.json` and the curve; the stage's metrics (epochs, steps, final
    loss, evaluation before and after, history)."""
    torch.manual_seed(0)  # the shuffling order
    evaluate = epoch_evaluator(run, opts.eval_samples)
    start = "PTQ (before QAT)" if label == "qat" else "pruned (before fine-tuning)"
    # The starting point, and the FP32 model on the same images: the line the curve should reach.
    before = evaluate(run.model.eval(), f"score {start}") if evaluate is not None and not opts.resume else None
    reference = evaluate(run.reference.eval(), "score FP32") if evaluate is not None else None
    history = train_on_finetune_split(run, opts, run.path("checkpoints"), label, after_step)
    write_json(run.path(f"{label}.json"), {"options": opts.model_dump(mode="json"), "history": history})
    baselines = {name: e["value"] for name, e in ((start, before), ("FP32", reference)) if e is not None}
    plot_history(run.path(curve), history, label if label != "qat" else "QAT", baselines)
    last = history[-1] if history else {}
    return {"epochs": len(history), "steps": last.get("steps", 0), "final_loss": last.get("loss"),
            "eval_before": before, "eval_fp32": reference, "eval": last.get("eval"), "history": history}
