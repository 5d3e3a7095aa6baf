"""Relax module to executable: legalize the float glue, apply the default schedule rules, lower."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight

from .schedules.cpu import default_rules
from .schedules.gpu import default_rules as gpu_rules


def default_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our dlight-style rules inserted after legalization.

    PSB PrimFuncs carry ``op_pattern = kOpaque`` so FuseOps leaves them alone and the PSB rules
    (rather than generic ones) schedule them; the float glue gets the dlight CPU rules.
    """

    @tvm.transform.module_pass(opt_level=0, name="PSBDefaultPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [dlight.ApplyDefaultSchedule(*default_rules())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Compile ``mod`` for ``target``; returns a Relax VM executable."""
    if target.kind.name == "cuda":
        # PSB kernels get thread binding from our GPU rules first (marked scheduled, so TVM's
        # CUDA pipeline leaves them alone); the float glue gets TVM's default GPU rules.
        with target:
            mod = dlight.ApplyDefaultSchedule(*gpu_rules())(mod)
        return tvm.compile(mod, target=target)
    if target.kind.name != "llvm":
        raise NotImplementedError(f"target kind {target.kind.name!r} is not supported; use llvm (CPU) or cuda")
    return tvm.compile(mod, target=target, relax_pipeline=default_pipeline(target))


def attach_string(mod: tvm.IRModule, name: str, text: str) -> tvm.IRModule:
    """Add a Relax function ``name() -> str`` so the text travels inside the exported library."""
    value = tvm.ir.StringImm(text)
    func = relax.Function([], relax.SeqExpr([], value), ret_ty=value.ty, is_pure=True)
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions))
    mod[name] = func.with_attr("global_symbol", name)
    return mod
