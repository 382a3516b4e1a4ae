"""finetune: train the run's model on the fine-tune split, by distillation from the FP32 model and/or the task loss.

Distillation from the run's reference model (the FP32 model as loaded) needs only images; with labels,
a task with a loss of its own (a classifier: cross-entropy) adds it. Writes a checkpoint per epoch
(`checkpoints/finetune_epoch<N>.pt`, resumable with `resume:`), `finetune.json` (the history) and
`training_curve.png`; after prune, `pruned_model.pt` is re-saved with the fine-tuned weights.
"""

from __future__ import annotations

from ..train.options import FinetuneOptions
from .registry import Restorer, register_stage

# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def _finetuned(run, options, values, loaded) -> bool:
    # After prune, pruned_model.pt holds the fine-tuned weights, already restored with the prune stage;
    # a finetune without prune keeps its weights only in the epoch checkpoints: it runs again.
    return run.artifacts.pruned_file is not None


@register_stage("finetune", FinetuneOptions, refuses=("quantized",),
                restorer=Restorer(_finetuned, lambda o, v: ["pruned_model.pt"]),
                refusal_hint=" (training a quantized model is the qat stage)", needs_data=("finetune",))
def finetune(run, opts: FinetuneOptions) -> None:
    """Fine-tune (after pruning): distillation from the FP32 model and/or the task loss, checkpoints per epoch."""
    from ..prune import hand_on_pruned
    from ..train.finetuning import train_stage

    summary = train_stage(run, opts, "finetune", "training_curve.png")
    if run.artifacts.pruned_file is not None:  # the saved pruned model gets the fine-tuned weights
        hand_on_pruned(run)
    run.record("finetune", summary)
