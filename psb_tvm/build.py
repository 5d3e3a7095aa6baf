"""Relax module to executable: legalize the float glue, apply tuned or default schedules, lower."""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight

from .abi import METADATA_FUNC
from .passes.assert_sample_bounds import AssertSampleBounds
from .schedules.cpu import default_rules
from .schedules.gpu import default_rules as gpu_rules


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Library dispatch and legalization: every Relax op becomes a PrimFunc (the tuning tasks).

    PSB PrimFuncs carry ``op_pattern = kOpaque`` so nothing downstream fuses (and unschedules) them.
    """
    with target:
        return tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                        + cpu_generic.legalize_passes(target))(mod)


def schedule(mod: tvm.IRModule, target: tvm.target.Target, tuning_db=None) -> tuple[tvm.IRModule, dict]:
    """Apply the tuning database (where it has a record) then our default rules (CPU or GPU, by
    ``target``) to the rest.

    Returns the module and the ``schedules`` entry of the metadata (tuned / default counts and
    the tuned kernels' names).
    """
    tuned = set()
    if tuning_db is not None:
        from .tuning import apply_database  # imports MetaSchedule only when a database is given

        mod, tuned = apply_database(mod, target, tuning_db)
    with target:
        mod = dlight.ApplyDefaultSchedule(*(gpu_rules() if target.kind.name == "cuda" else default_rules()))(mod)
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return mod, {"tuned": len(tuned), "default": len(names) - len(tuned), "tuned_kernels": sorted(tuned)}


def _finish_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="PSBFinish")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(cpu_generic.dataflow_lower_passes(target)
                                            + cpu_generic.finalize_passes(target))(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: tvm.target.Target, tuning_db=None, metadata: dict | None = None):
    """Compile ``mod`` for ``target``; returns ``(Relax VM executable, metadata)``.

    ``metadata`` (if given) gains the schedule source of every kernel and travels inside the
    executable as the Relax function ``psb_metadata()``.
    """
    metadata = dict(metadata or {})
    if target.kind.name == "cuda":
        # PSB kernels (the module's PrimFuncs before legalization): tuned schedules where the
        # database has them, else our GPU rules (tiled dp4a / integer GEMM kernels, thread binding
        # for the rest); all are marked scheduled, so TVM's CUDA pipeline leaves them alone and
        # gives only the float glue its default rules.
        mod, metadata["schedules"] = schedule(mod, target, tuning_db)
        mod = _bound_samples(mod, metadata)
        # Modules without run-time arguments besides the inputs (frozen, or all float) replay their
        # kernel sequence as one CUDA graph (captured on the first call): a MobileNetV2 is ~150
        # kernel launches, which at batch 1 cost more than the kernels. Sampled modules take n and
        # the seed per call and launch kernels one by one.
        metadata["cuda_graph"] = not metadata.get("runtime_args")
        mod = attach_string(mod, METADATA_FUNC, json.dumps(metadata))
        ctx = tvm.transform.PassContext.current()
        with tvm.transform.PassContext(opt_level=ctx.opt_level, required_pass=ctx.required_pass,
                                       disabled_pass=ctx.disabled_pass,
                                       config={**ctx.config, "relax.backend.use_cuda_graph": metadata["cuda_graph"]}):
            return tvm.compile(mod, target=target), metadata
    if target.kind.name != "llvm":
        raise NotImplementedError(f"target kind {target.kind.name!r} is not supported; use llvm (CPU) or cuda")
    mod, metadata["schedules"] = schedule(legalize(mod, target), target, tuning_db)
    mod = attach_string(_bound_samples(mod, metadata), METADATA_FUNC, json.dumps(metadata))
    return tvm.compile(mod, target=target, relax_pipeline=_finish_pipeline(target)), metadata


def _bound_samples(mod: tvm.IRModule, metadata: dict) -> tvm.IRModule:
    """The kernels' own check of their sample counts (after scheduling: the schedule rules and
    tuning see the kernels as written)."""
    return AssertSampleBounds(metadata["n_max"])(mod) if "n_max" in metadata else mod


def attach_string(mod: tvm.IRModule, name: str, text: str) -> tvm.IRModule:
    """Add a Relax function ``name() -> str`` so the text travels inside the exported library."""
    value = tvm.ir.StringImm(text)
    func = relax.Function([], relax.SeqExpr([], value), ret_ty=value.ty, is_pure=True)
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions))
    mod[name] = func.with_attr("global_symbol", name)
    return mod
