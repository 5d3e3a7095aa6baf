"""``psb_tvm.check``: what a compile of an ONNX model would do, before compiling it.

Every op of the model with how it is handled (imported by TVM's ONNX importer, rewritten by
``onnx_rewrite``: recurrent nodes unrolled, constant ``If`` branches inlined; or unsupported, with
the reason), the dynamic input dimensions still to fix (``input_shapes``), and, once the model
imports, each linear layer with whether it becomes PSB (and why not). Runs the frontend (onnxsim,
the rewrites, TVM's import: seconds) but no calibration and no code generation.
"""

from __future__ import annotations

import collections
import copy
import warnings
from dataclasses import asdict, dataclass, field

from . import checks
from .config import PSBConfig
from .errors import DynamicShapeError, UnsupportedModelError
from .frontend import (
    REWRITTEN_OPS,
    fix_input_shapes,
    graph_inputs,
    importable_ops,
    linear_layer_names,
    load_onnx,
    rewrite,
    simplify,
    to_relax,
    unsupported_nodes,
)
from .passes import find_layer_sites, name_sites, select_layers

IMPORTED, REWRITTEN, UNSUPPORTED = "imported", "rewritten", "unsupported"


@dataclass
class OpUse:
    """One op type of the model: how many nodes, how they are handled, and a note (why not)."""

    op: str
    count: int
    handling: str  # IMPORTED, REWRITTEN or UNSUPPORTED
    note: str = ""


@dataclass
class LayerUse:
    """One linear layer of the imported model and whether it becomes PSB."""

    name: str
    op: str  # "conv2d", "dense", ...
    weight_shape: list
    status: str  # "psb" or "float"
    reason: str = ""


@dataclass
class ModelCheck:
    """The result of :func:`check`. ``ok``: the model compiles as checked (no unsupported op and
    no dynamic dimension left); ``problems`` says what stops it, one line each."""

    source: str
    ops: list = field(default_factory=list)
    dynamic: list = field(default_factory=list)  # [(input, axis, dim name or None)]
    layers: list | None = None  # None when the model does not import (see problems)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"source": self.source, "ok": self.ok, "ops": [asdict(o) for o in self.ops],
                "dynamic": [{"input": i, "axis": a, "dim": d} for i, a, d in self.dynamic],
                "layers": None if self.layers is None else [asdict(l) for l in self.layers],
                "psb_layers": None if self.layers is None else sum(l.status == "psb" for l in self.layers),
                "problems": list(self.problems)}

    def report(self) -> str:
        lines = [f"{self.source}: {'compiles' if self.ok else 'does not compile as is'}", "", "| op | nodes | handling | note |",
                 "|---|---|---|---|"]
        lines += [f"| {o.op} | {o.count} | {o.handling} | {o.note} |" for o in self.ops]
        if self.dynamic:
            lines += ["", "Dynamic input dimensions (fix them with input_shapes / --input-shape):"]
            lines += [f"- {name} axis {axis} ({dim or 'unnamed'})" for name, axis, dim in self.dynamic]
        if self.layers is not None:
            psb = sum(l.status == "psb" for l in self.layers)
            lines += ["", f"Linear layers: {psb} of {len(self.layers)} become PSB", "",
                      "| layer | op | weight shape | status | reason |", "|---|---|---|---|---|"]
            lines += [f"| {l.name} | {l.op} | {'x'.join(map(str, l.weight_shape))} | {l.status} | {l.reason} |"
                      for l in self.layers]
        if self.problems:
            lines += ["", "Problems:"] + [f"- {p}" for p in self.problems]
        return "\n".join(lines)


def _op_table(proto, notes: dict, rewritten_proto=None) -> list:
    """One :class:`OpUse` per op type of ``proto`` (top level), handling decided on the model after
    the rewrites (``rewritten_proto``) when there is one."""
    known = importable_ops()
    left = {op for _, op in unsupported_nodes(rewritten_proto)} if rewritten_proto is not None else None
    by_op: dict = collections.defaultdict(list)
    for i, node in enumerate(proto.graph.node):
        by_op[node.op_type].append(node.name or f"#{i}")
    rows = []
    for op, names in by_op.items():
        why = "; ".join(f"{n}: {notes[n]}" for n in names if n in notes)
        if op in REWRITTEN_OPS and left is None:
            rows.append(OpUse(op, len(names), REWRITTEN, "to be unrolled once the input shapes are static"))
        elif op in REWRITTEN_OPS:
            if op not in left:
                rows.append(OpUse(op, len(names), REWRITTEN, "unrolled into per-step linear layers"))
            else:
                rows.append(OpUse(op, len(names), UNSUPPORTED, why or "not unrolled"))
        elif op == "If" and left is None:
            rows.append(OpUse(op, len(names), IMPORTED, "inlined where its condition folds to a constant"))
        elif op == "If":
            inlined = not any(n.op_type == "If" for n in rewritten_proto.graph.node)
            rows.append(OpUse(op, len(names), REWRITTEN if inlined else IMPORTED,
                              "constant condition: branch inlined" if inlined else "imported as a Relax If"))
        elif op in known:
            rows.append(OpUse(op, len(names), IMPORTED))
        else:
            rows.append(OpUse(op, len(names), UNSUPPORTED, "TVM's ONNX importer has no converter"))
    return sorted(rows, key=lambda r: ({UNSUPPORTED: 0, REWRITTEN: 1, IMPORTED: 2}[r.handling], r.op))


def check(onnx_model, input_shapes: dict | None = None, config: PSBConfig | dict | None = None) -> ModelCheck:
    """What ``psb_tvm.compile(onnx_model, input_shapes=..., config=...)`` would do with the model's
    ops and layers (see the module docstring). A bad file or bad arguments raise as ``compile``
    does; what the model itself lacks is reported in ``ModelCheck.problems``, not raised."""
    input_shapes = checks.check_input_shapes(input_shapes) or {}
    config = PSBConfig.coerce(config)
    proto, source = load_onnx(onnx_model)
    result = ModelCheck(source=source)
    result.dynamic = [(name, axis, d) for name, dims, _ in graph_inputs(proto) if name not in input_shapes
                      for axis, d in enumerate(dims) if not isinstance(d, int)]
    if result.dynamic:
        result.ops = _op_table(proto, {})
        names = sorted({name for name, _, _ in result.dynamic})
        result.problems.append(f"inputs {names} have dynamic dimensions: pass input_shapes (--input-shape NAME=D0,D1,...)"
                               " to list the layers")
        result.problems += [f"op {o.op}: {o.note}" for o in result.ops if o.handling == UNSUPPORTED]
        return result
    work = copy.deepcopy(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxsim's and the rewrites' warnings: the table says it all
        inputs = fix_input_shapes(work, input_shapes, source)
        if not unsupported_nodes(work, REWRITTEN_OPS):
            work = simplify(work, source)
        work, notes = rewrite(work, source)
    result.ops = _op_table(proto, notes, work)
    bad = unsupported_nodes(work)
    if bad:
        result.problems += [f"node {name} ({op}): " + (f"not unrolled: {notes[name]}" if name in notes
                                                        else "TVM's ONNX importer has no converter")
                            for name, op in bad]
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = to_relax(work, inputs, source)
    except (UnsupportedModelError, DynamicShapeError) as err:
        result.problems.append(str(err))
        return result
    sites = find_layer_sites(mod["main"])
    name_sites(sites, linear_layer_names(work, proto))
    reasons = select_layers(sites, config)
    result.layers = [LayerUse(s.name, s.kind, [int(d) for d in s.weight.shape] if s.weight is not None else [],
                              "float" if reasons[s.index] else "psb", reasons[s.index]) for s in sites]
    return result
