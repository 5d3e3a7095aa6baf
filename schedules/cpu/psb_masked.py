"""Default CPU schedule for the attention (masked) PSB kernels: parallel over computed positions."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..rule import PSBRule
from .common import parallel_vectorize, vectorize_below_reductions
from .psb_sampling import schedule_shared_stages


class PSBMasked(PSBRule, CPUScheduleRule):
    """Listed positions in parallel; output channels vectorized with the reduction outside them."""

    kinds = ("conv2d_masked", "dense_masked")

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        sch = s_tir.Schedule(func)
        schedule_shared_stages(sch)
        acc = sch.get_sblock("acc")
        loops = sch.get_loops(acc)
        k, o = loops[:2]
        reductions = loops[2:]
        vectorize_below_reductions(sch, acc, [k], o, reductions, n_parallel=1)  # parallel over positions
        parallel_vectorize(sch, sch.get_sblock("out"))
        return sch
