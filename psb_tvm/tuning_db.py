"""The read side of a tuning database: what ``compile(..., tuning_db=)`` needs to reapply the
schedules ``psb_tvm.tune`` found, without importing the tuner (or the compiler it drives).

A work dir holds MetaSchedule's JSON database and ``psb_tuning.json`` (the manifest: target,
trials, per-layer lowering picks). Kernels are matched by their canonical workload (:func:`canonical`).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings

import tvm

from .errors import TuningError, TuningWarning

MANIFEST = "psb_tuning.json"


def meta_schedule():
    from tvm.s_tir import meta_schedule as ms  # heavy import, only when tuning or applying

    return ms


def target_key(target: tvm.target.Target) -> dict:
    """What must match between the tuning target and the compile target."""
    attrs = target.attrs
    return {"kind": target.kind.name, "mcpu": str(attrs.get("mcpu", "") or ""),
            "mtriple": str(attrs.get("mtriple", "") or ""), "arch": str(attrs.get("arch", "") or "")}


def read_manifest(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TuningError(f"{path}: unreadable tuning manifest ({err})") from None


def open_json_database(work_dir: str):
    ms = meta_schedule()
    return ms.database.JSONDatabase(path_workload=os.path.join(work_dir, "database_workload.json"),
                                    path_tuning_record=os.path.join(work_dir, "database_tuning_record.json"),
                                    allow_missing=True)


def best_ms(database, wl) -> float | None:
    if not database.has_workload(wl):
        return None
    top = database.get_top_k(database.commit_workload(wl), 1)
    return 1e3 * sum(float(v) for v in top[0].run_secs) / len(top[0].run_secs) if top else None


def lowering_choices(tuning_db, target) -> dict | None:
    """The per-layer lowerings ``tune(..., lowerings=...)`` measured, or ``None`` (not a work dir,
    no pick recorded, or tuned for another target: then the database is ignored anyway)."""
    if not isinstance(tuning_db, (str, os.PathLike)) or not os.path.isdir(tuning_db):
        return None
    try:
        manifest = read_manifest(os.fspath(tuning_db))
    except TuningError:
        return None
    if not manifest or manifest.get("target") != target_key(target):
        return None
    return manifest.get("lowerings") or None


def open_database(tuning_db, target: tvm.target.Target):
    """The database ``compile(..., tuning_db=)`` names, or ``None`` (with a warning) if unusable."""
    ms = meta_schedule()
    if isinstance(tuning_db, ms.database.Database):
        return tuning_db
    work_dir = os.fspath(tuning_db)
    if not os.path.isdir(work_dir):
        raise TuningError(f"tuning_db {work_dir!r} is not a directory (pass the work_dir of psb_tvm.tune)")
    try:
        manifest = read_manifest(work_dir)
    except TuningError as err:
        warnings.warn(f"{err}; using the default schedules", TuningWarning, stacklevel=3)
        return None
    if manifest is not None and manifest.get("target") != target_key(target):
        warnings.warn(f"tuning_db {work_dir} was tuned for {manifest.get('target')}, not {target_key(target)}; "
                      "using the default schedules", TuningWarning, stacklevel=3)
        return None
    for name in ("database_workload.json", "database_tuning_record.json"):
        if not os.path.exists(os.path.join(work_dir, name)):
            raise TuningError(f"tuning_db {work_dir!r} has no {name} (pass the work_dir of psb_tvm.tune)")
    try:
        try:
            return open_json_database(work_dir)
        except Exception as err:  # noqa: BLE001
            if "TensorIntrin" not in str(err):
                raise
            # GPU records can name TVM's tensor-core intrinsics (wmma, mma), which must be
            # registered before their traces parse; the import takes ~30 s, so only such
            # databases pay it.
            importlib.import_module("tvm.s_tir.tensor_intrin")
            return open_json_database(work_dir)
    except Exception as err:  # noqa: BLE001 - TVM raises plain errors for corrupt JSON lines
        warnings.warn(f"tuning_db {work_dir} is unreadable ({str(err).splitlines()[-1][:200]}); "
                      "using the default schedules", TuningWarning, stacklevel=3)
        return None
