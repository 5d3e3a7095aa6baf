"""Make every PSB kernel check its run-time sample counts against the ``n_max`` it was compiled for.

The kernels are exact only for ``n`` a power of two up to ``n_max``: the accumulator width, the
int8 weights of the int8 preset and the stratified sampler's closed form all assume it. The
Python and C++ front doors check ``n`` against the module's metadata; this pass puts the same
check inside the compiled code, so a caller that drives the functions directly (or metadata that
was edited) gets an error instead of a wrong result. The check is a TIR ``AssertStmt`` at the top
of the kernel (host side), compiled into the library: no runtime registration is needed, unlike
Relax's ``assert_op`` (registered by TVM's Python package only). Cost: two compares per call.
"""

from __future__ import annotations

import tvm
from tvm import ir, tirx
from tvm.s_tir import SBlock, SBlockRealize

from psb_tvm.abi import ATTR_KIND

from .module_copy import with_functions

#: Scalar kernel parameters that are sample counts: ``n`` (a power of two in [1, n_max]) and the
#: sampler's range ends ``lo``, ``hi`` (0 or a power of two <= n_max).
SAMPLE_PARAMS = {"n": False, "lo": True, "hi": True}


def _bound(var: tirx.Var, n_max: int, zero_ok: bool):
    power_of_two = tirx.all(var >= 1, var <= n_max, tirx.bitwise_and(var, var - 1) == 0)
    return tirx.any(var == 0, power_of_two) if zero_ok else power_of_two


def _prepend(body, stmts):
    """``stmts`` first inside the root block (Relax's analyses want a PrimFunc body to stay one
    ``SBlockRealize``)."""
    if not isinstance(body, SBlockRealize):
        return tirx.SeqStmt(stmts + [body])
    b = body.block
    root = SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, tirx.SeqStmt(stmts + [b.body]), b.init,
                  b.alloc_buffers, b.match_buffers, b.annotations)
    return SBlockRealize(body.iter_values, body.predicate, root)


@tvm.transform.module_pass(opt_level=0, name="AssertSampleBounds")
class AssertSampleBounds:
    """Prepend ``assert`` statements on the sample-count parameters of every PSB PrimFunc
    (``psb.kind`` attribute): ``n`` in [1, n_max], ``lo`` / ``hi`` 0 or a power of two <= n_max."""

    def __init__(self, n_max: int):
        self.n_max = int(n_max)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None or ATTR_KIND not in func.attrs:
                continue
            checks = []
            for param in func.params:
                zero_ok = SAMPLE_PARAMS.get(param.name)
                if zero_ok is None or not isinstance(param.ty, ir.PrimType):  # scalars, not buffers
                    continue
                what = "0 or a power of two" if zero_ok else "a power of two"
                # positional: TVM 0.27's Python AssertStmt names its arguments (kind, condition, ...)
                # but passes them on in that order to a constructor taking (condition, kind, ...)
                checks.append(tirx.AssertStmt(
                    _bound(param, self.n_max, zero_ok), ir.StringImm("ValueError"),
                    [ir.StringImm(f"{gv.name_hint}: {param.name} must be {what} <= n_max {self.n_max} "
                                  "(the bound the kernels were compiled for)")]))
            if checks:
                updates[gv] = func.with_body(_prepend(func.body, checks))
        return with_functions(mod, updates)
