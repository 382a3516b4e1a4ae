"""Pruning: unstructured magnitude and 2:4 sparsity (masks on Conv/Linear weights), structured channel pruning
(structured.py), and the pruned model handed on to later stages."""

from pathlib import Path

from .unstructured import magnitude_prune_, make_permanent, prunable_layers, sparsity_2to4_, weight_sparsity


def hand_on_pruned(run) -> Path:
    """Save the run's model as pruned_model.pt (re-saved after fine-tuning) and hand it on as the pruned FP32
    model, which export and evaluate show beside the original FP32 model and the INT8 one."""
    from ..models.pruned_file import save_pruned

    run.artifacts.pruned_fp32 = run.model
    run.artifacts.pruned_file = save_pruned(run.model, run.path("pruned_model.pt"))
    return run.artifacts.pruned_file


__all__ = ["hand_on_pruned", "magnitude_prune_", "make_permanent", "prunable_layers", "sparsity_2to4_",
           "weight_sparsity"]
