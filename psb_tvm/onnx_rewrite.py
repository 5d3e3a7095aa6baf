"""Small ONNX graph rewrites that make real exports importable by TVM's Relax ONNX frontend.

* :func:`bind_inputs`: turn graph inputs into constants (e.g. silero's sample rate ``sr``).
* :func:`set_input_shapes`: write static input shapes.
* :func:`inline_constant_ifs`: replace each ``If`` whose condition is a constant by the nodes of
  the branch it takes (exporters guard code paths on shapes and on flags such as the sample rate;
  once those are fixed the conditions fold to constants, and TVM can then see the convs inside).
* :func:`unroll_lstms`: rewrite peephole-free ``LSTM`` nodes (forward, reverse, bidirectional) with a static
  sequence length (TVM 0.27's ONNX importer has no LSTM) into per-step MatMul, Add, Sigmoid, Tanh
  and Mul nodes; the input and recurrent MatMuls have constant weights, so they are linear layers.
* :func:`make_static`: fold with onnxsim and apply the two rewrites above until nothing changes.

Each function takes and returns an ``onnx.ModelProto`` (a modified copy) and leaves what it
cannot handle in place; what is left is reported by the caller (the frontend names the ops).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import onnxsim_worker

_FLOAT = onnx.TensorProto.FLOAT


def bind_inputs(proto: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """Replace the graph inputs named in ``values`` ({name: array}) by initializers of those values."""
    proto = copy.deepcopy(proto)
    names = {i.name for i in proto.graph.input}
    missing = sorted(set(values) - names)
    if missing:
        raise ValueError(f"bind_inputs: the model has no input(s) {missing}; its inputs are {sorted(names)}")
    keep = [i for i in proto.graph.input if i.name not in values]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    for name, value in values.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return proto


def set_input_shapes(proto: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """Write static ``shapes`` ({input name: tuple}) into the graph inputs; drop stale value_info."""
    proto = copy.deepcopy(proto)
    for vi in proto.graph.input:
        if vi.name in shapes:
            del vi.type.tensor_type.shape.dim[:]
            for d in shapes[vi.name]:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    del proto.graph.value_info[:]
    return proto


# ---------------------------------------------------------------------------- If
def _constants(graph: onnx.GraphProto, outer: dict) -> dict:
    """Name -> numpy value of the initializers and Constant-node outputs visible in ``graph``."""
    consts = dict(outer)
    for t in graph.initializer:
        consts[t.name] = numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    return consts


def _inline_graph(graph: onnx.GraphProto, outer: dict) -> int:
    """Inline constant-condition Ifs of ``graph`` (recursing into subgraphs); returns the count."""
    count = 0
    changed = True
    while changed:
        changed = False
        consts = _constants(graph, outer)
        for pos, node in enumerate(graph.node):
            if node.op_type != "If" or node.input[0] not in consts:
                continue
            cond = np.asarray(consts[node.input[0]])
            if cond.size != 1:
                continue
            branch_name = "then_branch" if bool(cond.reshape(())) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == branch_name)
            new = list(branch.node)
            graph.initializer.extend(branch.initializer)
            for src, dst in zip(branch.output, node.output):
                if dst:
                    new.append(helper.make_node("Identity", [src.name], [dst], name=f"{node.name}/out_{dst}"))
            del graph.node[pos]
            for i, n in enumerate(new):
                graph.node.insert(pos + i, n)
            count += 1
            changed = True
            break
    consts = _constants(graph, outer)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                count += _inline_graph(a.g, consts)
            for g in a.graphs:
                count += _inline_graph(g, consts)
    return count


def inline_constant_ifs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace every ``If`` whose condition is a constant by the nodes of the branch it takes.

    The branch's outputs are connected to the If's outputs with Identity nodes and its
    initializers move to the enclosing graph. Returns ``(model, number of Ifs inlined)``.
    """
    proto = copy.deepcopy(proto)
    count = _inline_graph(proto.graph, {})
    return proto, count


# ---------------------------------------------------------------------------- LSTM
def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _direction(node) -> str:
    d = _attr(node, "direction", b"forward") or b"forward"
    return d.decode() if isinstance(d, bytes) else d


def lstm_unroll_problem(node, consts: dict, shapes: dict) -> str:
    """Why ``node`` (an LSTM) cannot be unrolled, or "" when it can."""
    ins = list(node.input) + [""] * (8 - len(node.input))
    if _direction(node) not in ("forward", "reverse", "bidirectional"):
        return f"direction {_direction(node)!r}"
    if _attr(node, "layout", 0):
        return "layout=1 (only 0)"
    if _attr(node, "clip") is not None or _attr(node, "input_forget", 0):
        return "clip / input_forget"
    acts = [a.decode() if isinstance(a, bytes) else a for a in (_attr(node, "activations") or [])]
    if acts and acts != ["Sigmoid", "Tanh", "Tanh"]:
        return f"activations {acts}"
    if ins[1] not in consts or ins[2] not in consts or (ins[3] and ins[3] not in consts):
        return "W, R or B is not a constant"
    if ins[7]:
        return "peephole weights P"
    x_shape = shapes.get(ins[0])
    if x_shape is None or any(not isinstance(d, int) or d <= 0 for d in x_shape) or len(x_shape) != 3:
        return f"input X has no static shape ({x_shape})"
    if ins[4] and ins[4] in consts and not np.all(consts[ins[4]] == x_shape[0]):
        return "sequence_lens shorter than the sequence"
    if ins[4] and ins[4] not in consts:
        return "sequence_lens is not a constant"
    return ""


def static_shapes(proto: onnx.ModelProto) -> dict:
    """Tensor name -> shape (``None`` for an unknown dimension) where shape inference or the
    initializers tell it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001
        inferred = proto
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if not vi.type.tensor_type.HasField("shape"):  # unknown rank, not a scalar
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _unroll(node, consts: dict, shapes: dict, add_init) -> list:
    """Per-step nodes of an LSTM, every direction (``reverse`` runs the steps from the last; its
    outputs stay at their time positions): ``Y`` [T, directions, B, H], ``Y_h`` and ``Y_c``
    [directions, B, H], as the ONNX spec (layout 0)."""
    ins = list(node.input) + [""] * (8 - len(node.input))
    outs = list(node.output) + [""] * (3 - len(node.output))
    T, B, _ = shapes[ins[0]]
    directions = ["forward", "reverse"] if _direction(node) == "bidirectional" else [_direction(node)]
    H = consts[ins[2]].shape[2]
    p = (node.name or "lstm").replace("/", "_")
    shape_bh = add_init(f"{p}_shape_bh", np.array([B, H], np.int64))
    shape_y = add_init(f"{p}_shape_y", np.array([1, 1, B, H], np.int64))
    shape_last = add_init(f"{p}_shape_last", np.array([1, B, H], np.int64))
    gate_bounds = [add_init(f"{p}_g{i}", np.array([i * H], np.int64)) for i in range(5)]
    axis1 = add_init(f"{p}_axis1", np.array([1], np.int64))
    zeros = add_init(f"{p}_zeros", np.zeros((B, H), np.float32))
    steps = [add_init(f"{p}_t{t}", np.array(t, np.int64)) for t in range(T)]
    nodes = []

    def mk(op, inputs, name, **attrs):
        out = f"{p}/{name}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{node.name}/{name}", **attrs))
        return out

    ys, last_h, last_c = [], [], []
    for d, direction in enumerate(directions):
        # the first direction keeps the unsuffixed names (Gemm_W_<t>, MatMul_R_<t>): layer names
        # of forward LSTMs do not change
        sfx = "" if d == 0 else "_reverse"
        W, R = consts[ins[1]][d], consts[ins[2]][d]  # [4H, I], [4H, H]
        bias = consts[ins[3]][d] if ins[3] else np.zeros(8 * H, np.float32)
        w_t = add_init(f"{p}_W_T{sfx}", np.ascontiguousarray(W.T).astype(np.float32))
        r_t = add_init(f"{p}_R_T{sfx}", np.ascontiguousarray(R.T).astype(np.float32))
        b_n = add_init(f"{p}_B{sfx}", (bias[:4 * H] + bias[4 * H:]).astype(np.float32))
        dir_idx = add_init(f"{p}_dir{d}", np.array(d, np.int64))
        h = mk("Reshape", [mk("Gather", [ins[5], dir_idx], f"h0_all{sfx}", axis=0), shape_bh], f"h0{sfx}") if ins[5] \
            else zeros
        c = mk("Reshape", [mk("Gather", [ins[6], dir_idx], f"c0_all{sfx}", axis=0), shape_bh], f"c0{sfx}") if ins[6] \
            else zeros
        y_dir = [None] * T
        order = range(T) if direction == "forward" else range(T - 1, -1, -1)
        for k, t in enumerate(order):  # k: step number (names), t: time position
            x_t = mk("Gather", [ins[0], steps[t]], f"x{t}{sfx}", axis=0)
            g = mk("Gemm", [x_t, w_t, b_n], f"Gemm_W_{k}{sfx}")
            g = mk("Add", [g, mk("MatMul", [h, r_t], f"MatMul_R_{k}{sfx}")], f"gates{k}{sfx}")
            gi, go, gf, gc = (mk("Slice", [g, gate_bounds[j], gate_bounds[j + 1], axis1], f"gate{j}_{k}{sfx}")
                              for j in range(4))
            i_t, o_t, f_t = (mk("Sigmoid", [v], f"{nm}{k}{sfx}") for v, nm in ((gi, "i"), (go, "o"), (gf, "f")))
            c_hat = mk("Tanh", [gc], f"chat{k}{sfx}")
            c = mk("Add", [mk("Mul", [f_t, c], f"fc{k}{sfx}"), mk("Mul", [i_t, c_hat], f"ic{k}{sfx}")], f"c{k + 1}{sfx}")
            h = mk("Mul", [o_t, mk("Tanh", [c], f"tc{k}{sfx}")], f"h{k + 1}{sfx}")
            y_dir[t] = mk("Reshape", [h, shape_y], f"y{t}{sfx}")
        ys.append(y_dir)
        last_h.append(mk("Reshape", [h, shape_last], f"h_last{sfx}"))
        last_c.append(mk("Reshape", [c, shape_last], f"c_last{sfx}"))

    def join(parts, out, name, axis):
        op = helper.make_node("Concat", parts, [out], name=f"{node.name}/{name}", axis=axis) if len(parts) > 1 \
            else helper.make_node("Identity", parts, [out], name=f"{node.name}/{name}")
        nodes.append(op)

    if outs[0]:
        steps_y = []
        for t in range(T):  # [1, directions, B, H] per time position
            parts = [ys[d][t] for d in range(len(directions))]
            if len(parts) == 1:
                steps_y.append(parts[0])
            else:
                steps_y.append(f"{p}/y{t}_dirs")
                join(parts, steps_y[-1], f"y{t}_dirs", axis=1)
        join(steps_y, outs[0], "Y", axis=0)
    if outs[1]:
        join(last_h, outs[1], "Y_h", axis=0)
    if outs[2]:
        join(last_c, outs[2], "Y_c", axis=0)
    return nodes


def unroll_lstms(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int, dict]:
    """Unroll the top-level LSTM nodes that :func:`lstm_unroll_problem` accepts.

    Returns ``(model, number unrolled, {node name: reason} of those left in place)``. The per-step
    linear nodes are named ``<lstm name>/Gemm_W_<t>`` (input weights and both biases) and
    ``<lstm name>/MatMul_R_<t>`` (recurrent weights).
    """
    proto = copy.deepcopy(proto)
    graph = proto.graph
    if not any(n.op_type == "LSTM" for n in graph.node):
        return proto, 0, {}
    consts = _constants(graph, {})
    shapes = static_shapes(proto)
    existing = {t.name for t in graph.initializer}

    def add_init(name, value):
        base, k = name, 0
        while name in existing:
            k += 1
            name = f"{base}_{k}"
        existing.add(name)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    new, done, left = [], 0, {}
    for node in graph.node:
        if node.op_type == "LSTM":
            why = lstm_unroll_problem(node, consts, shapes)
            if not why:
                new.extend(_unroll(node, consts, shapes, add_init))
                done += 1
                continue
            left[node.name or "LSTM"] = why
        new.append(node)
    del graph.node[:]
    graph.node.extend(new)
    return proto, done, left


# ---------------------------------------------------------------------------- Conv1d
def conv1d_as_conv2d(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite each 1-D ``Conv`` with a constant weight as Unsqueeze -> 2-D Conv (height 1) -> Squeeze.

    The 2-D Conv keeps the node's name (so layer names do not change) and its weight becomes
    ``[O, I, 1, K]``. A Relu that is the conv's only consumer moves before the Squeeze, so it can
    still fuse with the conv. Returns ``(model, number rewritten)``.
    """
    proto = copy.deepcopy(proto)
    graph = proto.graph
    consts = _constants(graph, {})
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 13)
    existing = set(consts) | {o for n in graph.node for o in n.output}
    axes_name = None

    def axes_inputs():
        nonlocal axes_name
        if opset < 13:
            return []
        if axes_name is None:
            axes_name = "conv1d_as_conv2d_axes"
            while axes_name in existing:
                axes_name += "_"
            existing.add(axes_name)
            graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), axes_name))
        return [axes_name]

    axes_attr = {} if opset >= 13 else {"axes": [2]}
    new, count, dropped = [], 0, set()
    for node in graph.node:
        if node.op_type == "Relu" and node.output[0] in dropped:
            continue
        w = consts.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None or w.ndim != 3 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            new.append(node)
            continue
        w4 = f"{node.input[1]}_2d"
        if w4 not in existing:
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, :, None, :]), w4))
            existing.add(w4)
        k = list(w.shape[2:])
        pads = list(_attr(node, "pads", [0, 0]))
        attrs = {"kernel_shape": [1] + k, "pads": [0, pads[0], 0, pads[1]],
                 "strides": [1] + list(_attr(node, "strides", [1])), "dilations": [1] + list(_attr(node, "dilations", [1])),
                 "group": _attr(node, "group", 1)}
        base = node.output[0]
        x4 = f"{base}_as2d_in"
        new.append(helper.make_node("Unsqueeze", [node.input[0]] + axes_inputs(), [x4], name=f"{node.name}_unsqueeze",
                                    **axes_attr))
        y4 = f"{base}_as2d"
        new.append(helper.make_node("Conv", [x4, w4] + list(node.input[2:]), [y4], name=node.name, **attrs))
        users = consumers.get(base, [])
        final = base
        if len(users) == 1 and users[0].op_type == "Relu" and base not in outputs:
            relu = users[0]
            new.append(helper.make_node("Relu", [y4], [f"{base}_as2d_relu"], name=relu.name))
            y4, final = f"{base}_as2d_relu", relu.output[0]
            dropped.add(final)
        new.append(helper.make_node("Squeeze", [y4] + axes_inputs(), [final], name=f"{node.name}_squeeze", **axes_attr))
        count += 1
    del graph.node[:]
    graph.node.extend(new)
    del graph.value_info[:]
    return proto, count


# ---------------------------------------------------------------------------- constant folding
_NO_FOLD = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli"}


def fold_constants(proto: onnx.ModelProto, max_elements: int = 1 << 16) -> tuple[onnx.ModelProto, int]:
    """Evaluate top-level nodes whose inputs are all constants (and ``Shape`` / ``Size`` of tensors
    with a static inferred shape) with ``onnx.reference``; their outputs become initializers.

    A fallback for when onnxsim cannot run (it rejects graphs whose subgraphs use outer values
    it has not seen, as exporters' nested Ifs do). Outputs above ``max_elements`` are not folded.
    Returns ``(model, number of nodes folded)``.
    """
    from onnx.reference import ReferenceEvaluator

    proto = copy.deepcopy(proto)
    graph = proto.graph
    consts = _constants(graph, {})
    shapes = static_shapes(proto)
    graph_outputs = {o.name for o in graph.output}
    keep, folded, new_inits = [], 0, []
    for node in graph.node:
        value = None
        static = shapes.get(node.input[0]) if node.input else None
        if node.op_type in ("Shape", "Size") and static is not None and all(isinstance(d, int) and d > 0 for d in static) \
                and not any(a.name in ("start", "end") for a in node.attribute):
            value = [np.array(static, np.int64) if node.op_type == "Shape" else np.array(int(np.prod(static)), np.int64)]
        elif (node.op_type not in _NO_FOLD and node.op_type != "Constant" and node.domain in ("", "ai.onnx")
              and all(not i or i in consts for i in node.input) and node.input
              and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            inputs = [helper.make_tensor_value_info(i, numpy_helper.from_array(np.asarray(consts[i])).data_type, None)
                      for i in node.input if i]
            outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
            single = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                                       opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
            try:
                value = ReferenceEvaluator(single).run(None, {i: np.asarray(consts[i]) for i in node.input if i})
            except Exception:  # noqa: BLE001 - leave whatever the reference cannot evaluate
                value = None
        if value is None or any(np.asarray(v).size > max_elements for v in value) \
                or any(o in graph_outputs for o in node.output):
            keep.append(node)
            continue
        for name, v in zip([o for o in node.output if o], value):
            arr = np.asarray(v)
            consts[name] = arr
            new_inits.append(numpy_helper.from_array(arr, name))
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    return proto, folded


# ---------------------------------------------------------------------------- driver
def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    simplified, _ = onnxsim_worker.simplify(proto)  # best effort, like the frontend
    return proto if simplified is None else simplified


def make_static(proto: onnx.ModelProto, max_rounds: int = 8) -> onnx.ModelProto:
    """onnxsim, then fold constants, inline constant Ifs and unroll LSTMs, until nothing changes."""
    proto = _simplify(proto)
    for _ in range(max_rounds):
        proto, folded = fold_constants(proto)
        proto, inlined = inline_constant_ifs(proto)
        proto, unrolled, _ = unroll_lstms(proto)
        if not inlined and not unrolled and not folded:
            break
        proto = _simplify(proto)
    return proto


def count_ops(proto, op_type: str) -> int:
    """How many ``op_type`` nodes the model (or graph) has, subgraphs included."""

    def walk(g):
        total = 0
        for n in g.node:
            total += n.op_type == op_type
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    total += walk(a.g)
                for sub in a.graphs:
                    total += walk(sub)
        return total

    return walk(proto.graph if isinstance(proto, onnx.ModelProto) else proto)
