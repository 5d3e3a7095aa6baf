"""Fallback CPU schedule for the float glue between PSB layers: parallel and vectorized loops."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import parallel_vectorize, root_blocks


class Elementwise(CPUScheduleRule):
    """Any PrimFunc made only of spatial (non-reduction) blocks: each block parallel + vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if not blocks:
            return None
        for block in blocks:
            iters = sch.get(block).iter_vars
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in iters) or not iters:
                return None
            if len(sch.get_loops(block)) != len(iters):
                return None
        # Inline every block into its consumer (a fused add + ReLU is one pass over memory, not two
        # with a temporary); blocks that cannot be inlined (func outputs) keep their own loops.
        for block in blocks[:-1]:
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                pass
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            parallel_vectorize(sch, block)
        return sch
