"""``psb_tvm.tune``: MetaSchedule with the XGBoost cost model over the PSB kernels and the float glue.

A tuning task is one PrimFunc of the legalized module whose loop nest is fixed at compile time:
the PSB layer kernels (their run-time ``n`` is a value, not a loop extent) and the float glue. The
samplers and masked kernels have run-time extents and keep the default rules. Each task is tuned
in a canonical form (``n`` bound to a constant, symbol renamed ``main``) so identical layers share
records, and the schedule found is replayed onto the real kernel at compile time. Every task's
default schedule is measured and stored first, so the database's best is never worse than the
default and the search starts from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from contextlib import contextmanager

import tvm
import tvm_ffi
from tvm import tirx

from .abi import ATTR_KIND, ATTR_LAYER_KERNELS
from .checks import check_flag, is_int, is_real
from .compiler import lower
from .config import PSBConfig
from .errors import ConfigError, TuningError, TuningWarning
from .passes.apply_psb_tuning_database import canonical, is_tunable
from .pipeline import legalize_passes
from .schedules import default_rules
from .schedules.kernels import LOWERINGS
from .tuning_db import (
    MANIFEST,
    best_ms,
    meta_schedule,
    open_json_database,
    read_manifest,
    target_key,
)


@dataclasses.dataclass
class TaskReport:
    name: str  # first kernel of the task (identical kernels share one task)
    kernels: list
    default_ms: float | None
    best_ms: float | None
    trials: int


@dataclasses.dataclass
class TuneResult:
    """What ``tune`` did: pass ``work_dir`` to ``compile(..., tuning_db=...)``."""

    work_dir: str
    target: str
    num_threads: int
    trials_run: int  # measured in this call
    trials_total: int  # in the database, over all calls (tuning resumes where it stopped)
    seconds: float
    tasks: list

    def table(self) -> str:
        rows = ["| kernel | copies | default ms | tuned ms | speed-up | trials |", "|---|---|---|---|---|---|"]
        for t in self.tasks:
            gain = f"{t.default_ms / t.best_ms:.2f}x" if t.default_ms and t.best_ms else "-"
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
            rows.append(f"| {t.name} | {len(t.kernels)} | {fmt(t.default_ms)} | {fmt(t.best_ms)} | {gain} | {t.trials} |")
        return "\n".join(rows)


def extract_tasks(mod: tvm.IRModule, psb_only: bool = False) -> list:
    """``[(workload module, [kernel names])]``, identical kernels grouped into one task."""
    tasks = []
    for gv, func in mod.functions.items():
        if not is_tunable(func) or (psb_only and ATTR_KIND not in (func.attrs or {})):
            continue
        wl = canonical(func)
        for existing, names in tasks:
            if tvm_ffi.structural_equal(existing, wl):
                names.append(gv.name_hint)
                break
        else:
            tasks.append((wl, [gv.name_hint]))
    return tasks


def _with_threads(target: tvm.target.Target, threads: int) -> tvm.target.Target:
    config = dict(target.export())
    config["num-cores"] = int(threads)
    return tvm.target.Target(config)


def _write_manifest(work_dir: str, manifest: dict) -> None:
    path = os.path.join(work_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)  # a killed run never leaves a half-written manifest


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _default_trace(wl: tvm.IRModule, target: tvm.target.Target):
    """Our default rule's schedule of a workload (``None`` if no rule applies)."""
    func = wl["main"]
    with target:
        for rule in default_rules(target):
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch if not isinstance(sch, list) else sch[0]
    return None


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as ``psb_cpu`` schedules it: the tuning tasks are its PrimFuncs."""
    with target:
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def _build_candidate(mod, target, _params):
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``: that import
    takes ~30 s and the builder restarts its worker processes for every batch. Candidates are
    already tensorized, so the intrinsic registry is not needed to build them."""
    from tvm.driver import build as tir_build  # returns a runtime Module (tvm.compile wraps it)
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tir_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _builder_worker_init():
    tvm.register_global_func("psb_tvm.tuning.build_candidate", _build_candidate, override=True)


def _make_builder(threads: int, timeout: float):
    return meta_schedule().builder.LocalBuilder(max_workers=threads, timeout_sec=timeout, initializer=_builder_worker_init,
                                      f_build="psb_tvm.tuning.build_candidate")


def _measure(schedules, target, builder, runner) -> list:
    """Build and run schedules with MetaSchedule's builder and runner: seconds per run or None."""
    ms = meta_schedule()
    built = builder.build([ms.builder.BuilderInput(s.mod, target) for s in schedules])
    inputs, index = [], []
    for i, (s, b) in enumerate(zip(schedules, built)):
        if b.error_msg is not None:
            warnings.warn(f"default schedule of task {i} did not build: {b.error_msg.strip().splitlines()[-1][:300]}",
                          TuningWarning, stacklevel=3)
        else:
            inputs.append(ms.runner.RunnerInput(b.artifact_path,
                                                device_type="cpu" if target.kind.name == "llvm" else target.kind.name,
                                                args_info=ms.arg_info.ArgInfo.from_prim_func(s.mod["main"])))
            index.append(i)
    secs = [None] * len(schedules)
    for i, fut in zip(index, runner.run(inputs)):
        res = fut.result()
        if res.error_msg is not None:
            warnings.warn(f"default schedule of task {i} did not run: {res.error_msg.strip().splitlines()[-1][:300]}",
                          TuningWarning, stacklevel=3)
        elif res.run_secs:
            secs[i] = [float(v) for v in res.run_secs]
    for b in built:
        if b.artifact_path and os.path.exists(b.artifact_path):
            os.remove(b.artifact_path)
    return secs


def _require_local_gpu() -> None:
    """A GPU target measured locally needs a CUDA device here (else: rpc_tracker or runner=)."""
    if not tvm.cuda(0).exist:
        raise TuningError("tuning for cuda measures on a GPU, and this machine has none: pass rpc_tracker= and "
                          "rpc_key= of a GPU host's RPC server, or a MetaSchedule runner=")


def _make_runner(rpc_tracker, rpc_key, threads, timeout):
    ms = meta_schedule()
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator)
    host, sep, port = str(rpc_tracker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"rpc_tracker must be 'host:port', got {rpc_tracker!r}")
    if not rpc_key:
        raise ConfigError("rpc_key is required with rpc_tracker (the key the device's RPC server registered)")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                 session_timeout_sec=timeout)
    runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)
    # TVM's RPCRunner measures in a worker pool without a timeout: once the device's server drops
    # out, the tracker request in the worker blocks forever and so does tuning. With a timeout the
    # worker is killed and the measurement reported as failed, like any other failed candidate.
    from tvm.support.popen_pool import PopenPoolExecutor

    runner.pool = PopenPoolExecutor(max_workers=1, timeout=timeout)
    return runner


def _progress_callback(total: int, tasks: list, enabled: bool):
    """A measure callback that drives a tqdm bar showing the weighted best latency so far."""
    ms = meta_schedule()
    from tqdm.auto import tqdm

    @tvm.ir.utils.derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.bar = tqdm(total=total, desc="tuning", unit="trial", disable=not enabled)
            self.best = {}
            self.count = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for res in runner_results:
                if res.error_msg is None and res.run_secs:
                    ms_ = 1e3 * sum(float(v) for v in res.run_secs) / len(res.run_secs)
                    self.best[task_id] = min(self.best.get(task_id, float("inf")), ms_)
            self.count += len(measure_candidates)
            model = sum(len(tasks[i][1]) * v for i, v in self.best.items())
            self.bar.set_postfix_str(f"best kernels total {model:.3f} ms")
            self.bar.update(len(measure_candidates))

    return Progress()


def tune(onnx_model, target="llvm", work_dir: str = "psb_tuning", trials: int = 256, samples: int = 8,
         seed: int = 0, input_shapes: dict | None = None, calibration=None, config=None, frozen: bool = False,
         trials_per_task: int | None = None, num_threads: int | None = None, rpc_tracker: str | None = None,
         rpc_key: str | None = None, timeout: float = 30.0, progress: bool = True,
         lowerings: tuple = ("intdot",), builder=None, runner=None) -> TuneResult:
    """Tune the kernels ``compile`` would build for this model and target; resumable.

    ``trials`` is the total number of measured candidates in ``work_dir``'s database: a second
    call with the same ``work_dir`` only runs the remainder. ``num_threads`` (default: the
    target's ``num-cores``, else this machine's cores) is the thread count the kernels are timed
    with and must be the one they will run with. ``rpc_tracker="host:port"`` and ``rpc_key``
    measure on a remote device registered with TVM's RPC tracker. The model arguments are those
    of ``compile``; use the same ones there with ``tuning_db=work_dir``. ``lowerings``: with more
    than one, every layer's kernel is tuned in each and the fastest is recorded per layer; a
    compile with ``lowering="auto"`` (the default) and this ``tuning_db`` then uses it.

    Faults do not abort a run: a candidate that fails to build or run, or times out (``timeout``
    seconds, per build and per measurement), or a dropped RPC server is recorded as a failed
    trial and the search goes on; a task whose default schedule could not be measured warns
    (``TuningWarning``) and keeps its default schedule at compile time. ``builder`` / ``runner``:
    MetaSchedule ``Builder`` / ``Runner`` objects replacing the local builder and the local or RPC
    runner (a build farm, a custom device session).

    ``target="cuda"`` tunes the PSB kernels only (the float glue keeps TVM's GPU rules) and
    measures on a GPU: locally if this machine has one, else through ``rpc_tracker`` / ``runner``
    (without either it raises ``TuningError``); ``num_threads`` then only sizes the builder.
    """

    if not is_int(trials) or trials < 0:
        raise ConfigError(f"trials must be a non-negative int, got {trials!r}")
    for name, value in (("num_threads", num_threads), ("trials_per_task", trials_per_task)):
        if value is not None and (not is_int(value) or value < 1):
            raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
    if not is_real(timeout) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    progress = check_flag("progress", progress)

    cfg = PSBConfig.coerce(config)
    candidates = tuple(dict.fromkeys(lowerings or ("intdot",)))
    bad = [l for l in candidates if l not in LOWERINGS]
    if bad:
        raise ConfigError(f"lowerings {bad} unknown; expected some of {LOWERINGS}")
    if cfg.lowering != "auto":  # the user fixed the lowering: nothing to pick
        candidates = (cfg.lowering,)
    lowered = {low: lower(onnx_model, target, samples, seed, input_shapes, calibration,
                          dataclasses.replace(cfg, lowering=low), frozen) for low in candidates}
    tgt = next(iter(lowered.values()))[2]
    gpu = tgt.kind.name == "cuda"
    if tgt.kind.name not in ("llvm", "cuda"):
        raise TuningError(f"tuning supports CPU (llvm) and CUDA targets; got {tgt.kind.name!r}")
    if gpu and rpc_tracker is None and runner is None:
        _require_local_gpu()
    # CPU: the kernels' thread count (timed with it, part of the target); GPU: builder processes
    threads = int(num_threads or tgt.attrs.get("num-cores", 0) or os.cpu_count() or 1)
    if not gpu:
        tgt = _with_threads(tgt, threads)
    os.makedirs(work_dir, exist_ok=True)
    manifest = read_manifest(work_dir) or {"target": target_key(tgt), "num_threads": None if gpu else threads,
                                            "tasks": {}}
    if manifest["target"] != target_key(tgt):
        raise TuningError(f"{work_dir} holds tuning for target {manifest['target']}, not {target_key(tgt)}; "
                          "use another work_dir")
    if not gpu and manifest.get("num_threads") != threads:
        raise TuningError(f"{work_dir} was tuned with {manifest.get('num_threads')} threads, not {threads}; "
                          "use the same num_threads or another work_dir")
    tasks, layer_tasks = [], {}
    for low, (mod, md, _) in lowered.items():
        # GPU: only the PSB kernels are tasks (the float glue gets TVM's GPU rules at build)
        legal = mod if gpu else legalize(mod, tgt)
        kernels = _layer_kernels(legal, md)
        for wl, names in extract_tasks(legal, psb_only=gpu):
            for existing, known in tasks:
                if tvm_ffi.structural_equal(existing, wl):
                    known.extend(n for n in names if n not in known)
                    wl = existing
                    break
            else:
                tasks.append((wl, list(names) if low == candidates[0] else [f"{n}[{low}]" for n in names]))
            for layer, kernel in kernels.items():
                if kernel in names:
                    layer_tasks.setdefault(layer, {})[low] = wl
    if not tasks:
        raise TuningError("the model has no tunable kernels")
    ms = meta_schedule()
    start = time.time()
    with _env("TVM_NUM_THREADS", str(threads)):
        database = open_json_database(work_dir)
        builder = builder or _make_builder(threads, timeout)
        runner = runner or _make_runner(rpc_tracker, rpc_key, threads, timeout)
        # 1. the default schedule of every task not in the database yet, measured and stored.
        todo = [(wl, names) for wl, names in tasks if not database.has_workload(wl)]
        if todo:
            scheds = [_default_trace(wl, tgt) for wl, _ in todo]
            measured = [(wl, names, s) for (wl, names), s in zip(todo, scheds) if s is not None]
            secs = _measure([s for _, _, s in measured], tgt, builder, runner) if measured else []
            for (wl, names, sch), run_secs in zip(measured, secs):
                entry = database.commit_workload(wl)
                if run_secs is not None:
                    database.commit_tuning_record(ms.database.TuningRecord(
                        sch.trace, entry, run_secs,
                        tgt, ms.arg_info.ArgInfo.from_prim_func(wl["main"])))
                manifest["tasks"][str(tvm_ffi.structural_hash(wl))] = {
                    "kernels": names, "default_ms": None if run_secs is None else 1e3 * sum(run_secs) / len(run_secs)}
        done = sum(t.get("trials", 0) for t in manifest["tasks"].values())
        remaining = max(0, trials - done)
        if remaining:
            contexts = [ms.TuneContext(mod=wl, target=tgt, space_generator="post-order-apply",
                                       search_strategy="evolutionary", task_name=names[0],
                                       rand_state=seed + i, num_threads=threads).clone()
                        for i, (wl, names) in enumerate(tasks)]
            counter = _progress_callback(remaining, tasks, progress)
            cost_model = ms.cost_model.XGBModel(num_tuning_cores=threads)
            ms.tune_tasks(tasks=contexts, task_weights=[float(len(n)) for _, n in tasks], work_dir=work_dir,
                          max_trials_global=remaining, max_trials_per_task=trials_per_task or remaining,
                          num_trials_per_iter=min(32, remaining), builder=builder, runner=runner,
                          database=database, cost_model=cost_model,
                          measure_callbacks=ms.MeasureCallback.create("default") + [counter])
            counter.bar.close()
            # credit the trials to the tasks (the gradient scheduler picks which task runs)
            per_task = _records_per_task(database, tasks)
            for wl, names in tasks:
                key = str(tvm_ffi.structural_hash(wl))
                manifest["tasks"].setdefault(key, {"kernels": names, "default_ms": None})
                manifest["tasks"][key]["trials"] = per_task[key]
        manifest["trials_total"] = sum(t.get("trials", 0) for t in manifest["tasks"].values())
        if len(candidates) > 1:  # the measured pick: fastest tuned kernel per layer
            timing = {layer: {low: best_ms(database, wl) for low, wl in per.items()} for layer, per in layer_tasks.items()}
            manifest["lowering_ms"] = timing
            manifest["lowerings"] = {layer: min((ms, low) for low, ms in t.items() if ms is not None)[1]
                                     for layer, t in timing.items() if any(v is not None for v in t.values())}
        _write_manifest(work_dir, manifest)
    reports = []
    for wl, names in tasks:
        key = str(tvm_ffi.structural_hash(wl))
        info = manifest["tasks"].get(key, {})
        reports.append(TaskReport(names[0], names, info.get("default_ms"), best_ms(database, wl), info.get("trials", 0)))
    return TuneResult(os.path.abspath(work_dir), str(tgt), threads, manifest["trials_total"] - done,
                      manifest["trials_total"], time.time() - start, reports)


def _layer_kernels(mod: tvm.IRModule, metadata) -> dict:
    """PSB layer name -> the name of its layer kernel in the legalized module (layers of one shape
    share one: ``RewriteToPSB`` records which in the module attribute ``ATTR_LAYER_KERNELS``)."""
    ids = {l["layer_id"]: l["name"] for l in metadata.layers if l.get("status") == "psb"}
    table = (mod.attrs or {}).get(ATTR_LAYER_KERNELS, {})
    names = {gv.name_hint for gv, func in mod.functions.items()
             if isinstance(func, tirx.PrimFunc) and (func.attrs or {}).get(ATTR_KIND) in ("conv2d", "dense")}
    out = {}
    for lid, name in ids.items():
        kernel = str(table.get(str(lid), {}).get("psb", ""))
        if kernel in names:
            out[name] = kernel
    return out


def _records_per_task(database, tasks) -> dict:
    """Measured search candidates per task (all records minus the stored default schedule)."""
    counts = {}
    for wl, _ in tasks:
        key = str(tvm_ffi.structural_hash(wl))
        recs = database.get_top_k(database.commit_workload(wl), 1 << 30) if database.has_workload(wl) else []
        counts[key] = max(0, len(recs) - 1)
    return counts


