"""The matching every PSB schedule rule starts with, written once: a PrimFunc, a target the rule
serves, a PSB kernel (``psb.kind``) of the kinds the rule schedules."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from psb_tvm.abi import ATTR_KIND


class PSBRule:
    """Mixin placed before a dlight rule base (``CPUScheduleRule``, ``GPUScheduleRule``): its
    ``apply`` matches, then calls ``schedule(func, attrs, target, tunable)`` (``None`` declines)."""

    #: ``psb.kind`` values this rule schedules; ``None``: every PSB kernel
    kinds: tuple | None = None

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        attrs = func.attrs if func.attrs is not None else {}
        kind = attrs.get(ATTR_KIND)
        if kind is None or (self.kinds is not None and kind not in self.kinds):
            return None
        return self.schedule(func, attrs, target, tunable)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, tunable: bool) -> None | s_tir.Schedule:
        raise NotImplementedError
