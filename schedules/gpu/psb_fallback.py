"""Bind every PSB kernel's loop nests to GPU threads (dlight's Fallback, restricted to PSB funcs).

TVM's generic GPU rules (Reduction, GEMV, ...) assert on the data-dependent gathers of the masked
kernels instead of declining them, so PSB PrimFuncs are scheduled here first and marked done.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target


class PSBGpuFallback(GPUScheduleRule):
    """Spatial loops fused and bound to blocks x threads; reductions serial per thread."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if func.attrs is None or "psb.kind" not in func.attrs:
            return None
        return dlight.gpu.Fallback().apply(func, target, tunable)
