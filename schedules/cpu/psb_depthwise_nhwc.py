"""Default CPU schedule for the channels-last depthwise conv of the integer hand-off."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT

from ..kernels.spec import spec_of
from ..rule import PSBRule
from .common import VECTOR_LANES, block_names, largest_divisor, loop_extents, vectorize_reduction

#: Output pixels of a row summed together (up to this many, a divisor of the width), each tap's
#: weights loaded once for them: one pixel at a time, its nine products formed one dependent
#: chain of multiply-adds.
PIXELS = 8


def _vectorize_inner(sch: s_tir.Schedule, loop, lanes: int) -> None:
    if lanes > 1:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


class PSBDepthwiseNHWC(PSBRule, CPUScheduleRule):
    """``dw_nhwc`` kernels (``kernels/layer.py``): rows in parallel, per output pixel the taps
    accumulated with lanes over channels (contiguous activations and weights); the epilogue per
    pixel when it writes the next conv's NHWC activations, per row when it writes float NCHW;
    the padded input a row-parallel copy (or quantization) of its own."""

    kinds = ("conv2d",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        if attrs.get(ATTR_LAYOUT) != "dw_nhwc":
            return None
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
        b, y, x, c, rh, rw = sch.get_loops(acc)
        channels = loop_extents(sch, [c])[0]
        lanes = largest_divisor(channels, VECTOR_LANES)
        co, ci = sch.split(c, [None, lanes])
        width = loop_extents(sch, [x])[0]
        xo, xi = sch.split(x, [None, largest_divisor(width, PIXELS)])
        sch.reorder(b, y, co, xo, rh, rw, xi, ci)
        row = sch.fuse(b, y)
        sch.parallel(row)
        sch.unroll(rh)
        sch.unroll(rw)
        sch.unroll(xi)
        x = xo
        vectorize_reduction(sch, acc, ci, rh, lanes)
        if spec_of(func).out_handoff is not None:
            sch.reverse_compute_at(out, x)  # the pixel's channels, contiguous NHWC bytes
            width = loop_extents(sch, sch.get_loops(out)[-1:])[0]  # the consumer's channels
            _vectorize_inner(sch, sch.get_loops(out)[-1], largest_divisor(width, VECTOR_LANES))
        else:
            sch.reverse_compute_at(out, row)  # NCHW floats: the row's channels, each along x
            width = loop_extents(sch, sch.get_loops(out)[-1:])[0]
            _vectorize_inner(sch, sch.get_loops(out)[-1], largest_divisor(width, VECTOR_LANES))
        for name in ("xq", "qt"):
            block = sch.get_sblock(name)
            loops = sch.get_loops(block)
            sch.parallel(sch.fuse(*loops[:-1]))
            _vectorize_inner(sch, loops[-1], largest_divisor(loop_extents(sch, loops[-1:])[0], VECTOR_LANES))
        if "acc_nchw" in block_names(sch):
            loops = sch.get_loops(sch.get_sblock("acc_nchw"))
            sch.parallel(sch.fuse(*loops[:-1]))
        return sch
