"""Default CPU schedule for the channels-last depthwise conv of the integer hand-off."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT

from ..kernels.spec import DW_PIXEL_TILE, spec_of
from ..rule import PSBRule
from .common import VECTOR_LANES, block_names, largest_divisor, loop_extents, vectorize_reduction
from .psb_conv2d import has_vnni
from .vnni import PSB_VNNI_DW_16x4


def _vectorize_inner(sch: s_tir.Schedule, loop, lanes: int) -> None:
    if lanes > 1:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def _tap_groups(sch: s_tir.Schedule, acc, target: Target):
    """The ``dw_tap_groups`` nest: rows in parallel; per 16 channels and up to DW_PIXEL_TILE
    output pixels, one dot product of 4 tap columns per (tap row, group): ``vpdpbusd`` on the
    interleaved activation tile with VNNI, else 16 lanes over channels with the 4 taps unrolled.
    Returns the row loop, the pixel-tile loop and the loop to tensorize with VNNI (None without;
    tensorized last: the compute-at steps after this one need the plain reduction block)."""
    b, y, x, c, rh, rg, rk = sch.get_loops(acc)
    co, ci = sch.split(c, [None, 16])
    xo, xi = sch.split(x, [None, largest_divisor(loop_extents(sch, [x])[0], DW_PIXEL_TILE)])
    sch.reorder(b, y, co, xo, rh, rg, xi, ci, rk)
    row = sch.fuse(b, y)
    sch.parallel(row)
    sch.unroll(rh)
    sch.unroll(rg)
    sch.unroll(xi)
    vnni = has_vnni(target)
    if not vnni:
        sch.reorder(rk, ci)
        sch.unroll(rk)
        sch.vectorize(ci)  # (before decompose_reduction: it needs the complete reduction block)
    init = sch.decompose_reduction(acc, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    return row, xo, ci if vnni else None


class PSBDepthwiseNHWC(PSBRule, CPUScheduleRule):
    """``dw_nhwc`` kernels (``kernels/layer.py``): rows in parallel, per output pixel the taps
    accumulated with lanes over channels (contiguous activations and weights); the epilogue per
    pixel when it writes the next conv's NHWC activations, per row when it writes float NCHW;
    the padded input a row-parallel copy (or quantization) of its own."""

    kinds = ("conv2d",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        if attrs.get(ATTR_LAYOUT) != "dw_nhwc":
            return None
        spec = spec_of(func)
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
        dot = None
        if spec.dw_tap_groups:
            row, x, dot = _tap_groups(sch, acc, target)
        else:
            b, y, x, c, rh, rw = sch.get_loops(acc)
            channels = loop_extents(sch, [c])[0]
            lanes = largest_divisor(channels, VECTOR_LANES)
            co, ci = sch.split(c, [None, lanes])
            width = loop_extents(sch, [x])[0]
            xo, xi = sch.split(x, [None, largest_divisor(width, DW_PIXEL_TILE)])
            sch.reorder(b, y, co, xo, rh, rw, xi, ci)
            row = sch.fuse(b, y)
            sch.parallel(row)
            sch.unroll(rh)
            sch.unroll(rw)
            sch.unroll(xi)
            x = xo
            vectorize_reduction(sch, acc, ci, rh, lanes)
        if spec.out_handoff is not None:
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
            if not spec.dw_tap_groups:
                sch.parallel(sch.fuse(*loops[:-1]))
            elif name == "xq":  # [b, h, c / 16, w, 16]: rows in parallel, the rest plain loops
                sch.parallel(sch.fuse(*loops[:2]))  # (all fused: a division and a modulo per 16 bytes)
            # (tap groups' qt, kh x groups x C x 4 bytes, on one thread: a parallel launch cost more,
            # 0.049 -> 0.047 ms at 144 channels, 0.0104 -> 0.0102 at 960)
            _vectorize_inner(sch, loops[-1], largest_divisor(loop_extents(sch, loops[-1:])[0], VECTOR_LANES))
        if "acc_nchw" in block_names(sch):
            loops = sch.get_loops(sch.get_sblock("acc_nchw"))
            sch.parallel(sch.fuse(*loops[:-1]))
        if dot is not None:
            sch.tensorize(dot, PSB_VNNI_DW_16x4)
        return sch
