"""Default (untuned) CPU schedule for PSB dense kernels, all lowerings."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT

from ..rule import PSBRule
from .common import parallel_vectorize, vectorize_below_reductions
from .psb_conv2d import schedule_bitserial_packs, schedule_vnni
from .psb_sampling import schedule_shared_stages


class PSBDense(PSBRule, CPUScheduleRule):
    """Parallel over (row, output), the contiguous reduction innermost.

    TVM does not vectorize reduction loops itself, but LLVM's loop vectorizer turns a contiguous
    innermost integer reduction into packed multiply-adds (vpdpwssd on AVX-512 VNNI).
    """

    kinds = ("dense",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        sch = s_tir.Schedule(func)
        schedule_shared_stages(sch)
        acc = sch.get_sblock("acc")
        if attrs.get(ATTR_LAYOUT) == "bitserial":
            return _schedule_bitserial(sch, acc)
        if attrs.get(ATTR_LAYOUT) == "vnni16":  # a 1x1 conv over the rows (kernels/layer.py)
            return schedule_vnni(sch, acc, target)
        m, o = sch.get_loops(acc)[:2]
        sch.parallel(sch.fuse(m, o))
        parallel_vectorize(sch, sch.get_sblock("out"))
        return sch


def _schedule_bitserial(sch: s_tir.Schedule, acc) -> s_tir.Schedule:
    """Packed masks are [words, sign, level, O]: vectorize over outputs, reductions outside,
    parallel over (row, output block)."""
    schedule_bitserial_packs(sch)
    m, o, *reductions = sch.get_loops(acc)
    vectorize_below_reductions(sch, acc, [m], o, reductions, n_parallel=2)  # parallel over (row, output block)
    parallel_vectorize(sch, sch.get_sblock("out"))
    return sch
