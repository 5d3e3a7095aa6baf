"""Relax module to executable through the target's registered pipeline (``psb_tvm.pipeline``)."""

from __future__ import annotations

import dataclasses
import pathlib
import time

import tvm
from tvm import relax
from tvm.relax import _ffi_api as relax_ffi
from tvm.relax import vm_build
from tvm.script import tirx as T

from .abi import ATTR_INT8_HANDOFFS, ATTR_LAYER_KERNELS
from .kernel_cache import build_objects
from .metadata import ModuleMetadata
from .pipeline import PIPELINES, legalize_passes, schedule_passes
from .tuning_db import open_database


def _pipeline(target: tvm.target.Target, tuning_db, metadata: ModuleMetadata | None):
    """The target's registered pipeline, and the metadata it attaches (a copy: the caller's stays)."""
    if target.kind.name not in PIPELINES:
        raise NotImplementedError(f"target kind {target.kind.name!r} is not supported; use llvm (CPU) or cuda")
    metadata = dataclasses.replace(metadata) if metadata is not None else None
    if metadata is not None and target.kind.name == "cuda":
        metadata.cuda_graph = not metadata.runtime_args
    database = open_database(tuning_db, target) if tuning_db is not None else None
    return relax.get_pipeline(PIPELINES[target.kind.name][0], target=target, database=database,
                              metadata=metadata), metadata


def build(mod: tvm.IRModule, target: tvm.target.Target, tuning_db=None, metadata: ModuleMetadata | None = None):
    """Compile ``mod`` for ``target``; returns ``(Relax VM executable, metadata)``.

    ``metadata`` (if given) is returned with the schedule source of every kernel (``schedules``)
    and, for CUDA, whether the module replays as a CUDA graph; it travels inside the executable as
    the Relax function ``psb_metadata()``. ``tuning_db``: a ``psb_tvm.tune`` work dir or MetaSchedule
    database whose schedules are reapplied.
    """
    pipeline, metadata = _pipeline(target, tuning_db, metadata)
    return tvm.compile(mod, target=target, relax_pipeline=pipeline), metadata


@T.prim_func
def _kernels_stub():
    T.func_attr({"global_symbol": "__psb_kernels_stub"})


def build_objects_and_link(mod: tvm.IRModule, target: tvm.target.Target, kernel_dir: pathlib.Path, tuning_db=None,
                           metadata: ModuleMetadata | None = None, jobs: int | None = None, progress=None):
    """``build`` for CPU (llvm) targets with the kernels generated in parallel and cached as object
    files in ``kernel_dir`` (``psb_tvm.kernel_cache``). Returns ``(executable, metadata, objects,
    stats)``: the executable runs only once exported with ``objects`` linked in
    (``PSBModule(..., objects=objects).export_library``), which is how ``compile`` uses it.

    What ``tvm.compile`` does, split at the kernels (TVM 0.27's ``relax.vm_build``): the Relax
    pipeline, the VM bytecode, then the PrimFuncs; the executable is linked against a stub
    library, and the exported ``.so`` resolves the kernels' symbols from the objects.
    """
    if target.kind.name != "llvm":
        raise NotImplementedError("kernel objects are built for CPU (llvm) targets; use build() for others")
    pipeline, metadata = _pipeline(target, tuning_db, metadata)
    with target:
        mod = pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    if attrs.get("external_mods"):
        raise NotImplementedError("modules with external (BYOC) libraries are built with build()")
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    for attr in (ATTR_LAYER_KERNELS, ATTR_INT8_HANDOFFS):  # ours, not the kernels': keep them out of their keys
        if tir_mod is not None and tir_mod.attrs and attr in tir_mod.attrs:
            tir_mod = tir_mod.without_attr(attr)
    objects, stats = [], {"kernels": 0, "reused": 0, "generated": 0, "seconds": 0.0}
    if tir_mod is not None:
        tir_mod = vm_build._auto_attach_system_lib_prefix(tir_mod, target, None)
        objects, stats = build_objects(tir_mod, target, kernel_dir, jobs, progress)
    stub = tvm.tirx.build(tvm.IRModule({"__psb_kernels_stub": _kernels_stub}), target=target)
    executable = relax.VMExecutable(relax_ffi.VMLink(builder, target, stub, [], dict(attrs.get("const_name_to_constant", {}))))
    return executable, metadata, objects, stats


def kernel_codegen_times(mod: tvm.IRModule, target: tvm.target.Target, tuning_db=None) -> list:
    """``[(seconds, kernel name, assembly bytes)]``, slowest first: each kernel of ``mod`` (a lowered
    module, ``compiler.lower``) scheduled as ``build`` does and code-generated alone, so a slow
    build can be traced to its kernel. CPU (llvm) targets; costs about one more build."""
    if target.kind.name != "llvm":
        raise NotImplementedError("the kernel code-generation report covers CPU (llvm) targets")
    database = open_database(tuning_db, target) if tuning_db is not None else None
    with target:
        scheduled = tvm.transform.Sequential(legalize_passes(target) + schedule_passes(target, database))(mod)
    rows = []
    for gv, func in scheduled.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        start = time.perf_counter()
        lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        rows.append((time.perf_counter() - start, gv.name_hint, len(lib.inspect_source("asm"))))
    return sorted(rows, reverse=True)
