"""An exported graph runs at the shapes it declares: the check right after export, and the one fix it can prove.

A graph exported with a dynamic batch (or height and width) says so in its input's shape, but the TorchScript
exporter traces Python: `batch, c, h, w = x.data.size()` then `x.view(batch, groups, c // groups, h, w)` (the
ShuffleNet `channel_shuffle`) becomes a Reshape whose shape is the constant (1, 2, 4, 16, 16), and the graph that
declares `batch` fails at batch 2 (or, with a -1 elsewhere in the shape, mixes the images of a batch). Nothing in
the export notices; the first engine to run a batch does, far later, with a raw ONNX Runtime traceback.

So every graph that declares a dynamic dimension is run here, in ONNX Runtime on the CPU with its optimisations off
(so an error names the exported node): at the export's batch and one more (the first images of the larger batch
must give the same outputs as the smaller batch alone), and, when height and width are dynamic, at a second size.

The one fix applied: a Reshape whose shape is a constant with the export's batch as its first entry, reading a
tensor whose first dimension is the graph input's batch (symbolic shape inference carries `batch` through
convolutions, slices, transposes and Reshapes that copy it), gets 0 there instead (ONNX Reshape: copy the input's
dimension). At the export's batch that computes exactly what it did; at any other batch it keeps each image's
values apart. The fixed graph is run through the same check again, and kept only if it passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ExportError

# The second height and width tried for a graph with dynamic size: the export's plus this, a multiple of every
# stride a vision model downsamples by (32 for YOLO's P5, 64 for a P6 head).
SIZE_STEP = 64


@dataclass
class ShapeCheck:
    """What the check ran (input shapes) and the Reshapes it freed of a constant batch (sentences, one each)."""

    shapes: list[list[int]] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)


def check_declared_shapes(model, example_shape: tuple[int, ...], dynamic_batch: bool, dynamic_size: bool,
                          what: str) -> tuple[object, ShapeCheck]:
    """The graph (fixed, if it needed and allowed the fix) and what was checked; an ExportError starting with `what`
    that names the failing node and what to do when the graph does not run at a shape it declares."""
    check = ShapeCheck(shapes=_shapes(example_shape, dynamic_batch, dynamic_size))
    problem = _first_problem(model, check.shapes)
    if problem is None:
        return model, check
    batch = example_shape[0]
    fixed_first = ""
    if dynamic_batch:
        fixed, fixes = free_batch_reshapes(model, batch)
        if fixes:
            left = _first_problem(fixed, check.shapes)
            if left is None:
                check.fixes = fixes
                return fixed, check
            # What is still wrong once the Reshapes that pinned the batch copy it: the finding that is left to fix.
            problem, model = left, fixed
            fixed_first = f" (after freeing {len(fixes)} Reshape(s) of a constant batch)"
    pinned = pinned_batch_reshapes(model, batch) if dynamic_batch else []
    suspects = f"; Reshape nodes with the constant batch {batch} in their shape: {', '.join(pinned[:5])}" \
        if pinned else ""
    declared = " and ".join(d for d, on in (("batch", dynamic_batch), ("height/width", dynamic_size)) if on)
    raise ExportError(
        f"{what} declares a dynamic {declared} but does not run at every shape it declares{fixed_first}: {problem}"
        f"{suspects}. "
        "The model's forward turns a tensor's size into a Python number (x.data.size(), int(x.size(0)), "
        "x.shape read through .tolist() or numpy), which the exporter writes as a constant: compute the shape from "
        "x.size(i) or use -1 / flatten(1) in that view/reshape, or export with dynamic_batch: false (and "
        "dynamic_size: false) in stages.export. Nothing was written")


def _shapes(example_shape: tuple[int, ...], dynamic_batch: bool, dynamic_size: bool) -> list[list[int]]:
    """The input shapes the check runs: the export's, one more image when the batch is dynamic, a larger size."""
    b, c, h, w = example_shape
    shapes = [[b, c, h, w]]
    if dynamic_batch:
        shapes.append([b + 1, c, h, w])
    if dynamic_size:
        shapes.append([b, c, h + SIZE_STEP, w + SIZE_STEP])
    return shapes


def _first_problem(model, shapes: list[list[int]]) -> str | None:
    """Why the graph fails at one of `shapes` (the first is the export's own), or None when it runs at all of them
    and the larger batch's first images give the export batch's outputs."""
    import onnxruntime as ort

    from ..hardware.ort import ort_session_options

    try:
        session = ort.InferenceSession(model.SerializeToString(), ort_session_options("faithful", threads=1),
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any refusal of the graph is the finding
        return f"ONNX Runtime cannot load it ({_ort_message(e)})"
    name = session.get_inputs()[0].name
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure is reported here, in one line, not also logged by the runtime
    rng = np.random.default_rng(0)
    base_shape, *others = shapes
    base = rng.standard_normal(base_shape).astype(np.float32)
    try:
        reference = session.run(None, {name: base}, quiet)
    except Exception as e:  # noqa: BLE001 - the runtime's refusal, with the node it names, is the finding
        return f"at its export shape {tuple(base_shape)}: {_ort_message(e)}"
    for shape in others:
        if shape[0] > base_shape[0]:  # the larger batch starts with the export batch's own images
            extra = rng.standard_normal([shape[0] - base_shape[0], *shape[1:]]).astype(np.float32)
            x = np.concatenate([base, extra])
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        try:
            outputs = session.run(None, {name: x}, quiet)
        except Exception as e:  # noqa: BLE001 - the runtime's refusal, with the node it names, is the finding
            return f"at input shape {tuple(shape)}: {_ort_message(e)}"
        if shape[0] > base_shape[0] and (gap := _batch_gap(reference, outputs, base_shape[0], shape[0])):
            return f"at input shape {tuple(shape)}: {gap}"
    return None


def _batch_gap(reference: list[np.ndarray], outputs: list[np.ndarray], batch: int, larger: int) -> str | None:
    """How the larger batch's outputs fail to hold the export batch's ones, or None."""
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        if ref.ndim == 0 or ref.shape[0] != batch:
            continue  # not a batched output
        if out.shape[0] != larger:
            return f"output {i} has {out.shape[0]} image(s) for a batch of {larger} (shape {tuple(out.shape)})"
        if out.shape[1:] != ref.shape[1:]:
            return f"output {i} has shape {tuple(out.shape)} at batch {larger} but {tuple(ref.shape)} at {batch}"
        # The same images must give the same outputs whatever else is in the batch. The bound leaves room for a
        # Q/DQ graph's rounding (a value a hair from a rounding boundary moves one step) and for kernels that
        # sum in another order; images mixed with each other miss it by their whole range.
        # the same NaN or Inf on both sides is no difference: a graph with NaN weights is the numeric check's to name
        first, ref = out[:batch].astype(np.float64), ref.astype(np.float64)
        same = ~np.isfinite(ref) & ((first == ref) | (np.isnan(first) & np.isnan(ref)))
        finite = ref[np.isfinite(ref)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        gap = float(np.nan_to_num(np.where(same, 0.0, np.abs(first - ref)), nan=np.inf).max()) if ref.size else 0.0
        if not np.isfinite(gap) or gap > 0.02 * max(scale, 1e-6):
            return (f"output {i} for the same {batch} image(s) differs by {gap:.3g} (of {scale:.3g}) when the batch "
                    f"holds {larger}: the graph mixes the images of a batch")
    return None


def _ort_message(error: Exception) -> str:
    """ONNX Runtime's error in one line: the node it names (op and name) and its status message, source paths cut."""
    text = " ".join(str(error).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    status = re.search(r"Status Message: (.*)", text)
    detail = status.group(1) if status else text
    detail = re.sub(r"\S*onnxruntime_src\S*\s*(onnxruntime::\S+\([^)]*\)\s*)?", "", detail).strip()
    head = f"node {node.group(2)!r} ({node.group(1)}) fails" if node else "ONNX Runtime fails"
    return f"{head}: {detail[:300]}"


def _constant_shapes(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return found


def _reshapes_with_constant_batch(model, batch: int) -> list[tuple[object, np.ndarray]]:
    """(node, shape) of each Reshape whose shape is a constant starting with the export batch, `allowzero` off (0
    then means "copy the input's dimension")."""
    constants = _constant_shapes(model)
    found = []
    for n in model.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in constants:
            continue
        shape = constants[n.input[1]]
        allowzero = next((a.i for a in n.attribute if a.name == "allowzero"), 0)
        if shape.ndim == 1 and shape.size >= 1 and int(shape[0]) == batch and not allowzero:
            found.append((n, shape))
    return found


def pinned_batch_reshapes(model, batch: int) -> list[str]:
    """The names of the Reshapes whose constant shape starts with the export batch (the usual culprits)."""
    return [n.name or n.output[0] for n, _ in _reshapes_with_constant_batch(model, batch)]


def _leading_dims(model) -> dict[str, str | int | None]:
    """The first dimension of every tensor shape inference can type: a symbol ("batch"), a number or None."""
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    # Inferred afresh: shapes recorded earlier (onnxslim writes them, and the outputs' static batch) would win.
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:  # ONNX Runtime's symbolic inference carries `batch` through a Slice (a traced chunk), ONNX's does not
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(bare, auto_merge=True)
    except Exception:  # noqa: BLE001 - an op it does not know: ONNX's own inference, weaker but total
        inferred = None
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(bare)
    dims: dict[str, str | int | None] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shape = info.type.tensor_type.shape
        if shape.dim:
            d = shape.dim[0]
            dims[info.name] = d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") \
                else None
    return dims


def free_batch_reshapes(model, batch: int) -> tuple[object, list[str]]:
    """A copy of the graph with each Reshape that pins the batch (a constant shape starting with `batch`, reading a
    tensor whose first dimension is the input's symbolic batch) copying the batch instead (0); and a sentence per
    Reshape changed. Repeated until none is left: freeing one Reshape gives the batch back to the ones after it."""
    import onnx
    from onnx import numpy_helper

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    symbol = _input_batch_symbol(fixed)
    fixes: list[str] = []
    replaced: set[str] = set()
    if symbol is None:
        return fixed, fixes
    while True:
        leading = _leading_dims(fixed)
        changed = False
        for node, shape in _reshapes_with_constant_batch(fixed, batch):
            if leading.get(node.input[0]) != symbol:
                continue  # its input's first dimension is not provably the batch
            new = shape.copy()
            new[0] = 0
            name = f"{node.input[1]}__batch_copied"
            if name not in {i.name for i in fixed.graph.initializer}:  # a copy: another reader keeps the original
                fixed.graph.initializer.append(numpy_helper.from_array(new, name))
            replaced.add(node.input[1])
            node.input[1] = name
            fixes.append(f"Reshape {node.name or node.output[0]!r}: shape {shape.tolist()} -> {new.tolist()} (its "
                         f"first entry was the export's batch {batch}; 0 copies the input's batch)")
            changed = True
        if not changed:
            break
    if fixes:  # the freed batch reaches the outputs again: declare it there (a cleaned graph had fixed it at 1)
        del fixed.graph.value_info[:]
        _drop_unread(fixed, replaced)
        for out in fixed.graph.output:
            dims = out.type.tensor_type.shape.dim
            if dims and leading.get(out.name) == symbol:
                dims[0].dim_param = symbol
    return fixed, fixes


def _input_batch_symbol(model) -> str | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_param if dims and dims[0].HasField("dim_param") else None


def _drop_unread(model, names: set[str]) -> None:
    """Remove the constants among `names` (initializers or Constant nodes) that no node reads any more."""
    read = {name for n in model.graph.node for name in n.input}
    gone = names - read
    kept = [i for i in model.graph.initializer if i.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
