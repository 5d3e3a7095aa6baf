"""CPU schedule for the direct transposed conv (``passes/legalize_conv_transpose.py``: kernel ==
stride, one tap per output pixel)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import VECTOR_LANES, block_names, epilogue_per_row, largest_divisor, loop_extents, vectorize_reduction

BLOCK = "conv2d_transpose_direct"  # (passes.legalize_conv_transpose.BLOCK; schedules do not import passes)


class DirectConvTranspose(CPUScheduleRule):
    """Per (batch, channel, input row) in parallel: each kernel tap ``(py, px)`` is a scaled sum of
    input rows, vectorized over input columns (contiguous loads, the tap's weight broadcast, the
    stores ``s`` apart), the channel reduction outside the lanes (every lane keeps its own sum in
    the written order: the same floats); the epilogue (bias, activation) per row, in cache."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if BLOCK not in block_names(sch):
            return None
        conv = sch.get_sblock(BLOCK)
        loops = sch.get_loops(conv)
        if len(loops) != 5:
            return None
        b, o, y, x, rc = loops
        kh, kw = (int(v) for v in sch.get(conv).annotations["upsample"])
        yo, py = sch.split(y, [None, kh])
        xo, px = sch.split(x, [None, kw])
        lanes = largest_divisor(loop_extents(sch, [xo])[0], VECTOR_LANES)
        xoo, xoi = sch.split(xo, [None, lanes])
        sch.reorder(b, o, yo, py, px, xoo, rc, xoi)
        row = sch.fuse(b, o, yo)
        sch.parallel(row)
        order = [sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))]
        if not epilogue_per_row(sch, [n for n in order if n != BLOCK], row):
            return None
        vectorize_reduction(sch, conv, xoi, rc, lanes)
        return sch
