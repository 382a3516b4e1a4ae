"""ONNX export of fake-quant (Q/DQ) and float models, the checks every written graph passes, and reading one back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, WorkbenchError
from ..io import atomic_path
from .graph import COMPUTE_OPS, GraphIndex
from .shapes import check_declared_shapes

INPUT_NAME = "images"
OUTPUT_NAME = "output"
# Metadata key of the Reshapes export freed of a constant batch (qdq/shapes.py), one sentence each, as JSON.
SHAPE_FIXES = "workbench.shape_fixes"


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    metadata: dict[str, str] | None = None,
    clean: bool = False,
) -> Path:
    """Export with the TorchScript exporter (modelopt's Q/DQ export needs it: dynamo=False), then check.

    `metadata` goes into the model's metadata_props (e.g. the precision plan). `clean` runs
    onnxslim over the graph (constant folding, dead and duplicate nodes; Q/DQ kept). A graph declaring a dynamic
    batch or size is run at two of each before it is written (qdq/shapes.py): a Reshape that pins the batch is fixed
    (and listed under SHAPE_FIXES in its metadata, see `shape_fixes`), any other failure is an ExportError.
    """
    import onnx

    axes = {}
    if dynamic_batch or dynamic_size:
        dims = {}
        if dynamic_batch:
            dims[0] = "batch"
        if dynamic_size:
            dims.update({2: "height", 3: "width"})
        axes = {INPUT_NAME: dims, OUTPUT_NAME: {0: "batch"} if dynamic_batch else {}}
    was_training = model.training
    model.eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes or None,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except Exception as e:
            raise ExportError(f"export: torch.onnx.export failed for {type(model).__name__}: {e}") from None
        finally:
            model.train(was_training)
        if metadata or clean or axes:
            proto = onnx.load(str(tmp))
            if clean:
                proto = clean_graph(proto)
            if axes:  # the graph runs at the shapes it declares, or is fixed to, or nothing is written
                proto, shapes = check_declared_shapes(proto, tuple(example.shape), dynamic_batch, dynamic_size,
                                                      f"export: {path.name}")
                if shapes.fixes:
                    proto.metadata_props.add(key=SHAPE_FIXES, value=json.dumps(shapes.fixes))
            for key, value in (metadata or {}).items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))
        check_model_file(tmp, f"export: {path.name}")
    return path


def shape_fixes(path: str | Path) -> list[str]:
    """The Reshapes export freed of a constant batch in the graph at `path` (its SHAPE_FIXES metadata), [] if none."""
    import onnx

    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        if prop.key == SHAPE_FIXES:
            try:
                fixes = json.loads(prop.value)
            except ValueError:
                return []
            return [str(f) for f in fixes] if isinstance(fixes, list) else []
    return []


def check_model_file(path: str | Path, what: str) -> None:
    """onnx.checker with full shape inference, and every constant finite; an ExportError that starts with `what`
    if the graph fails either (onnx.checker accepts NaN weights, and so would ONNX Runtime and TensorRT)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{what} fails onnx.checker: {e}") from None
    if bad := first_nonfinite_constant(onnx.load(str(path))):
        name, reader, nan, inf = bad
        raise ExportError(
            f"{what} has {nan} NaN and {inf} Inf values in its constant {name!r} (read by node {reader}): the model's "
            "weights or quantization ranges are not finite, so its outputs would be too. Nothing was written; check "
            "the model's weights (a diverged training stage, BatchNorm statistics with a zero variance)"
        )


# Ops whose constant inputs are weights, biases or quantization scales: an Inf there is a broken model. Elsewhere
# +-inf is a legitimate bound or fill (a Pad with -inf before a max pool, a Clip bound, an attention mask).
_WEIGHT_READERS = {*COMPUTE_OPS, "BatchNormalization", "QuantizeLinear", "DequantizeLinear"}


def first_nonfinite_constant(model) -> tuple[str, str, int, int] | None:
    """(name, the node reading it, NaN count, Inf count) of the float constant that the graph reads first (the
    layer nearest the input) holding NaN, or Inf where it is read as a weight or scale; None when there is none."""
    index = GraphIndex(model)
    reads = [(name, n) for n in index.nodes for name in n.input if name in index.constants]
    for name, reader in reads:
        value = index.constants[name]
        if value.dtype.kind != "f":
            continue
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        if nan or (inf and reader.op_type in _WEIGHT_READERS):
            return name, reader.name or reader.op_type, nan, inf
    return None


def clean_graph(model):
    """Constant folding, dead nodes and duplicate Q/DQ removed by onnxslim, which keeps Q/DQ nodes
    intact (tested: identical outputs and the same TensorRT rule check on the graphs we export)."""
    import onnxslim

    return onnxslim.slim(model)


def load_onnx(path: str | Path):
    """The ONNX model at `path`, or a WorkbenchError that says what is wrong with the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such file; give the path of an exported .onnx model")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends for a file that is not a model
        why = str(e).splitlines()[0] if str(e) else "cannot parse"
        raise WorkbenchError(f"{path} is not an ONNX model ({type(e).__name__}: {why}); is it truncated or another "
                             "format? Export it again") from None
    # Protobuf parses an empty file (and some other bytes) as an empty ModelProto: no graph to check or run.
    if not model.graph.node or not model.graph.input:
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds no graph (no nodes or no input)"
        raise WorkbenchError(f"{path} {what}, so it is not an ONNX model; export it again (workbench run writes "
                             "model.onnx)")
    from .limits import graph_problem

    if problem := graph_problem(model):  # before a checker, compiler or runtime allocates what it declares
        raise WorkbenchError(f"{path}: {problem}; it was not read further")
    return model


def onnx_input_dims(path: str | Path) -> list[int | None]:
    """The first graph input's dimensions, None where dynamic (e.g. [None, 3, 224, 224])."""
    dims = load_onnx(path).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]
