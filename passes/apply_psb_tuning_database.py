"""Replay a MetaSchedule database's best schedule onto every tunable kernel it has a record for.

Kernels are matched in a canonical form (scalar ``n`` bound to a constant, symbol ``main``) so
identical layers share one record; a record that no longer applies is skipped with a warning and
the kernel keeps its default schedule. Scheduled kernels are marked ``psb.tuned`` (what
``AttachPSBMetadata`` counts) and ``tirx.is_scheduled`` (so the default rules leave them alone).
"""

from __future__ import annotations

import warnings

import tvm
from tvm import tirx

from psb_tvm.abi import ATTR_KIND, ATTR_TUNED
from psb_tvm.errors import TuningWarning

from .module_copy import with_functions

CANONICAL_N = 8  # the value ``n`` is bound to while tuning; the loop nest does not depend on it
# Samplers and masked kernels have run-time loop extents; pack kernels (elementwise, once per
# configuration with the weight cache) are not worth a tuning budget.
_UNTUNABLE = ("sample", "pack", "conv2d_masked", "dense_masked")


def is_tunable(func) -> bool:
    if not isinstance(func, tirx.PrimFunc):
        return False
    attrs = func.attrs or {}
    if attrs.get("tirx.is_scheduled", False):
        return False
    return attrs.get(ATTR_KIND) not in _UNTUNABLE


def canonical(func: tirx.PrimFunc) -> tvm.IRModule:
    """The task's workload: scalar params bound to constants, the symbol renamed ``main``."""
    scalars = {p: tirx.IntImm(str(p.ty), CANONICAL_N) for p in func.params if _is_scalar(p)}
    if scalars:
        func = func.specialize(scalars)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _is_scalar(param) -> bool:
    try:
        return str(param.ty).startswith("int")
    except AttributeError:
        return False


def tuned_kernels(mod: tvm.IRModule) -> set:
    """Names of the PrimFuncs a database scheduled (``psb.tuned``)."""
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and (f.attrs or {}).get(ATTR_TUNED, False)}


@tvm.transform.module_pass(opt_level=0, name="ApplyPSBTuningDatabase")
class ApplyPSBTuningDatabase:
    """Apply ``database`` (a MetaSchedule ``Database``, e.g. ``tuning_db.open_database`` of a
    ``psb_tvm.tune`` work dir) to the module's tunable PrimFuncs."""

    def __init__(self, database):
        self.database = database

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        database, updates = self.database, {}
        for gv, func in mod.functions.items():
            if not is_tunable(func):
                continue
            wl = canonical(func)
            if not database.has_workload(wl):
                continue
            top = database.get_top_k(database.commit_workload(wl), 1)
            if not top:
                continue
            try:
                sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
                top[0].trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception as err:  # noqa: BLE001 - a stale record must not stop the build
                warnings.warn(f"tuning record for {gv.name_hint} does not apply ({str(err).splitlines()[-1][:200]}); "
                              "using its default schedule", TuningWarning, stacklevel=2)
                continue
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(ATTR_TUNED, True)
        return with_functions(mod, updates)
