"""ONNX in, Relax out: load, fix input shapes, fold shape subgraphs and constants, fold batch norm."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import onnx
import tvm
import tvm.relax.frontend.onnx  # noqa: F401 - registers the frontend
from onnx import external_data_helper as ext
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from . import onnx_rewrite as rw
from . import onnxsim_worker
from .errors import DynamicShapeError, ModelLoadError, UnsupportedModelError
from .pipeline import import_passes

#: Models older than this opset are converted up first (TVM's importer covers recent opsets best).
MIN_OPSET = 11
TARGET_OPSET = 13


@dataclass
class ImportedModel:
    """The frontend's output: a static-shape Relax module plus what later stages need from ONNX."""

    mod: object  # tvm.IRModule
    source: str  # file name or "<bytes>" / "<ModelProto>", for messages
    inputs: list  # [(name, shape tuple, dtype str)]
    output_names: list
    layer_names: dict  # {"conv2d": [ONNX node names in graph order], "dense": [...], ...}
    # the ONNX model TVM imported (after onnxsim and onnx_rewrite; None for a Relax module given
    # directly) and, like layer_names, the data input tensor of each linear node: calibration runs
    # it in ONNX Runtime instead of building a float TVM module
    proto: onnx.ModelProto | None = None
    layer_inputs: dict = field(default_factory=dict)


def load_onnx(model) -> tuple[onnx.ModelProto, str]:
    """Read a path, bytes or ``onnx.ModelProto``; malformed input raises ``ModelLoadError``."""
    if isinstance(model, onnx.ModelProto):
        proto, source = copy.deepcopy(model), "<ModelProto>"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        source = "<bytes>"
        proto = _parse(bytes(model), source)
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise ModelLoadError(f"ONNX model file not found: {source}")
        with open(source, "rb") as f:
            proto = _parse(f.read(), source)
        _load_external_data(proto, source)
    else:
        raise ModelLoadError(f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    if not proto.graph.node:
        raise ModelLoadError(f"{source}: the ONNX graph has no nodes (empty or truncated file?)")
    try:
        # protobuf cannot serialise 2 GiB; onnx's checker reads such a model from its file instead
        onnx.checker.check_model(source if proto.ByteSize() >= 2**31 and os.path.isfile(source) else proto)
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ModelLoadError(f"{source}: not a valid ONNX model: {first}") from err
    return proto, source


def _all_tensors(graph):
    """Initializers and attribute tensors of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(g)


def _load_external_data(proto: onnx.ModelProto, source: str) -> None:
    """Read tensors stored outside the model file (every model over 2 GiB does this) from paths
    relative to the model's directory, whatever the working directory."""

    tensors = [t for t in _all_tensors(proto.graph) if ext.uses_external_data(t)]
    if not tensors:
        return
    base = os.path.dirname(os.path.abspath(source))
    for t in tensors:
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        path = os.path.normpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, path]) != base:
            raise ModelLoadError(f"{source}: tensor {t.name!r} points outside the model's directory for its "
                                 f"external data ({location!r})")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{source}: external data file {location!r} of tensor {t.name!r} not found "
                                 f"next to the model ({path})")
    try:
        ext.load_external_data_for_model(proto, base)
    except Exception as err:  # noqa: BLE001 - onnx raises ValueError / OSError on short or bad files
        raise ModelLoadError(f"{source}: cannot read its external data: {type(err).__name__}: {err}") from err


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeWarning-ish errors
        raise ModelLoadError(f"{source}: cannot parse as ONNX (truncated or not an ONNX file): {err}") from err
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{source}: cannot parse as ONNX: no graph (truncated or not an ONNX file)")
    return proto


_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def graph_inputs(proto: onnx.ModelProto) -> list:
    """Real inputs (not initializers) as ``(name, dims, dtype)``; a dynamic dim is its name or None."""
    inits = {t.name for t in proto.graph.initializer}
    result = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        result.append((vi.name, dims, _ONNX_DTYPES.get(tt.elem_type, f"onnx-type-{tt.elem_type}")))
    return result


def fix_input_shapes(proto: onnx.ModelProto, input_shapes: dict | None, source: str) -> list:
    """Write the static shapes into the graph inputs; every dim must end up known."""
    input_shapes = dict(input_shapes or {})
    inputs = graph_inputs(proto)
    names = [n for n, _, _ in inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise DynamicShapeError(f"{source}: input_shapes names unknown inputs {unknown}; the model's inputs are {names}")
    fixed = []
    for vi, (name, dims, dtype) in zip([v for v in proto.graph.input if v.name in names], inputs):
        if name in input_shapes:
            shape = tuple(int(d) for d in input_shapes[name])
            if len(shape) != len(dims) and dims:
                raise DynamicShapeError(f"{source}: input_shapes[{name!r}]={shape} has rank {len(shape)}, "
                                        f"the model input has rank {len(dims)} ({dims})")
            for d_model, d_user in zip(dims, shape):
                if isinstance(d_model, int) and d_model != d_user:
                    raise DynamicShapeError(f"{source}: input_shapes[{name!r}]={shape} contradicts the static dims {dims} "
                                            "of the model")
            if any(d <= 0 for d in shape):
                raise DynamicShapeError(f"{source}: input_shapes[{name!r}]={shape} must be positive")
        else:
            dynamic = [d for d in dims if not isinstance(d, int)]
            if dynamic or not dims and not vi.type.tensor_type.HasField("shape"):
                raise DynamicShapeError(
                    f"{source}: input {name!r} has dynamic dims {dims}; pass input_shapes={{{name!r}: (...)}} "
                    "with a static shape"
                )
            shape = tuple(dims)
        del vi.type.tensor_type.shape.dim[:]
        for d in shape:
            vi.type.tensor_type.shape.dim.add().dim_value = d
        fixed.append((name, shape, dtype))
    # Stale intermediate shapes (with symbolic dims) would contradict the new inputs.
    del proto.graph.value_info[:]
    return fixed


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def simplify(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Upgrade old opsets and fold shape subgraphs and constants (onnxsim); best effort, warns on failure."""
    if _opset(proto) < MIN_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, TARGET_OPSET)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"{source}: could not convert opset {_opset(proto)} to {TARGET_OPSET} ({err}); importing as is")
    simplified, why = onnxsim_worker.simplify(proto)
    if simplified is not None:
        return simplified
    warnings.warn(f"{source}: {why}; importing the unsimplified model")
    return onnx.shape_inference.infer_shapes(proto) if proto.ByteSize() <= onnxsim_worker.MAX_BYTES else proto


#: Ops TVM's importer lacks that ``onnx_rewrite`` can rewrite (checked again after the rewrite).
REWRITTEN_OPS = {"LSTM", "GRU", "RNN"}


def importable_ops(allow=()) -> set:
    """The ONNX ops TVM's importer converts (plus ``If``, inlined or imported, and ``allow``)."""
    return set(_get_convert_map()) | {"If", "Constant"} | set(allow)


def unsupported_nodes(proto: onnx.ModelProto, allow=()) -> list:
    """``[(node name, op)]`` of the top-level nodes TVM's importer cannot convert, in graph order."""
    known = importable_ops(allow)
    return [(n.name or f"#{i}", n.op_type) for i, n in enumerate(proto.graph.node) if n.op_type not in known]


def check_supported_ops(proto: onnx.ModelProto, source: str, allow=(), notes: dict | None = None) -> None:
    """Fail early, naming nodes, when TVM's ONNX importer has no converter for an op.

    ``allow``: ops accepted for now (rewritten later); ``notes``: {node name: why it was not rewritten}.
    """

    notes = notes or {}
    bad = unsupported_nodes(proto, allow)
    if bad:
        listed = ", ".join(f"{name} ({op}{': not unrolled: ' + notes[name] if name in notes else ''})"
                           for name, op in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        ops = sorted({op for _, op in bad})
        raise UnsupportedModelError(f"{source}: TVM's ONNX importer does not support op(s) {ops}: nodes {listed}{more}")


def rewrite(proto: onnx.ModelProto, source: str, use_onnxsim: bool = True) -> tuple[onnx.ModelProto, dict]:
    """The ``onnx_rewrite`` passes real exports need: fold constants, inline ``If`` nodes whose
    condition is constant, unroll ``LSTM`` / ``GRU`` / ``RNN`` (TVM has no converter), then 1-D convs
    as 2-D convs (so PSB can convert them). Returns ``(model, {recurrent node: why it was not unrolled})``.
    Warns when linear layers remain inside ``If`` branches (they stay float and are not listed).
    """

    left: dict = {}
    for _ in range(8):
        proto, folded = rw.fold_constants(proto)
        proto, inlined = rw.inline_constant_ifs(proto)
        proto, unrolled, left = rw.unroll_recurrent(proto)
        if not (folded or inlined or unrolled):
            break
        if use_onnxsim and (inlined or unrolled):
            proto = simplify(proto, source)
    proto, _ = rw.conv1d_as_conv2d(proto)
    hidden = sum(rw.count_ops(a.g, op) for n in proto.graph.node if n.op_type == "If"
                 for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for op in ("Conv", "Gemm", "MatMul"))
    if hidden:
        warnings.warn(f"{source}: {hidden} Conv/Gemm/MatMul node(s) sit inside If branches whose condition is not a "
                      "constant; they stay float and are not listed as layers (bind the inputs the condition depends "
                      "on, e.g. with psb_tvm.onnx_rewrite.bind_inputs, to inline the branch)")
    return proto, left


def _conv_rank(node, consts) -> int | None:
    """Spatial rank of a Conv/ConvTranspose node, from its constant weight or ``kernel_shape``."""
    t = consts.get(node.input[1]) if len(node.input) > 1 else None
    if t is not None:
        return len(t.dims) - 2
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return len(attr.ints)
    return None


def linear_layer_names(proto: onnx.ModelProto, original: onnx.ModelProto | None = None) -> dict:
    """ONNX node names of the layers that import as linear Relax ops, per op kind, in graph order.

    Kinds match ``passes.select_psb_layers.LINEAR_OPS`` ("conv2d", "dense", "conv2d_transpose", ...).
    ``original`` is the model before ``simplify``: onnxsim fuses and renames some nodes (MatMul "fc"
    + Add becomes a Gemm "Gemm_0"); such a node keeps the name of the one original node that used
    the same weight, so layer names stay the ones the user sees in their model.
    """
    kept, by_weight = set(), {}
    if original is not None:
        kept = {n.name for n in original.graph.node}
        users: dict = {}
        for n in original.graph.node:
            for inp in n.input:
                users[inp] = users.get(inp, 0) + 1
        for n in original.graph.node:
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.name and users[n.input[1]] == 1:
                by_weight[n.input[1]] = n.name
    names: dict = {}
    for i, node, kind in _linear_nodes(proto):
        name = node.name or f"{node.op_type}_{i}"
        if name not in kept and len(node.input) > 1 and node.input[1] in by_weight:
            name = by_weight[node.input[1]]
        names.setdefault(kind, []).append(name)
    return names


def linear_layer_inputs(proto: onnx.ModelProto) -> dict:
    """The data input tensor of each linear node, per op kind in graph order (as ``linear_layer_names``);
    ``None`` where the data operand is a constant (not an activation)."""
    consts = {t.name for t in proto.graph.initializer}
    out: dict = {}
    for _, node, kind in _linear_nodes(proto):
        out.setdefault(kind, []).append(node.input[0] if node.input[0] not in consts else None)
    return out


def _linear_nodes(proto: onnx.ModelProto):
    """``(index, node, kind)`` of the nodes that import as linear Relax ops, in graph order."""
    consts = {t.name: t for t in proto.graph.initializer}
    for i, node in enumerate(proto.graph.node):
        kind = None
        if node.op_type in ("Conv", "ConvTranspose"):
            rank = _conv_rank(node, consts)
            if rank is not None:
                kind = f"conv{rank}d" + ("_transpose" if node.op_type == "ConvTranspose" else "")
        elif node.op_type in ("Gemm", "MatMul"):
            kind = "dense"
        if kind:
            yield i, node, kind


def to_relax(proto: onnx.ModelProto, inputs: list, source: str):
    """Import with TVM and normalise: fold batch norm into convs, decompose the rest, fold constants."""
    shape_dict = {name: list(shape) for name, shape, _ in inputs}
    dtype_dict = {name: dtype for name, _, dtype in inputs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = tvm.relax.frontend.onnx.from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict,
                                                    sanitize_input_names=False)
    except Exception as err:  # noqa: BLE001 - the importer raises anything from KeyError to TVMError
        msg = str(err).strip().splitlines()
        raise UnsupportedModelError(
            f"{source}: TVM's ONNX importer failed: {type(err).__name__}: {msg[-1] if msg else ''}"
        ) from err
    mod = tvm.transform.Sequential(import_passes(), name="psb_import")(mod)
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in shape.values):
            raise DynamicShapeError(f"{source}: input {param.name!r} still has a dynamic shape after import")
    return mod


def import_onnx(model, input_shapes: dict | None = None, use_onnxsim: bool = True) -> ImportedModel:
    """The whole frontend: a path/bytes/ModelProto to an ``ImportedModel`` with static shapes.

    After onnxsim, :func:`rewrite` inlines constant Ifs, unrolls LSTM/GRU/RNN nodes and turns 1-D convs into 2-D.

    ``use_onnxsim=False`` skips onnxsim (the path taken when it fails): batch norms are then
    folded by the Relax passes and the PSB layer selection instead.
    """
    proto, source = load_onnx(model)
    inputs = fix_input_shapes(proto, input_shapes, source)
    check_supported_ops(proto, source, allow=REWRITTEN_OPS)
    original = proto
    if use_onnxsim:
        proto = simplify(proto, source)
    proto, left = rewrite(proto, source, use_onnxsim)
    check_supported_ops(proto, source, notes=left)
    mod = to_relax(proto, inputs, source)
    return ImportedModel(
        mod=mod,
        source=source,
        inputs=inputs,
        output_names=[o.name for o in proto.graph.output],
        layer_names=linear_layer_names(proto, original),
        proto=proto,
        layer_inputs=linear_layer_inputs(proto),
    )


def from_relax(mod: tvm.IRModule, source: str = "<relax module>") -> ImportedModel:
    """An ``ImportedModel`` of a Relax module you imported (and normalised) yourself, e.g. with
    ``relax.frontend.onnx.from_onnx`` and ``pipeline.import_passes()``: inputs from ``main``'s
    parameters (static shapes required); layers get positional names (``conv2d_0``, ``dense_1``)."""
    if not isinstance(mod, tvm.IRModule) or "main" not in [gv.name_hint for gv in mod.functions]:
        raise UnsupportedModelError(f"{source}: expected a tvm.IRModule with a Relax function 'main'")
    inputs = []
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in shape.values):
            raise DynamicShapeError(f"{source}: input {param.name!r} has a dynamic or unknown shape; "
                                    "give the importer static shapes (shape_dict)")
        inputs.append((param.name, tuple(int(d) for d in shape.values), str(param.ty.dtype)))
    return ImportedModel(mod=mod, source=source, inputs=inputs, output_names=[], layer_names={})
