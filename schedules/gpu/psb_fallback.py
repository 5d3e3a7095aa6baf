"""Bind every PSB kernel's loop nests to GPU threads (dlight's Fallback, restricted to PSB funcs).

TVM's generic GPU rules (Reduction, GEMV, ...) assert on the data-dependent gathers of the masked
kernels instead of declining them, so PSB PrimFuncs are scheduled here first and marked done.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from ..rule import PSBRule


class PSBGpuFallback(PSBRule, GPUScheduleRule):
    """Spatial loops fused and bound to blocks x threads; reductions serial per thread."""

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, tunable: bool) -> None | s_tir.Schedule:
        return dlight.gpu.Fallback().apply(func, target, tunable)
