"""Proof that a model rewrite keeps the float function it was handed.

The workbench rewrites models before it quantizes or prunes them: BatchNorm folded into the
convolution before it (quant/fold.py), residual blocks given a forward whose Add has quantizers
(quant/rules.py), option-A shortcuts made convolutions (prune/structured.py). Each rewrite is
meant to leave the float function unchanged; `checked_rewrite` makes that a measured fact: it runs
the model before and after the rewrite on the same images (every quantizer passing data through)
and, where the outputs differ beyond float rounding, puts the model back and raises a RewriteError
naming the rewrite, the first module whose output differs and by how much.

"First" is in the order modules finish their forward (children before their parent), so a
block whose rewritten forward drops a branch is named itself, not the network's last layer.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, TypeVar

import torch
from torch import nn

from ..errors import RewriteError

T = TypeVar("T")
# Float rounding: a rewrite that keeps the arithmetic (a new forward over the same layers) is exact; folding
# BatchNorm reorders a multiply and an add, about 1e-6 relative per layer.
DEFAULT_RTOL = 1e-4
OUTPUT = "the model's output"


@dataclass(frozen=True)
class Difference:
    """Where two runs of a model first disagree: a module's name (or OUTPUT) and how far apart they are."""

    module: str
    max_abs: float  # max |after - before| over the module's output tensors
    scale: float  # max |before| there: what the difference is relative to
    images: int

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.scale, 1e-12)

    def describe(self) -> str:
        where = OUTPUT if self.module == OUTPUT else f"module '{self.module}'"
        if self.max_abs == float("inf") and self.scale == 0.0:
            return f"the output of {where} has another structure or shape on {self.images} image(s)"
        return (f"the output of {where} differs by {self.max_abs:.3g} (max |output| {self.scale:.3g}, "
                f"{self.relative:.1e} relative) on {self.images} image(s)")


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor in a module's output (a tensor, or tuples/lists/dicts of them), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in tensors_of(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in tensors_of(item)]
    return []


def difference(before: Any, after: Any) -> tuple[float, float] | None:
    """(max |after - before|, max |before|) over two outputs of one structure; None if their structure differs
    (a tensor more or less, another shape), which no tolerance can accept."""
    a, b = tensors_of(before), tensors_of(after)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    worst, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        x, y = x.detach().double(), y.detach().double()
        # the same Inf, or NaN, on both sides is no difference (a model broken before the rewrite stays so)
        both_nonfinite = ~torch.isfinite(x) & ((x == y) | (torch.isnan(x) & torch.isnan(y)))
        gap = torch.where(both_nonfinite, torch.zeros_like(x), (x - y).abs())
        worst = max(worst, float(torch.nan_to_num(gap, nan=float("inf")).max()))
        scale = max(scale, float(x[torch.isfinite(x)].abs().max()) if torch.isfinite(x).any() else 0.0)
    return worst, scale


def agrees(before: Any, after: Any, rtol: float = DEFAULT_RTOL) -> bool:
    found = difference(before, after)
    return found is not None and found[0] <= rtol * max(found[1], 1e-6)


def _run(model: nn.Module, inputs: torch.Tensor, float_mode: Callable[[nn.Module], ContextManager],
         record: dict[tuple[str, int], list[torch.Tensor]] | None = None) -> Any:
    """The model's output on `inputs` in eval mode (its mode put back); with `record`, every named module's
    outputs, cloned as they are made (later in-place ops, `x += shortcut`, would change them)."""
    handles, calls = [], {}
    if record is not None:
        for name, module in model.named_modules():
            if not name:
                continue

            def hook(module, args, output, name=name):
                k = calls[name] = calls.get(name, -1) + 1
                record[(name, k)] = [t.detach().clone() for t in tensors_of(output)]

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), float_mode(model):
            return model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def first_difference(before: nn.Module, after: nn.Module, inputs: torch.Tensor, rtol: float = DEFAULT_RTOL,
                     intended: Iterable[str] = (),
                     float_mode: Callable[[nn.Module], ContextManager] = lambda m: contextlib.nullcontext()
                     ) -> Difference | None:
    """None if `after` computes what `before` does on `inputs` (within `rtol` of the output's magnitude); else where
    they first part: the first module, in the order `before` finishes them, whose output differs (modules named in
    `intended` change their output on purpose, as a convolution with BatchNorm folded into it), or the output.

    The verdict is the model's output; the module-by-module search runs, on one image, only when it differs."""
    out_before, out_after = _run(before, inputs, float_mode), _run(after, inputs, float_mode)
    found = difference(out_before, out_after)
    if found is not None and found[0] <= rtol * max(found[1], 1e-6):
        return None
    overall = Difference(OUTPUT, *(found if found is not None else (float("inf"), 0.0)), int(inputs.shape[0]))
    one = inputs[:1]
    seen_before: dict[tuple[str, int], list[torch.Tensor]] = {}
    seen_after: dict[tuple[str, int], list[torch.Tensor]] = {}
    _run(before, one, float_mode, seen_before)
    _run(after, one, float_mode, seen_after)
    skip = set(intended)
    for key, outputs in seen_before.items():  # dicts keep the order the hooks fired in
        if key[0] in skip or key not in seen_after:
            continue
        gap = difference(outputs, seen_after[key])
        if gap is None:
            return Difference(key[0], float("inf"), 0.0, 1)
        if gap[0] > rtol * max(gap[1], 1e-6):
            return Difference(key[0], gap[0], gap[1], 1)
    return overall


def checked_rewrite(model: nn.Module, rewrite: Callable[[nn.Module], T], inputs: torch.Tensor, *, what: str,
                    advice: str, rtol: float = DEFAULT_RTOL, intended: Callable[[T], Iterable[str]] = lambda r: (),
                    float_mode: Callable[[nn.Module], ContextManager] = lambda m: contextlib.nullcontext()) -> T:
    """Apply `rewrite(model)` in place and prove the float model still computes the same outputs on `inputs`.

    `float_mode(model)` is entered around each run (quantizers off). Where the outputs differ the model is put back
    as it was (the same module objects, their original classes, children and values) and a RewriteError names
    `what`, the first differing module and `advice` (what the user can do)."""
    reference, snapshot = copy.deepcopy(model), _snapshot(model)
    try:
        result = rewrite(model)
    except BaseException:
        _put_back(model, snapshot, reference)  # a rewrite that stops half way leaves nothing half done
        raise
    try:
        found = first_difference(reference, model, inputs, rtol, intended(result), float_mode)
    except Exception as e:
        _put_back(model, snapshot, reference)
        raise RewriteError(f"{what} left a model that does not run on the images it was checked on "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}), so it was not applied. "
                           f"{advice}") from None
    if found is not None:
        _put_back(model, snapshot, reference)
        raise RewriteError(f"{what} changed what the float model computes, so it was not applied: {found.describe()}, "
                           f"beyond float rounding ({rtol:g} relative). {advice}")
    return result


_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, type, dict]]:
    """Each module object with its class and attributes (its parameter, buffer and child tables copied), so a rewrite
    that swaps classes, children or parameters can be undone on the same objects callers hold."""
    return [(m, type(m), {k: dict(v) if k in _CONTAINERS else v for k, v in vars(m).items()}) for m in model.modules()]


def _put_back(model: nn.Module, snapshot: list[tuple[nn.Module, type, dict]], reference: nn.Module) -> None:
    """Undo a rewrite in place: every module object gets its class and attributes back, then the values of the
    untouched copy (a rewrite may have written into parameters, as folding does)."""
    for module, cls, state in snapshot:
        module.__class__ = cls
        module.__dict__.clear()
        module.__dict__.update({k: dict(v) if k in _CONTAINERS else v for k, v in state.items()})
    with torch.no_grad():
        model.load_state_dict(reference.state_dict())


def checked_swap(name: str, old: nn.Module, new: nn.Module, sample: torch.Tensor, *, what: str, advice: str,
                 rtol: float = DEFAULT_RTOL) -> None:
    """Prove that module `new` computes what `old` (a pure function of its input) does, on `sample`; a RewriteError
    naming the module otherwise. For a swap made where no model input is at hand (a pruned model being loaded)."""
    with torch.no_grad():
        before, after = old(sample), new(sample)
    require_same(name, before, after, int(sample.shape[0]), what=what, advice=advice, rtol=rtol)


def require_same(name: str, before: Any, after: Any, images: int, *, what: str, advice: str,
                 rtol: float = DEFAULT_RTOL) -> None:
    """A RewriteError naming module `name` unless `after` equals `before` (two outputs of it) to float rounding."""
    found = difference(before, after)
    if found is None or found[0] > rtol * max(found[1], 1e-6):
        gap = Difference(name, *(found if found is not None else (float("inf"), 0.0)), images)
        raise RewriteError(f"{what} changed what the float model computes: {gap.describe()} (random input), beyond "
                           f"float rounding ({rtol:g} relative). {advice}")
