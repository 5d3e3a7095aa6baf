"""Default (untuned) CPU schedule for PSB depthwise convs (intdot, one input channel per output)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT, ATTR_LOWERING

from ..rule import PSBRule
from .common import VECTOR_LANES, block_names, largest_divisor, loop_extents


class PSBDepthwiseConv2D(PSBRule, CPUScheduleRule):
    """One channel at a time: quantize its padded input plane, accumulate each output row with
    lanes over columns, and apply the epilogue to the row while it is in cache; parallel over
    channels.

    Measured on MobileNetV2's depthwise layers (2-vCPU EPYC, int8 preset): the general conv
    schedule (``PSBConv2D``: three passes over whole tensors) took 0.33 ms on 144 x 56 x 56,
    0.50 ms on 96 x 112 x 112 stride 2 and 0.072 ms on 960 x 7 x 7; this one 0.076, 0.27 and 0.022
    ms, bit for bit the same output. What is left is mostly reading the float input.
    """

    kinds = ("conv2d",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        if attrs.get(ATTR_LAYOUT) or attrs.get(ATTR_LOWERING) != "intdot":
            return None  # packed / channels-last / GPU layouts, and the lowerings with bit loops
        sch = s_tir.Schedule(func)
        if not {"xq", "acc", "out"} <= set(block_names(sch)) or "q" in block_names(sch):
            return None
        acc, out, xq = sch.get_sblock("acc"), sch.get_sblock("out"), sch.get_sblock("xq")
        loops = sch.get_loops(acc)
        if len(loops) != 7:
            return None
        b, o, y, x, rc, rh, rw = loops
        channels = loop_extents(sch, [o, rc])
        if channels[1] != 1 or loop_extents(sch, sch.get_loops(xq)[1:2])[0] != channels[0]:
            return None  # not depthwise (a grouped conv with several channels per group, or a multiplier)
        width = loop_extents(sch, [x])[0]
        # Lanes per output row, measured on MobileNetV2's rows: 16 where they divide it (112
        # columns: 0.037 ms vs 0.062 with 8), else 8 (56: 0.073 vs 0.27 with 16 predicated), else
        # a divisor >= 8 (28 and 14: 14 lanes, 0.115 / 0.012 ms vs 0.166 / 0.115 with 8); a short
        # row gets one predicated vector of 8 (7 columns: 0.023 ms vs 0.027 with 7 lanes).
        divisor = largest_divisor(width, VECTOR_LANES)
        lanes = next((v for v in (VECTOR_LANES, 8) if width % v == 0), divisor if divisor >= 8 else 8)
        xo, xi = sch.split(x, [None, lanes])
        sch.reorder(b, o, y, xo, rc, rh, rw, xi)
        channel = sch.fuse(b, o)
        sch.parallel(channel)
        sch.reverse_compute_at(out, y)
        _, vec = sch.split(sch.get_loops(out)[-1], [None, lanes])
        sch.vectorize(vec)
        sch.compute_at(xq, channel)
        row = sch.get_loops(xq)[-1]
        row_lanes = next((v for v in (VECTOR_LANES, 8) if loop_extents(sch, [row])[0] % v == 0), 0)
        if row_lanes:  # (a 6-lane split of a 114-column row measured 3x slower than none)
            sch.vectorize(sch.split(row, [None, row_lanes])[1])
        sch.vectorize(xi)
        init = sch.decompose_reduction(acc, rc)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch
