"""Default CPU schedule for the float transposed convs PSB leaves float (TVM's legalized
``conv2d_transpose``: dilate, pad, flip the kernel, then a direct conv)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import VECTOR_LANES, block_names, epilogue_per_row, largest_divisor, loop_extents, vectorize_reduction

STAGES = {"data_dilate", "data_pad", "kernel_transform", "compute"}


class ConvTranspose(CPUScheduleRule):
    """The dilated, padded input materialized once (parallel), the conv parallel over (batch,
    channel, row) and vectorized over columns below the reduction (every lane keeps its own sum
    in the unscheduled order: the same floats), the epilogue applied per row.

    Measured on PP-OCRv4's detector head (24 -> 24 channels, 80 -> 160 px, and 24 -> 1, 160 -> 320):
    48.1 and 10.3 ms with dlight's generic CPU rules (nothing parallel or vectorized; 64 of the
    detector's 64 ms at n=8 with the int8 preset, ONNX Runtime fp32: 7.7 ms for all of it); 1.9
    and 0.92 ms with this one, bit for bit the same output.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        names = block_names(sch)
        if not STAGES <= names:
            return None
        conv = sch.get_sblock("compute")
        loops = sch.get_loops(conv)
        if len(loops) != 7:
            return None
        sch.compute_inline(sch.get_sblock("data_dilate"))
        sch.compute_inline(sch.get_sblock("kernel_transform"))
        # rows in parallel, each row a plain loop: fused and vectorized, the dilation and padding
        # tests became per-lane div/mod (the second head kernel: 4.2 ms instead of 0.92)
        pad_loops = sch.get_loops(sch.get_sblock("data_pad"))
        sch.parallel(sch.fuse(*pad_loops[:-1]))
        b, c, h, w, dc, dh, dw = loops
        width = loop_extents(sch, [w])[0]
        lanes = largest_divisor(width, VECTOR_LANES)
        wo, wi = sch.split(w, [None, lanes])
        sch.reorder(b, c, h, wo, dc, dh, dw, wi)
        row = sch.fuse(b, c, h)
        sch.parallel(row)
        # the elementwise epilogue (bias, activation), in program order: after each row, in cache
        order = [sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))]
        if not epilogue_per_row(sch, [n for n in order if n not in STAGES], row):
            return None
        vectorize_reduction(sch, conv, wi, dc, lanes)
        return sch
