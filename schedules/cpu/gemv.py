"""TVM's dlight CPU GEMV rule, kept only where its tiles divide the loops (no predicate)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target


class GEMV(dlight.cpu.GEMV):
    """``dlight.cpu.GEMV`` unless its schedule needs a bounds predicate.

    The rule vectorizes 64 or 128 outputs around a reduction tile of 128 or 64, explicitly
    unrolled. When the reduction is not a multiple of the tile, the predicate inside the vectorized
    loop makes LLVM's code generation take minutes: the 384x96 squeeze-excite conv of PP-OCR's
    detector (a 1x1 map, float in the calibration probe) had not finished after 10 minutes. The
    next rules (reduction, elementwise) schedule such functions in a second.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> None | s_tir.Schedule:
        sch = super().apply(func, target, tunable)
        if sch is None or "T.where(" in sch.mod["main"].script():
            return None
        return sch
