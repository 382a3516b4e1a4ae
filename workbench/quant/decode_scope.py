"""Which part of a model is its output decode, found from the traced graph and kept float.

A detector ends in arithmetic on its head convolutions' raw maps: sigmoid and exp, grid and
stride arithmetic, reshape/permute/concat, and for Ultralytics' heads a softmax over box-distance
bins read by a fixed 1x1 convolution (DFL). Quantizing any of it moves boxes by whole pixels and
is the commonest cause of an INT8 detector scoring near zero, so this module finds it for any
architecture, without knowing the family's class names:

- the model is traced once (the TorchScript ONNX exporter, into memory) on the example input;
- from every graph output the walk goes backwards through every op; it stops at a convolution
  (or Linear) that is a head's last layer, and those stay INT8 like every feature layer;
- a convolution whose input comes, through reshapes and permutes only, from a Softmax, Exp or a
  Sigmoid that is not half of a SiLU (x * sigmoid(x)), reads decoded values (DFL's expectation): it
  belongs to the decode, is kept float, and the walk goes on through it.

The ops passed on the way are the decode; the quantizable layers among them are what the
calibration keeps float (`QuantResult.decode_float`, with the reason per layer). Only
Conv/Linear inputs carry quantizers in this preset, so the other decode ops are float already:
they are counted, so the report says what the decode was. A model that cannot be traced keeps the
name rule (Ultralytics' DFL class) and the reason is reported.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

# ONNX ops a quantizable layer becomes (quant/ptq.py's QUANTIZABLE_TYPES).
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops that only move values around: a decode mark is looked for through them.
SHAPE_OPS = frozenset({"Reshape", "Transpose", "Split", "Slice", "Concat", "Unsqueeze", "Squeeze", "Flatten",
                       "Gather", "Identity", "Expand", "Cast"})
# Ops that turn raw head maps into probabilities or box lengths: a layer fed by one reads decoded values.
DECODE_MARKS = frozenset({"Softmax", "LogSoftmax", "Exp", "Sigmoid"})


@dataclass
class DecodeScope:
    """The decode found in one model's graph."""

    traced: bool = False
    reason: str = ""  # why the graph was not traced (traced is False)
    ops: dict[str, int] = field(default_factory=dict)  # op type -> how many the decode holds (all float)
    layers: dict[str, str] = field(default_factory=dict)  # module name -> why it is part of the decode
    head_layers: list[str] = field(default_factory=list)  # the last layer of each head (quantized as features)

    def as_dict(self) -> dict:
        return {"traced": self.traced, **({"reason": self.reason} if self.reason else {}), "ops": self.ops,
                "layers_float": self.layers, "head_layers": self.head_layers}

    def decoding_heads(self) -> list[str]:
        """The head layers, where what follows them decodes (a sigmoid, exp or softmax among the ops after them);
        none where only plain arithmetic follows the last layers (a toy classifier ending in a residual Add), which
        is no decode for the residual rule to leave float."""
        return list(self.head_layers) if self.traced and set(self.ops) & (DECODE_MARKS | {"TopK"}) else []

    def summary(self) -> str:
        """One line for the run's log and report."""
        if not self.traced:
            return f"decode not traced ({self.reason}); only the known decode modules (DFL) kept float"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0])))
        kept = f"{len(self.layers)} layer(s) kept float ({', '.join(sorted(self.layers))})" if self.layers else \
            "no layer inside it"
        return (f"decode after {len(self.head_layers)} head layer(s): {sum(self.ops.values())} float op(s) "
                f"[{ops or 'none'}]; {kept}")


def find_decode_scope(model: nn.Module, example_input: torch.Tensor) -> DecodeScope:
    """Trace `model` on one image of `example_input` and find its decode (module docstring)."""
    try:
        graph = _trace(model, example_input[:1])
    except Exception as e:  # noqa: BLE001 - any tracing failure leaves the name rule, reported
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DecodeScope(traced=False, reason=f"{type(e).__name__}: {first[:200]}")
    return scope_of_graph(graph, model)


def _trace(model: nn.Module, x: torch.Tensor):
    import onnx

    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, do_constant_folding=False)
    finally:
        model.train(was_training)
    return onnx.load_from_string(buffer.getvalue()).graph


def scope_of_graph(graph, model: nn.Module) -> DecodeScope:
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    modules = dict(model.named_modules())
    scope = DecodeScope(traced=True)
    ops: Counter = Counter()
    seen: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in LAYER_OPS:
            module = _module_of(node, modules)
            mark = _decode_mark(node, producer, consumers)
            if mark is None:  # a head's last layer: the features end here
                if module is not None and module not in scope.head_layers:
                    scope.head_layers.append(module)
                continue
            if module is not None:
                scope.layers[module] = f"reads the {mark} of the head's output (decode arithmetic, e.g. DFL)"
            ops[node.op_type] += 1
            stack.append(node.input[0])
            continue
        ops[node.op_type] += 1
        stack.extend(node.input)
    scope.ops = dict(ops)
    return scope


def _module_of(node, modules: dict[str, nn.Module]) -> str | None:
    """The module a layer node came from: its weight's parameter name, else its scope (`/a/a.b/Conv` -> a.b)."""
    if len(node.input) > 1 and node.input[1].endswith(".weight") and node.input[1][:-7] in modules:
        return node.input[1][:-7]
    parts = node.name.split("/")
    if len(parts) >= 3 and parts[-2] in modules:
        return parts[-2]
    return None


def _decode_mark(layer, producer: dict, consumers: dict) -> str | None:
    """The decode op (Softmax, Exp, a non-SiLU Sigmoid) this layer's data input comes from through shape ops only."""
    stack, seen = [layer.input[0]], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in DECODE_MARKS and not _is_silu_gate(node, consumers):
            return node.op_type
        if node.op_type in SHAPE_OPS:
            stack.extend(node.input[:1] if node.op_type != "Concat" else node.input)
    return None


def _is_silu_gate(node, consumers: dict) -> bool:
    """A Sigmoid whose output multiplies its own input: SiLU/Swish, an activation, not a decode."""
    if node.op_type != "Sigmoid":
        return False
    x = node.input[0]
    return any(c.op_type == "Mul" and x in c.input for c in consumers.get(node.output[0], []))
