"""Kernels code-generated in parallel, one object file each, kept on disk and reused by later builds.

TVM's ``tvm.compile`` generates all of a module's PrimFuncs as one LLVM module, on one thread.
Here every PrimFunc is built alone (``tvm.tirx.build`` releases the GIL, so threads run in
parallel) into an object file named by its key, and ``compile`` links the objects into the
module's ``.so``. A later build of any module holding the same kernel (the same model recompiled
at another n or seed or with other weights, or another model with a layer of the same shape and
name) links the stored object instead of generating it again.

Measured on a 2-vCPU EPYC (MTCNN ONet, 52 kernels): one LLVM module 3.0 s; one per kernel on one
thread 4.0 s (LLVM's per-module setup), on two threads 1.8 s; all 52 from the cache: the link only.

The key is a SHA-256 of TVM's version, the target, the PassContext (opt level, options, required
and disabled passes) and the kernel's TVMScript text, its symbol included: everything its code
depends on. Objects are written all-or-nothing; ``module_cache.prune`` bounds the directory.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import time

import tvm

from .errors import ConfigError
from .files import write_output
from .pipeline import derived_pass_context
from .threads import physical_cores

LOG = logging.getLogger("psb_tvm")
ENV_JOBS = "PSB_TVM_BUILD_JOBS"
SUFFIX = ".o"


def build_jobs() -> int:
    """Threads that generate kernels: ``$PSB_TVM_BUILD_JOBS``, else the physical cores."""
    value = os.environ.get(ENV_JOBS, "").strip()
    if not value:
        return physical_cores()
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"${ENV_JOBS} must be a positive number of threads, got {value!r}")
    return jobs


def _context_fingerprint(ctx: tvm.transform.PassContext) -> dict:
    return {"opt_level": int(ctx.opt_level), "config": sorted((str(k), str(v)) for k, v in ctx.config.items()),
            "required": sorted(str(p) for p in ctx.required_pass), "disabled": sorted(str(p) for p in ctx.disabled_pass)}


def kernel_key(name: str, func: tvm.tirx.PrimFunc, target: tvm.target.Target, context: dict,
               module_attrs: str = "") -> str:
    """The cache key of kernel ``name`` (its symbol) built for ``target`` under ``context``
    (:func:`_context_fingerprint`); ``module_attrs``: the IRModule attributes it is built with."""
    parts = {"tvm": tvm.__version__, "target": str(target), "context": context, "name": name,
             "module_attrs": module_attrs, "script": func.script()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_objects(tir_mod: tvm.IRModule, target: tvm.target.Target, directory: pathlib.Path, jobs: int | None = None,
                  progress=None) -> tuple[list, dict]:
    """Object files of every PrimFunc of ``tir_mod`` for ``target``, from ``directory`` where present,
    else generated there (``jobs`` threads, default :func:`build_jobs`). Returns ``(paths, stats)``,
    stats ``{"kernels", "reused", "generated", "seconds"}``; ``progress`` (``CompileProgress``) is
    told each kernel as it finishes."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ctx = tvm.transform.PassContext.current()
    context = _context_fingerprint(ctx)
    attrs = str(tir_mod.attrs) if tir_mod.attrs else ""
    kernels = [(gv.name_hint, func) for gv, func in tir_mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)]
    paths, missing = [], []
    for name, func in kernels:
        path = directory / (kernel_key(name, func, target, context, attrs) + SUFFIX)
        paths.append(path)
        if path.is_file():
            os.utime(path)  # least recently used pruning reads the modification time
        else:
            missing.append((name, func, path))

    def generate(item):
        name, func, path = item
        start = time.perf_counter()
        with derived_pass_context(instruments=list(ctx.instruments), base=ctx):
            lib = tvm.tirx.build(tvm.IRModule({name: func}, attrs=tir_mod.attrs), target=target)
        write_output(path, lib.write_to_file, suffix=SUFFIX)
        return name, time.perf_counter() - start

    start, seconds = time.perf_counter(), {}
    jobs = jobs or build_jobs()
    if missing:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(jobs, len(missing))) as pool:
            futures = [pool.submit(generate, item) for item in missing]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                name, elapsed = future.result()
                seconds[name] = elapsed
                if progress is not None:
                    progress.kernel(done, len(missing), name)
    stats = {"kernels": len(kernels), "reused": len(kernels) - len(missing), "generated": len(missing),
             "jobs": jobs, "seconds": round(time.perf_counter() - start, 3),
             "slowest": sorted(((round(s, 3), n) for n, s in seconds.items()), reverse=True)[:5]}
    LOG.info("kernels: %d (%d from the cache, %d generated on %d threads in %.1f s)", stats["kernels"],
             stats["reused"], stats["generated"], jobs, stats["seconds"])
    return [str(p) for p in paths], stats
