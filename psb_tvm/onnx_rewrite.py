"""Small ONNX graph rewrites that make real exports importable by TVM's Relax ONNX frontend.

* :func:`bind_inputs`: turn graph inputs into constants (e.g. silero's sample rate ``sr``).
* :func:`set_input_shapes`: write static input shapes.
* :func:`inline_constant_ifs`: replace each ``If`` whose condition is a constant by the nodes of
  the branch it takes (exporters guard code paths on shapes and on flags such as the sample rate;
  once those are fixed the conditions fold to constants, and TVM can then see the convs inside).
* :func:`unroll_recurrent`: rewrite ``LSTM``, ``GRU`` and ``RNN`` nodes (every direction, layout,
  ``sequence_lens``, initial states, peepholes, clip; activations without alpha/beta) with a static
  sequence length (TVM 0.27's ONNX importer has none of them) into one input-projection Gemm per
  direction and per-step MatMul, Add, Sigmoid, Tanh and Mul nodes; the Gemm and MatMuls have
  constant weights, so they are linear layers.
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


# ---------------------------------------------------------------------------- LSTM, GRU, RNN
#: Gate blocks per recurrent op, in the ONNX weight order (LSTM i, o, f, c; GRU z, r, h; RNN one).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: The activations ONNX uses when ``activations`` is absent (per direction).
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
#: Activations without alpha/beta: each is an ONNX op of the same name.
PLAIN_ACTIVATIONS = ("Sigmoid", "Tanh", "Relu")


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _direction(node) -> str:
    d = _attr(node, "direction", b"forward") or b"forward"
    return d.decode() if isinstance(d, bytes) else d


def _activations(node) -> list:
    """Per direction, the activation op names (the spec's defaults when the attribute is absent)."""
    dirs = 2 if _direction(node) == "bidirectional" else 1
    acts = [a.decode() if isinstance(a, bytes) else a for a in (_attr(node, "activations") or [])]
    per = len(DEFAULT_ACTIVATIONS[node.op_type])
    if not acts:
        return [DEFAULT_ACTIVATIONS[node.op_type]] * dirs
    if len(acts) != per * dirs:
        return [acts]  # reported by recurrent_unroll_problem
    return [acts[d * per:(d + 1) * per] for d in range(dirs)]


def recurrent_unroll_problem(node, consts: dict, shapes: dict) -> str:
    """Why ``node`` (an LSTM, GRU or RNN) cannot be unrolled, or "" when it can."""
    op = node.op_type
    ins = list(node.input) + [""] * (8 - len(node.input))
    if _direction(node) not in ("forward", "reverse", "bidirectional"):
        return f"direction {_direction(node)!r}"
    layout = _attr(node, "layout", 0)
    if layout not in (0, 1):
        return f"layout={layout}"
    if op == "LSTM" and _attr(node, "input_forget", 0):
        return "input_forget=1 (coupled input and forget gates)"
    per, dirs = len(DEFAULT_ACTIVATIONS[op]), 2 if _direction(node) == "bidirectional" else 1
    raw = [a.decode() if isinstance(a, bytes) else a for a in (_attr(node, "activations") or [])]
    if raw and len(raw) != per * dirs:
        return f"activations {raw}: {per * dirs} expected ({per} per direction)"
    for acts in _activations(node):
        if any(a not in PLAIN_ACTIVATIONS for a in acts):
            return f"activations {acts} (supported: {', '.join(PLAIN_ACTIVATIONS)}; none with alpha/beta)"
    if _attr(node, "activation_alpha") or _attr(node, "activation_beta"):
        return "activation_alpha / activation_beta"
    if ins[1] not in consts or ins[2] not in consts or (ins[3] and ins[3] not in consts):
        return "W, R or B is not a constant"
    if op == "LSTM" and ins[7] and ins[7] not in consts:
        return "peephole weights P are not a constant"
    x_shape = shapes.get(ins[0])
    if x_shape is None or len(x_shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in x_shape):
        return f"input X has no static shape ({x_shape}; fix it with input_shapes)"
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


class _Emitter:
    """Nodes and constants of one unrolled recurrent node, named ``<node>/<what>``."""

    def __init__(self, node, add_init):
        self.node, self.add_init, self.nodes = node, add_init, []
        self.prefix = (node.name or node.op_type.lower()).replace("/", "_")

    def const(self, name, value):
        return self.add_init(f"{self.prefix}_{name}", value)

    def __call__(self, op, inputs, name, **attrs):
        out = f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.node.name}/{name}", **attrs))
        return out

    def to(self, op, inputs, out, name, **attrs):
        """A node writing the original node's output ``out``."""
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.node.name}/{name}", **attrs))


def _unroll(node, consts: dict, shapes: dict, add_init) -> list:
    """Per-step nodes of an LSTM, GRU or RNN, every direction.

    Per direction, the input projection of all steps is one ``Gemm`` (``<node>/Gemm_W``) on the
    ``[T*B, I]`` input, with the biases that add outside the recurrence; each step then adds its
    recurrent product (``<node>/MatMul_R_<k>``; a GRU without ``linear_before_reset`` has its
    candidate's product on ``r * h`` apart, ``MatMul_Rh_<k>``). The backward direction carries
    ``_reverse`` and runs from the last step; outputs stay at their time positions.
    ``sequence_lens`` (constant or not) masks the steps past each sequence's length: its state is
    held and its outputs are zero, as the spec says. ``layout=1`` is transposed at the edges.
    """
    op, emit = node.op_type, _Emitter(node, add_init)
    ins = list(node.input) + [""] * (8 - len(node.input))
    outs = list(node.output) + [""] * (3 - len(node.output))
    layout = _attr(node, "layout", 0)
    x_shape = shapes[ins[0]]
    T, B = (x_shape[1], x_shape[0]) if layout else (x_shape[0], x_shape[1])
    I = x_shape[2]
    G = RECURRENT_GATES[op]
    H = consts[ins[2]].shape[2]
    clip = _attr(node, "clip")
    lbr = op == "GRU" and bool(_attr(node, "linear_before_reset", 0))
    directions = ["forward", "reverse"] if _direction(node) == "bidirectional" else [_direction(node)]
    activations = _activations(node)
    x = emit("Transpose", [ins[0]], "x_time_major", perm=[1, 0, 2]) if layout else ins[0]
    initial = {}
    for k, idx in (("h", 5), ("c", 6)):
        if ins[idx] and (op == "LSTM" or k == "h"):
            initial[k] = emit("Transpose", [ins[idx]], f"{k}0_dir_major", perm=[1, 0, 2]) if layout else ins[idx]
    x2d = emit("Reshape", [x, emit.const("shape_tb_i", np.array([T * B, I], np.int64))], "x_2d")
    shape_bh = emit.const("shape_bh", np.array([B, H], np.int64))
    shape_y = emit.const("shape_y", np.array([T, 1, B, H], np.int64))
    shape_last = emit.const("shape_last", np.array([1, B, H], np.int64))
    bounds = [emit.const(f"g{i}", np.array([i * H], np.int64)) for i in range(G + 1)]
    axis1 = emit.const("axis1", np.array([1], np.int64))
    zeros = emit.const("zeros", np.zeros((B, H), np.float32))
    ones = emit.const("one", np.ones((), np.float32)) if op == "GRU" else None
    # steps are Slices, not Gathers: TVM logs a warning per Gather it imports (topi take, fast mode);
    # the input projection stays [T*B, G*H]: step t is rows t*B .. (t+1)*B, one Slice
    rows = [emit.const(f"row{t}", np.array([t * B], np.int64)) for t in range(T + 1)]
    axis0 = emit.const("axis0", np.array([0], np.int64))
    masks = [None] * T
    if ins[4]:  # sequence_lens [B]: step t counts for batch b when t < lens[b]
        lens = emit("Cast", [ins[4]], "lens", to=onnx.TensorProto.INT64)
        for t in range(T):
            less = emit("Less", [emit.const(f"t{t}", np.array(t, np.int64)), lens], f"valid{t}")
            masks[t] = emit("Unsqueeze", [emit("Cast", [less], f"valid{t}_f", to=_FLOAT),
                                          emit.const("axes1", np.array([1], np.int64))], f"mask{t}")

    def act(name, value, out):
        if clip is not None:
            value = emit("Clip", [value, emit.const(f"clip_lo_{out}", np.array(-clip, np.float32)),
                                  emit.const(f"clip_hi_{out}", np.array(clip, np.float32))], f"clip_{out}")
        return emit(name, [value], out)

    def gate(v, j, name, last=None):
        """Gate block ``j`` (to ``last``, default ``j``) of ``v`` [B, G*H]."""
        return emit("Slice", [v, bounds[j], bounds[(j if last is None else last) + 1], axis1], name)

    def split(v, parts, name):
        """``v`` [B, parts*H] as ``parts`` [B, H] blocks: one Split node (equal parts, every opset)."""
        outs = [f"{emit.prefix}/{name}_{j}" for j in range(parts)]
        emit.nodes.append(helper.make_node("Split", [v], outs, name=f"{node.name}/{name}", axis=1))
        return outs

    def held(new, prev, mask, name):  # new where the step counts, prev where it is past the sequence
        return new if mask is None else emit("Add", [prev, emit("Mul", [mask, emit("Sub", [new, prev], f"d{name}")],
                                                                f"md{name}")], name)

    # Per step and direction the ONNX nodes are few (LSTM: 12): TVM imports, legalizes and schedules
    # each of them in every Relax function of the module (measured: 40 steps of a bidirectional
    # LSTM, ~10k legalized ops, most of a 17 s compile with warm kernels).
    ys, last = [], {"h": [], "c": []}
    for d, direction in enumerate(directions):
        # the first direction keeps the unsuffixed names (layer names of forward nodes do not change)
        sfx = "" if d == 0 else "_reverse"
        f, g, h_act = (activations[d] + [None, None])[:3]
        W, R = consts[ins[1]][d].astype(np.float32), consts[ins[2]][d].astype(np.float32)  # [G*H, I], [G*H, H]
        bias = consts[ins[3]][d].astype(np.float32) if ins[3] else np.zeros(2 * G * H, np.float32)
        wb, rb = bias[:G * H], bias[G * H:]
        x_bias = wb + rb
        if op == "GRU" and lbr:  # the candidate's recurrent bias sits inside r * (h R_h + Rb_h)
            x_bias = np.concatenate([wb[:2 * H] + rb[:2 * H], wb[2 * H:]])
        xp = emit("Gemm", [x2d, emit.const(f"W_T{sfx}", np.ascontiguousarray(W.T)), emit.const(f"B_x{sfx}", x_bias)],
                  f"Gemm_W{sfx}")
        if op == "GRU" and not lbr:
            r_zr = emit.const(f"R_zr_T{sfx}", np.ascontiguousarray(R[:2 * H].T))
            r_h = emit.const(f"R_h_T{sfx}", np.ascontiguousarray(R[2 * H:].T))
        else:
            r_t = emit.const(f"R_T{sfx}", np.ascontiguousarray(R.T))
            if lbr:
                rb_h = emit.const(f"Rb_h{sfx}", np.concatenate([np.zeros(2 * H, np.float32), rb[2 * H:]]))
        if op == "LSTM" and ins[7]:
            p_i, p_o, p_f = (emit.const(f"P{j}{sfx}", consts[ins[7]][d][j * H:(j + 1) * H].astype(np.float32))
                             for j in range(3))
        dir_idx, dir_end = (emit.const(f"dir{d}_{e}", np.array([d + e], np.int64)) for e in (0, 1))
        state = {}
        for k in ("h", "c"):
            if k in initial:
                state[k] = emit("Reshape", [emit("Slice", [initial[k], dir_idx, dir_end, axis0], f"{k}0_all{sfx}"),
                                            shape_bh], f"{k}0{sfx}")
            else:
                state[k] = zeros
        y_dir = [None] * T
        order = range(T) if direction == "forward" else range(T - 1, -1, -1)
        for k, t in enumerate(order):  # k: step number (names), t: time position
            x_t = emit("Slice", [xp, rows[t], rows[t + 1], axis0], f"x{t}{sfx}")
            h_prev, c_prev, m = state["h"], state["c"], masks[t]
            if op == "LSTM":
                gates = emit("Add", [x_t, emit("MatMul", [h_prev, r_t], f"MatMul_R_{k}{sfx}")], f"gates{k}{sfx}")
                gc = gate(gates, 3, f"gate3_{k}{sfx}")
                if ins[7]:  # peepholes: i and f see c_prev, o sees c_new (after it)
                    gi, go, gf = (gate(gates, j, f"gate{j}_{k}{sfx}") for j in range(3))
                    gi = emit("Add", [gi, emit("Mul", [p_i, c_prev], f"pi{k}{sfx}")], f"gi{k}{sfx}")
                    gf = emit("Add", [gf, emit("Mul", [p_f, c_prev], f"pf{k}{sfx}")], f"gf{k}{sfx}")
                    i_t, f_t = act(f, gi, f"i{k}{sfx}"), act(f, gf, f"f{k}{sfx}")
                else:  # i, o, f are contiguous: one activation, one Split
                    i_t, o_t, f_t = split(act(f, gate(gates, 0, f"iof_pre{k}{sfx}", 2), f"iof{k}{sfx}"), 3, f"iof_split{k}{sfx}")
                c_new = emit("Add", [emit("Mul", [f_t, c_prev], f"fc{k}{sfx}"),
                                     emit("Mul", [i_t, act(g, gc, f"chat{k}{sfx}")], f"ic{k}{sfx}")], f"c_new{k}{sfx}")
                if ins[7]:
                    go = emit("Add", [go, emit("Mul", [p_o, c_new], f"po{k}{sfx}")], f"go{k}{sfx}")
                    o_t = act(f, go, f"o{k}{sfx}")
                h_new = emit("Mul", [o_t, emit(h_act, [c_new], f"tc{k}{sfx}")], f"h_new{k}{sfx}")
                state["c"] = held(c_new, c_prev, m, f"c{k + 1}{sfx}")
            elif op == "GRU":
                if lbr:
                    rec = emit("Add", [emit("MatMul", [h_prev, r_t], f"MatMul_R_{k}{sfx}"), rb_h], f"rec{k}{sfx}")
                    zr = emit("Add", [gate(x_t, 0, f"xzr{k}{sfx}", 1), gate(rec, 0, f"rzr{k}{sfx}", 1)], f"zrpre{k}{sfx}")
                    z_t, r_t_ = split(act(f, zr, f"zr{k}{sfx}"), 2, f"zr_split{k}{sfx}")
                    cand = emit("Add", [gate(x_t, 2, f"xh{k}{sfx}"),
                                        emit("Mul", [r_t_, gate(rec, 2, f"rh{k}{sfx}")], f"rrh{k}{sfx}")], f"hpre{k}{sfx}")
                else:
                    rec = emit("MatMul", [h_prev, r_zr], f"MatMul_R_{k}{sfx}")
                    zr = emit("Add", [gate(x_t, 0, f"xzr{k}{sfx}", 1), rec], f"zrpre{k}{sfx}")
                    z_t, r_t_ = split(act(f, zr, f"zr{k}{sfx}"), 2, f"zr_split{k}{sfx}")
                    rh = emit("MatMul", [emit("Mul", [r_t_, h_prev], f"rhp{k}{sfx}"), r_h], f"MatMul_Rh_{k}{sfx}")
                    cand = emit("Add", [gate(x_t, 2, f"xh{k}{sfx}"), rh], f"hpre{k}{sfx}")
                hh = act(g, cand, f"hh{k}{sfx}")
                # (1 - z) * hh + z * h_prev
                h_new = emit("Add", [emit("Mul", [emit("Sub", [ones, z_t], f"omz{k}{sfx}"), hh], f"zhh{k}{sfx}"),
                                     emit("Mul", [z_t, h_prev], f"zh{k}{sfx}")], f"h_new{k}{sfx}")
            else:
                pre = emit("Add", [x_t, emit("MatMul", [h_prev, r_t], f"MatMul_R_{k}{sfx}")], f"pre{k}{sfx}")
                h_new = act(f, pre, f"h_new{k}{sfx}")
            state["h"] = held(h_new, h_prev, m, f"h{k + 1}{sfx}")
            y_dir[t] = h_new if m is None else emit("Mul", [h_new, m], f"y_masked{t}{sfx}")
        if outs[0]:  # [T, 1, B, H]: the steps in time order, one Concat and one Reshape
            joined = emit("Concat", y_dir, f"y_steps{sfx}", axis=0) if T > 1 else y_dir[0]
            ys.append(emit("Reshape", [joined, shape_y], f"y{sfx}"))
        for k in last:
            final = state[k]
            if masks[0] is not None:  # a sequence of length 0 ends in zeros, as ONNX Runtime gives
                final = emit("Mul", [final, masks[0]], f"{k}_final{sfx}")
            last[k].append(emit("Reshape", [final, shape_last], f"{k}_last{sfx}"))

    def join(parts, out, name, axis, perm=None):
        """Concatenate ``parts`` on ``axis`` into ``out`` (transposed by ``perm`` for layout 1)."""
        target = f"{emit.prefix}/{name}_time_major" if perm else out
        if len(parts) > 1:
            emit.to("Concat", parts, target, name, axis=axis)
        else:
            emit.to("Identity", parts, target, name)
        if perm:
            emit.to("Transpose", [target], out, f"{name}_layout1", perm=perm)

    if outs[0]:
        join(ys, outs[0], "Y", 1, [2, 0, 1, 3] if layout else None)  # directions on axis 1
    if outs[1]:
        join(last["h"], outs[1], "Y_h", 0, [1, 0, 2] if layout else None)
    if op == "LSTM" and outs[2]:
        join(last["c"], outs[2], "Y_c", 0, [1, 0, 2] if layout else None)
    return emit.nodes


def unroll_recurrent(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int, dict]:
    """Unroll the top-level ``LSTM``, ``GRU`` and ``RNN`` nodes that :func:`recurrent_unroll_problem`
    accepts (TVM 0.27's ONNX importer has none of them).

    Returns ``(model, number unrolled, {node name: reason} of those left in place)``. The linear
    nodes are ``<node>/Gemm_W`` (all steps' input projection) and ``<node>/MatMul_R_<k>`` per step
    (``MatMul_Rh_<k>`` too for a GRU without ``linear_before_reset``), ``_reverse`` for the
    backward direction.
    """
    proto = copy.deepcopy(proto)
    graph = proto.graph
    if not any(n.op_type in RECURRENT_GATES for n in graph.node):
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
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    new, done, left = [], 0, {}
    for node in graph.node:
        if node.op_type in RECURRENT_GATES:
            why = recurrent_unroll_problem(node, consts, shapes)
            if not why:
                new.extend(_unroll(node, consts, shapes, add_init))
                done += 1
                continue
            left[node.name or node.op_type] = why
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
    """onnxsim, then fold constants, inline constant Ifs and unroll recurrent nodes, until nothing changes."""
    proto = _simplify(proto)
    for _ in range(max_rounds):
        proto, folded = fold_constants(proto)
        proto, inlined = inline_constant_ifs(proto)
        proto, unrolled, _ = unroll_recurrent(proto)
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
