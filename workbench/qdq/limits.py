"""An ONNX graph within limits, checked as it is loaded: before a checker, a compiler or a runtime allocates for it.

A graph file is bounded by its own size, but what it declares is not: an initializer may declare 2^40 floats and
hold none (numpy then fails to reshape, OpenVINO's allocator throws bad_alloc), and an input may declare a
1 x 3 x 2^31 x 2^31 image that a runtime tries to allocate. So every tensor constant (initializers, Constant
nodes, subgraphs included) must hold exactly the values its dims declare, and the graph's fixed input sizes
must stay under MAX_INPUT_ELEMENTS.
"""

from __future__ import annotations

import math

MAX_INPUT_ELEMENTS = 2**28  # one input: 1 GiB of float32; 64 x 3 x 640 x 640 is 2^26.2
MAX_DIM = 2**20  # one dimension of an input


def graph_problem(model) -> str | None:
    """What makes `model` (an onnx.ModelProto) a graph to refuse before anything allocates for it, else None."""
    for value in model.graph.input:
        if problem := _input_problem(value):
            return problem
    for where, tensor in _tensors(model.graph):
        if problem := _tensor_problem(tensor):
            return f"{where} {tensor.name!r} {problem}"
    return None


def _input_problem(value) -> str | None:
    if not value.type.HasField("tensor_type"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    fixed = [d for d in dims if d is not None]
    shown = " x ".join("?" if d is None else str(d) for d in dims)
    if any(d < 0 or d > MAX_DIM for d in fixed):
        return f"input {value.name!r} declares the shape {shown}: a dimension outside 0..{MAX_DIM}"
    if math.prod(fixed) > MAX_INPUT_ELEMENTS:
        return (f"input {value.name!r} declares the shape {shown}, {math.prod(fixed)} values: more than the "
                f"{MAX_INPUT_ELEMENTS} an input may have here")
    return None


def _tensors(graph):
    """(where, TensorProto) of every constant in `graph` and its subgraphs, iteratively (no recursion to exhaust)."""
    from onnx import AttributeProto

    todo = [graph]
    while todo:
        g = todo.pop()
        for t in g.initializer:
            yield "initializer", t
        for sparse in g.sparse_initializer:
            yield "sparse initializer", sparse.values
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield f"node {node.name or node.op_type} attribute {attr.name}:", attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from ((f"node {node.name or node.op_type} attribute {attr.name}:", t) for t in attr.tensors)
                elif attr.type == AttributeProto.GRAPH:
                    todo.append(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    todo.extend(attr.graphs)


# The repeated field a TensorProto keeps its values in when not in raw_data, by data type name.
_FIELD = {"FLOAT": "float_data", "DOUBLE": "double_data", "INT64": "int64_data", "UINT32": "uint64_data",
          "UINT64": "uint64_data", "STRING": "string_data", "COMPLEX64": "float_data", "COMPLEX128": "double_data"}
_PAIRS = {"COMPLEX64", "COMPLEX128"}  # two stored numbers per value
_SUB_BYTE = {"INT4": 2, "UINT4": 2, "FLOAT4E2M1": 2, "INT2": 4, "UINT2": 4}  # values packed per byte


def _tensor_problem(tensor) -> str | None:
    from onnx import TensorProto, helper

    if any(d < 0 for d in tensor.dims):
        return f"declares negative dimensions {list(tensor.dims)}"
    declared = math.prod(tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL:
        return None  # onnx.load read it from its file, or refused the file
    try:
        kind = TensorProto.DataType.Name(tensor.data_type)
    except ValueError:
        return f"has data type {tensor.data_type}, which ONNX does not define"
    if kind == "UNDEFINED":
        return "has no data type (UNDEFINED)"
    if tensor.HasField("raw_data") or (tensor.raw_data and kind != "STRING"):
        if kind in _SUB_BYTE:
            needed = -(-declared // _SUB_BYTE[kind])
        else:
            try:
                needed = declared * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, TypeError, ValueError):
                return None  # a type this check does not size: the consumer's own checks apply
        held, unit = len(tensor.raw_data), "bytes"
    else:
        field = _FIELD.get(kind, "int32_data")  # int8..int32, bool, float16 and float8 types live in int32_data
        per_value = 2 if kind in _PAIRS else 1
        needed, held, unit = declared * per_value, len(getattr(tensor, field)), "values"
    if held != needed:
        return (f"declares {declared} values (dims {list(tensor.dims)}) but holds {held} {unit} where {needed} are "
                "needed: the graph is truncated or crafted")
    return None
