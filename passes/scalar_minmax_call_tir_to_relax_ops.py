"""Turn ``call_tir`` of an elementwise max / min with a scalar constant back into ``R.maximum`` /
``R.minimum``.

TVM's ONNX importer emits ``Clip`` (ReLU6 included) as ``call_tir`` of TOPI PrimFuncs. As opaque
calls they hide the activation from layer selection, which then cannot fuse it into the PSB
kernel and leaves a full-tensor pass of float glue per layer. As Relax ops they are recognized.
"""

from __future__ import annotations

import tvm
from tvm import ir, relax, tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import SBlock, SBlockRealize

_OPS = {tirx.Max: relax.op.maximum, tirx.Min: relax.op.minimum}


def _scalar_minmax_op(func):
    """``relax.op.maximum`` / ``minimum`` when ``func(A, c, out)`` computes ``out[i] = max/min(A[i], c[()])``."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    a, c, out = func.params  # buffers are Vars in TVM 0.27's TIR; loads are TensorLoad(source, indices)
    node, blocks = func.body, 0
    while not isinstance(node, tirx.BufferStore):  # a perfect nest: loops and blocks, no sequences
        if isinstance(node, SBlock) and node.name_hint != "root":
            blocks += 1
        if isinstance(node, SBlockRealize):
            node = node.block
        elif isinstance(node, (SBlock, tirx.For)):
            node = node.body
        else:
            return None
    value = node.value
    op = _OPS.get(type(value))
    if blocks != 1 or op is None or not node.buffer.same_as(out):
        return None
    lhs, rhs = value.a, value.b
    if not (isinstance(lhs, TensorLoad) and isinstance(rhs, TensorLoad)):
        return None
    if not (lhs.source.same_as(a) and rhs.source.same_as(c) and len(rhs.indices) == 0):
        return None
    if len(lhs.indices) != len(node.indices) or any(not i.same_as(j) for i, j in zip(lhs.indices, node.indices)):
        return None
    return op


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.call_tir" or not isinstance(call.args[0], tvm.ir.GlobalVar):
            return call
        args = call.args[1]
        if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return call
        x, c = args.fields
        if not isinstance(c, ir.GenericConst) or getattr(x.ty, "dtype", None) != str(c.value.dtype):
            return call
        op = _scalar_minmax_op(self.mod[call.args[0]])
        return call if op is None else op(x, c)


@tvm.transform.module_pass(opt_level=0, name="ScalarMinMaxCallTIRToRelaxOps")
class ScalarMinMaxCallTIRToRelaxOps:
    """Rewrite every Relax function of the module; PrimFuncs left unused are removed by dead-code
    elimination (the import phase runs it next)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewriter.visit_expr(func)
        return mod
