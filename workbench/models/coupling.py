"""Channel couplings a pruner's dependency graph cannot see, rewritten into exact equivalents it can.

Before structured pruning and before a pruned model is loaded, so both see the same modules (prune/structured.py
and models/pruned_file.py call it; a model folder must not import the pruner to load a pruned file).
"""

from __future__ import annotations

import torch
from torch import nn

_COUPLING = "structured pruning: rewriting option-A shortcuts (F.pad) as 1x1 convolutions"
_COUPLING_ADVICE = ("This is a workbench defect, not your model's: report it; meanwhile ignore the blocks around it "
                    "(stages.prune.ignore) or use unstructured pruning.")


def make_coupling_explicit_(model: nn.Module, example: torch.Tensor | None = None) -> None:
    """Rewrite modules whose channel coupling the dependency graph cannot see into exact equivalents it can.

    Applied before pruning and before loading a pruned model, so both see the same modules. Proved to keep the
    float model's outputs on `example` (models/equivalence.py); without one (a pruned file being loaded), each
    replaced module is proved against the one it replaces on a random input. A RewriteError where either differs.
    """
    from .cifar_resnet import LambdaLayer, option_a_as_convolutions_
    from .equivalence import checked_rewrite, checked_swap

    if not any(isinstance(m, LambdaLayer) for m in model.modules()):
        return  # nothing to rewrite: no check to run
    if example is not None:
        checked_rewrite(model, option_a_as_convolutions_, example, what=_COUPLING, advice=_COUPLING_ADVICE)
        return
    for name, old, new in option_a_as_convolutions_(model):
        sample = torch.randn(2, old.in_planes, 8, 8, generator=torch.Generator().manual_seed(0))
        checked_swap(name, old, new, sample.to(new.weight.device), what=_COUPLING, advice=_COUPLING_ADVICE)
