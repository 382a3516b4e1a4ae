"""Pruning: unstructured magnitude and 2:4 sparsity (masks on Conv/Linear weights)."""

from .unstructured import make_permanent, prunable_layers, magnitude_prune_, sparsity_2to4_, weight_sparsity

__all__ = ["magnitude_prune_", "make_permanent", "prunable_layers", "sparsity_2to4_", "weight_sparsity"]
