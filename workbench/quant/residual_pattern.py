"""The residual_add rule by graph pattern: any Add of two activations computed from quantized layers, in any class.

quant/rules.py rewrites the residual blocks it knows by class (torchvision, timm, YOLO, MBConv, ...). A model of
the user's own (`out = self.conv2(self.act(self.conv1(x))) + x` in a class no rule knows, FastestDet's SPP
`relu(x + self.output(y))`) kept a float Add, which TensorRT runs on its own in higher precision and `check-onnx`
flags. Here the Adds are found on what the model computes, not on its class names:

1. Find (`find_residual_adds`): the float model runs once on the example (quantizers off) under a TorchFunctionMode
   that follows every tensor op. A tensor is "quantized-derived" when it is a quantized layer's output (a module with
   a `weight_quantizer`, found by a forward hook) or computed from one by any op but another compute op (a float
   convolution, a MatMul: what comes out of those is not INT8 data); its origins are the quantized layers it was
   last computed from. An Add (`a + b`, `torch.add`, `x += y`; not a bare `x.add_(y)`) of two tensors of one shape,
   both quantized-derived, from different origins, is a residual Add: a branch through a quantized layer joined to
   a tensor from before it. Two terms of one layer's output (a box decode, `s * scale + s * s * square`) have one
   origin, and are not. Its site is the bytecode instruction that ran it (code object and offset) and how many
   times that instruction had run before in the same call, and its owner is the module whose `forward` ran it (the
   first argument of that frame).
2. Rewrite (`insert_pattern_quantizers`): the owner gets one `ResidualAdd` per site (`<owner>.residual_add`, then
   `<owner>.pattern_add<k>.residual_add`) and a subclass whose forward runs the original one under a mode that
   replaces exactly those Adds by their ResidualAdd (both inputs quantized; identical with the quantizers off). Its
   class, name and state dict keys stay; each owner's rewrite is proved on the input it really receives, and the
   whole model after it (rules.apply_residual_rule).
3. What cannot be rewritten so (an Add in a helper function rather than a module's forward, an in-place `add_` whose
   result is discarded, a rewrite whose output differs) is left float and reported as left alone: the calibrate stage
   warns at the top of the report, and TensorRT runs that Add in float.
"""

from __future__ import annotations

import dis
import fnmatch
import functools
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__}
# `x += y` arrives as add_ too: replaceable, since Python binds x to what it returns; `x.add_(y)` as a statement is
# not (its result is the mutated input, which a new tensor would not be). The caller's instruction tells them apart.
_IN_PLACE = {torch.Tensor.add_}
_REBINDING = {dis.opmap[name] for name in ("BINARY_OP", "INPLACE_ADD") if name in dis.opmap}
# Ops after which a tensor is no longer INT8 data of a quantized layer: a float layer or an attention product.
_COMPUTE = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
            torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.einsum}
_TORCH_DIR = os.path.dirname(torch.__file__)
PATTERN_UNIT = "pattern_add"  # the k-th (k >= 1) Add of one owner: `<owner>.pattern_add<k>.residual_add`


@dataclass(frozen=True)
class AddSite:
    """One residual Add found by pattern: the module whose forward runs it, and which instruction, which time."""

    owner: str  # module name ("" for the model itself)
    code: tuple[str, int, str]  # the forward's code: file, first line, function name
    offset: int  # the bytecode offset of the Add in it (f_lasti)
    occurrence: int  # how many times that instruction ran before, in the same call of the forward
    line: int  # for messages

    def where(self) -> str:
        return f"{os.path.basename(self.code[0])}:{self.line}"


@dataclass
class PatternAdds:
    """What the pattern search found: the sites it can rewrite, and the Adds it cannot, by module (why)."""

    sites: list[AddSite]
    unhandled: dict[str, str]


def _caller():
    """The first frame outside this file and torch's own files: the user code that ran the op."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame = frame.f_back
    return frame


def _frame_self(frame):
    """The object a method's frame runs on: its first argument (`self`, whatever it is called), or None."""
    if frame is None or frame.f_code.co_argcount < 1:
        return None
    return frame.f_locals.get(frame.f_code.co_varnames[0])


def _rebinds(frame) -> bool:
    """Whether the caller's instruction is an operator (`x += y`, whose result Python binds), not a method call."""
    return frame is not None and frame.f_code.co_code[frame.f_lasti] in _REBINDING


def _code_key(code) -> tuple[str, int, str]:
    return code.co_filename, code.co_firstlineno, code.co_name


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _add_operands(func, args, kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two tensors of an Add of equal shapes and no `alpha`, or None (a bias, a scalar, a broadcast)."""
    if kwargs.get("alpha", 1) != 1 or kwargs.get("out") is not None:
        return None
    operands = list(args[:2]) + ([kwargs["other"]] if "other" in kwargs and len(args) < 2 else [])
    if len(operands) != 2 or not all(isinstance(t, torch.Tensor) for t in operands):
        return None
    a, b = operands
    if a.shape != b.shape or not a.is_floating_point() or a.dim() < 2:
        return None
    return a, b


class _Recorder(TorchFunctionMode):
    """Follows which tensors are quantized-derived, and from which layers, and records each residual Add (module
    docstring, 1)."""

    def __init__(self, names: dict[int, str], stack: list[str], heads: frozenset[int] = frozenset()):
        super().__init__()
        self.names, self.stack = names, stack
        self.heads = heads  # a detector's head layers: what is computed from them is its decode, kept float
        self.derived: dict[int, frozenset[int]] = {}  # id(tensor) -> the quantized layers it was last computed from
        self.alive: list[torch.Tensor] = []  # held so that an id is not reused by another tensor within the run
        self.counts: dict[tuple[int, int], int] = {}
        self.frames: list = []
        self.sites: list[AddSite] = []
        self.unhandled: dict[str, str] = {}

    def mark(self, value, origins: frozenset[int]) -> None:
        for t in _tensors(value):
            self.derived[id(t)] = origins
            self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS or func in _IN_PLACE:
            operands = _add_operands(func, args, kwargs)
            if operands is not None:
                a, b = (self.derived.get(id(t)) for t in operands)
                self._record(func, a is not None and b is not None and a != b and not (a | b) & self.heads)
        out = func(*args, **kwargs)
        if func not in _COMPUTE:
            origins = [self.derived[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.derived]
            if origins:
                self.mark(out, frozenset().union(*origins))
        return out

    def _record(self, func, residual: bool) -> None:
        """Count the Add where it ran (the rewritten forward counts every Add of equal shapes the same way) and
        record it if it is `residual` (both inputs quantized-derived, from different origins)."""
        frame = _caller()
        owner = _frame_self(frame)
        key = (id(frame), frame.f_lasti) if frame is not None else None
        occurrence = self.counts.get(key, 0)
        in_place = func in _IN_PLACE and not _rebinds(frame)
        if not in_place:  # the rewritten forward counts the Adds it can replace
            self.counts[key] = occurrence + 1
        self.frames.append(frame)  # alive, so that the next call's frame cannot take its id and its counts
        if not residual:
            return
        inner = self.stack[-1] if self.stack else ""
        where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else "?"
        if in_place:
            self.unhandled.setdefault(inner, f"its Add at {where} is an in-place add_, which the rule cannot replace")
            return
        if not isinstance(owner, nn.Module) or id(owner) not in self.names:
            function = frame.f_code.co_name if frame is not None else "?"
            self.unhandled.setdefault(inner, f"its Add at {where} is in a function ({function}) outside a module's "
                                             "forward, which the rule cannot rewrite")
            return
        self.sites.append(AddSite(self.names[id(owner)], _code_key(frame.f_code), frame.f_lasti, occurrence,
                                  frame.f_lineno))


def find_residual_adds(model: nn.Module, example: torch.Tensor, float_mode, decode_heads=()) -> PatternAdds:
    """The residual Adds of `model` by pattern (module docstring, 1), found on one run on `example` inside
    `float_mode(model)` (rules.quantizers_off, handed in: rules imports this module). An Add with an operand computed
    from one of `decode_heads` (the last layers of a detector's heads: quant/decode_scope.py) is the decode's, which
    stays float, however many head outputs it joins (a grid plus an offset, a centre plus a size)."""
    names = {id(m): n for n, m in model.named_modules()}
    heads = frozenset(id(m) for n, m in model.named_modules() if n in set(decode_heads))
    quantized = {id(m) for m in model.modules() if _is_quantized_layer(m)}  # before the quantizers are switched off
    stack: list[str] = []

    def enter(module, args):
        stack.append(names.get(id(module), "?"))

    def leave(module, args, output):
        if stack:
            stack.pop()
        if id(module) in quantized:
            recorder.mark(output, frozenset({id(module)}))

    recorder = _Recorder(names, stack, heads)
    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), float_mode(model), recorder:
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    sites = list(dict.fromkeys(recorder.sites))  # a module run twice records its sites twice
    handled = {s.owner for s in sites}
    unhandled = {k: v for k, v in recorder.unhandled.items() if k not in handled}
    return PatternAdds(sites, unhandled)


def _is_quantized_layer(module: nn.Module) -> bool:
    q = getattr(module, "weight_quantizer", None)
    return q is not None and getattr(q, "is_enabled", False)


class _Replacer(TorchFunctionMode):
    """Inside one call of an owner's forward: its recorded Adds run as their ResidualAdd (module docstring, 2)."""

    def __init__(self, owner: nn.Module, units: dict[tuple, nn.Module]):
        super().__init__()
        self.owner, self.units = owner, units
        self.counts: dict[tuple[int, int], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _ADDS or func in _IN_PLACE) and (operands := _add_operands(func, args, kwargs)) is not None:
            frame = _caller()
            if _frame_self(frame) is self.owner and (func not in _IN_PLACE or _rebinds(frame)):
                key = (id(frame), frame.f_lasti)
                occurrence = self.counts.get(key, 0)
                self.counts[key] = occurrence + 1
                unit = self.units.get((_code_key(frame.f_code), frame.f_lasti, occurrence))
                if unit is not None:
                    return unit(*operands)
        return func(*args, **kwargs)


def _pattern_forward(original):
    """The owner's forward with its recorded Adds replaced; it shows the original's signature (functools.wraps), so
    torch.fx traces it as it traced the original (CLE finds its chains so)."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        units = {key: self.get_submodule(path) for key, path in self._pattern_units.items()}
        with _Replacer(self, units):
            return original(self, *args, **kwargs)

    return forward


def unit_names(owner: str, count: int) -> list[str]:
    """The residual units of an owner's `count` pattern Adds: `<owner>.residual_add`, `<owner>.pattern_add1...`."""
    prefix = f"{owner}." if owner else ""
    return [f"{prefix}residual_add" if k == 0 else f"{prefix}{PATTERN_UNIT}{k}.residual_add" for k in range(count)]


def rewrite_owner(owner: nn.Module, name: str, sites: list[AddSite], quantized_add) -> list[str]:
    """Give `owner` a quantized Add per site (`quantized_add()`: rules.ResidualAdd) and the forward that uses them;
    returns its residual units."""
    units = unit_names(name, len(sites))
    paths = {}
    for k, site in enumerate(sites):
        if k == 0:
            owner.residual_add = quantized_add()
            paths[(site.code, site.offset, site.occurrence)] = "residual_add"
        else:
            holder = nn.Module()
            holder.residual_add = quantized_add()
            owner.add_module(f"{PATTERN_UNIT}{k}", holder)
            paths[(site.code, site.offset, site.occurrence)] = f"{PATTERN_UNIT}{k}.residual_add"
    owner._pattern_units = paths  # plain tuples and strings: the model still deep-copies and pickles
    cls = type(owner)
    owner.__class__ = type(f"QuantResidual{cls.__name__}", (cls,), {"forward": _pattern_forward(cls.forward)})
    return units


def undo_owner(owner: nn.Module) -> None:
    owner.__class__ = type(owner).__mro__[1]
    for path in owner.__dict__.pop("_pattern_units", {}).values():
        del owner._modules[path.split(".")[0]]


def excluded(units: list[str], exclude) -> bool:
    return any(fnmatch.fnmatchcase(u, p) for u in units for p in exclude)
