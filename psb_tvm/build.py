"""Relax module to executable through the target's registered pipeline (``psb_tvm.pipeline``)."""

from __future__ import annotations

import dataclasses
import time

import tvm
from tvm import relax

from .metadata import ModuleMetadata
from .pipeline import PIPELINES, legalize_passes, schedule_passes
from .tuning_db import open_database


def build(mod: tvm.IRModule, target: tvm.target.Target, tuning_db=None, metadata: ModuleMetadata | None = None):
    """Compile ``mod`` for ``target``; returns ``(Relax VM executable, metadata)``.

    ``metadata`` (if given) is returned with the schedule source of every kernel (``schedules``)
    and, for CUDA, whether the module replays as a CUDA graph; it travels inside the executable as
    the Relax function ``psb_metadata()``. ``tuning_db``: a ``psb_tvm.tune`` work dir or MetaSchedule
    database whose schedules are reapplied.
    """
    if target.kind.name not in PIPELINES:
        raise NotImplementedError(f"target kind {target.kind.name!r} is not supported; use llvm (CPU) or cuda")
    metadata = dataclasses.replace(metadata) if metadata is not None else None  # the caller's stays as it was
    if metadata is not None and target.kind.name == "cuda":
        metadata.cuda_graph = not metadata.runtime_args
    database = open_database(tuning_db, target) if tuning_db is not None else None
    name = PIPELINES[target.kind.name][0]
    pipeline = relax.get_pipeline(name, target=target, database=database, metadata=metadata)
    return tvm.compile(mod, target=target, relax_pipeline=pipeline), metadata


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
