"""Legalize a transposed conv whose kernel equals its stride as a direct computation.

With ``kernel == stride`` (no padding, dilation, output padding or groups: the upsampling of
PP-OCR's detector head, 2x2 / 2) every output pixel gets exactly one kernel tap:
``out[b, o, y, x] = sum_c data[b, c, y // s, x // s] * w[c, o, y % s, x % s]``. TOPI's
``conv2d_transpose`` dilates the input with zeros, pads it and runs a direct conv with the
flipped kernel: ``s * s`` products per output and channel, ``s * s - 1`` of them with a zero.
The sum here has the same nonzero terms in the same order (channels ascending), so the result is
the same float32; it runs before TVM's legalization, which then leaves the new ``call_tir`` alone
(``FuseOps`` still fuses the bias and activation after it).
"""

from __future__ import annotations

import tvm
from tvm import relax, te

#: The block name of the direct computation (``schedules/cpu/conv_transpose.py`` looks for it).
BLOCK = "conv2d_transpose_direct"


def _direct(call: relax.Call) -> bool:
    """Whether ``call`` is a 2-D transposed conv this pass computes directly."""
    attrs = call.attrs
    data, weight = call.args
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "IOHW" or attrs.out_layout != "NCHW":
        return False
    w_shape = getattr(weight.ty, "shape", None)
    x_shape = getattr(data.ty, "shape", None)
    if w_shape is None or x_shape is None or not isinstance(w_shape, relax.ShapeExpr):
        return False
    try:
        kh, kw = (int(v) for v in w_shape.values[2:])
        [int(v) for v in x_shape.values]
    except (TypeError, ValueError):  # symbolic shapes
        return False
    return (int(attrs.groups) == 1 and [int(s) for s in attrs.strides] == [kh, kw]
            and all(int(p) == 0 for p in attrs.padding) and all(int(p) == 0 for p in attrs.output_padding)
            and all(int(d) == 1 for d in attrs.dilation))


def _compute(data: te.Tensor, weight: te.Tensor, out_dtype: str) -> te.Tensor:
    N, C, H, W = data.shape
    _, O, KH, KW = weight.shape
    rc = te.reduce_axis((0, C), name="rc")
    return te.compute((N, O, H * KH, W * KW), lambda b, o, y, x: te.sum(
        data[b, rc, y // KH, x // KW].astype(out_dtype) * weight[rc, o, y % KH, x % KW].astype(out_dtype), axis=[rc]),
        name=BLOCK, attrs={"upsample": [int(KH), int(KW)]})


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d_transpose" or not _direct(call):
            return call
        out_dtype = call.ty.dtype
        return self.builder_.call_te(lambda x, w: _compute(x, w, out_dtype), call.args[0], call.args[1],
                                     primfunc_name_hint="conv2d_transpose")


@tvm.transform.module_pass(opt_level=0, name="LegalizeNonOverlappingConvTranspose")
class LegalizeNonOverlappingConvTranspose:
    """Rewrite every Relax function of the module (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        functions = {gv: rewriter.visit_expr(f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        mod = rewriter.builder_.get()
        for gv, func in functions.items():
            mod[gv] = func
        return mod
