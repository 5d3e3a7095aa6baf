"""The compile pipeline of psb_tvm, declared: the passes of each phase, in order.

``psb_tvm.compile`` runs, per model:

1. **import** (:func:`import_passes`) on TVM's ONNX import: fold batch norms and constants,
   turn Clip's ``call_tir`` back into Relax ops, clean up;
2. layer selection, calibration and weight encoding (``compiler.plan``: decisions, not passes);
3. **PSB rewrite** (:func:`rewrite_passes`): ``RewriteToPSB`` splices in the kernels, then
   ``HandOffInt8Activations`` passes integer activations from one conv to the next,
   ``FuseResidualAdd`` moves residual adds (+ ReLU) into the producing kernel's epilogue and
   ``ChannelsLastFloat`` keeps the float tensors between packed convs NHWC;
4. **build** for the target, one registered pipeline per target kind:

   - ``psb_cpu`` (:func:`cpu_build_passes`): TVM's CPU library dispatch and legalization (every
     Relax op becomes a PrimFunc: the tuning tasks), the tuning database's schedules, our
     default rules for the rest, the kernels' sample-count checks, the metadata, then TVM's CPU
     dataflow lowering and finalization;
   - ``psb_cuda`` (:func:`cuda_build_passes`): the database and our GPU rules on the PSB kernels
     first (marked scheduled, so TVM's GPU rules only see the float glue), the checks and the
     metadata, then TVM's CUDA pipeline, with CUDA graphs for modules without run-time arguments.

Both are registered with ``relax.register_pipeline``, so a hand-written flow can use them::

    mod = psb_tvm.passes.RewriteToPSB(plan.layers)(mod)
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_pipeline("psb_cpu", target=target))
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.backend.cuda import pipeline as cuda_generic
from tvm.s_tir import dlight

from .metadata import ModuleMetadata
from .passes import (
    ApplyPSBTuningDatabase,
    AssertSampleBounds,
    AttachPSBMetadata,
    ChannelsLastFloat,
    FuseResidualAdd,
    HandOffInt8Activations,
    LegalizeNonOverlappingConvTranspose,
    RewriteToPSB,
    ScalarMinMaxCallTIRToRelaxOps,
)
from .schedules import default_rules

#: Pass context option that turns CUDA graph capture on or off (TVM's RewriteCUDAGraph reads it).
CUDA_GRAPH_OPTION = "relax.backend.use_cuda_graph"


def import_passes() -> list:
    """Normalise TVM's ONNX import for layer selection."""
    return [
        relax.transform.FoldConstant(),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        ScalarMinMaxCallTIRToRelaxOps(),  # after folding: Clip's bounds are constants by now
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]


def rewrite_passes(layers: list, frozen: dict | None = None) -> list:
    """The PSB rewrite of the planned ``layers`` (``compiler.Plan.layers``)."""
    return [RewriteToPSB(layers, frozen), HandOffInt8Activations(layers), FuseResidualAdd(), ChannelsLastFloat()]


def legalize_passes(target: tvm.target.Target) -> list:
    """CPU: every Relax op becomes a PrimFunc. PSB PrimFuncs carry ``op_pattern = kOpaque`` so
    nothing downstream fuses (and unschedules) them. Transposed convs whose kernel equals their
    stride are computed directly (``LegalizeNonOverlappingConvTranspose``), the rest by TOPI.
    ``psb_tvm.tune`` extracts its tasks here."""
    return ([LegalizeNonOverlappingConvTranspose()] + cpu_generic.library_dispatch_passes(target)
            + cpu_generic.legalize_passes(target))


def schedule_passes(target: tvm.target.Target, database=None, n_max: int | None = None) -> list:
    """The database's schedules where it has a record, our default rules for ``target`` on the
    rest, then the kernels' own check of their sample counts (after scheduling: rules and tuning
    see the kernels as written)."""
    passes = [ApplyPSBTuningDatabase(database)] if database is not None else []
    passes.append(dlight.ApplyDefaultSchedule(*default_rules(target)))
    if n_max is not None:
        passes.append(AssertSampleBounds(n_max))
    return passes


def _metadata_passes(metadata: ModuleMetadata | dict | None) -> list:
    return [AttachPSBMetadata(metadata)] if metadata is not None else []


def cpu_build_passes(target: tvm.target.Target, database=None, metadata: ModuleMetadata | dict | None = None,
                     n_max: int | None = None) -> list:
    """The ``psb_cpu`` pipeline's passes (see the module docstring)."""
    n_max = n_max if n_max is not None else (metadata or {}).get("n_max")
    return (legalize_passes(target) + schedule_passes(target, database, n_max) + _metadata_passes(metadata)
            + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))


@tvm.transform.module_pass(opt_level=0, name="WithPassConfig")
class WithPassConfig:
    """Run ``passes`` with extra PassContext options (``config``) on top of the current ones."""

    def __init__(self, passes: list, config: dict):
        self.passes, self.config = list(passes), dict(config)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with derived_pass_context(config=self.config):
            return tvm.transform.Sequential(self.passes)(mod)


def derived_pass_context(config: dict | None = None, instruments: list | None = None,
                         base: tvm.transform.PassContext | None = None) -> tvm.transform.PassContext:
    """A PassContext like ``base`` (default: the current one; contexts are per thread, so a worker
    thread passes its caller's) -- opt level, required and disabled passes, options -- with
    ``config`` options added and ``instruments`` (default none: a nested context re-enters the
    instruments it is given, so the outer ones are not repeated unless asked)."""
    ctx = base if base is not None else tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=ctx.opt_level, required_pass=ctx.required_pass,
                                     disabled_pass=ctx.disabled_pass, config={**ctx.config, **(config or {})},
                                     instruments=instruments)


def cuda_build_passes(target: tvm.target.Target, database=None, metadata: ModuleMetadata | dict | None = None,
                      n_max: int | None = None, cuda_graph: bool | None = None) -> list:
    """The ``psb_cuda`` pipeline's passes (see the module docstring). ``cuda_graph`` defaults to
    the metadata's: modules without run-time arguments besides the inputs (frozen, or all float)
    replay their kernel sequence as one CUDA graph, captured on the first call: a MobileNetV2 is
    ~150 kernel launches, which at batch 1 cost more than the kernels. Sampled modules take n and
    the seed per call and launch kernels one by one."""
    metadata_ = metadata or {}
    n_max = n_max if n_max is not None else metadata_.get("n_max")
    if cuda_graph is None:
        cuda_graph = bool(metadata_.get("cuda_graph", False))
    return (schedule_passes(target, database, n_max) + _metadata_passes(metadata)
            + cuda_generic.library_dispatch_passes(target) + cuda_generic.legalize_passes(target)
            + cuda_generic.dataflow_lower_passes(target)
            + [WithPassConfig(cuda_generic.finalize_passes(target), {CUDA_GRAPH_OPTION: bool(cuda_graph)})])


def _sequential(passes: list, name: str, target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:  # dlight and TVM's legalization read the target from the context
            return tvm.transform.Sequential(passes, name=name)(mod)

    return _pipeline


def psb_cpu(target, database=None, metadata: ModuleMetadata | dict | None = None, n_max: int | None = None) -> tvm.transform.Pass:
    """The CPU build pipeline: ``relax.get_pipeline("psb_cpu", target=...)``."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    return _sequential(cpu_build_passes(target, database, metadata, n_max), "psb_cpu", target)


def psb_cuda(target, database=None, metadata: ModuleMetadata | dict | None = None, n_max: int | None = None,
             cuda_graph: bool | None = None) -> tvm.transform.Pass:
    """The CUDA build pipeline: ``relax.get_pipeline("psb_cuda", target=...)``."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    return _sequential(cuda_build_passes(target, database, metadata, n_max, cuda_graph), "psb_cuda", target)


#: Registered pipeline name -> builder, by target kind.
PIPELINES = {"llvm": ("psb_cpu", psb_cpu), "cuda": ("psb_cuda", psb_cuda)}

for _name, _builder in PIPELINES.values():
    if _name not in relax.pipeline.PIPELINE_MAP:  # register once (importlib.reload re-runs this)
        relax.register_pipeline(_name)(_builder)
