"""Type checks of public arguments: every refusal is a ``ConfigError`` naming the argument and the
value. A bool is not an int, a string is not a flag, a float is not a dimension."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .target import resolve_target


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number (int or float, Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; only ``True`` / ``False`` (or numpy bools) are flags."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_input_shapes(input_shapes) -> dict | None:
    """``None`` or ``{input name (str): sequence of positive ints}``, as ``{name: tuple of int}``."""
    if input_shapes is None:
        return None
    if not isinstance(input_shapes, Mapping):
        raise ConfigError(f"input_shapes must be a dict {{input name: shape}}, got {input_shapes!r} "
                          f"({type(input_shapes).__name__})")
    out = {}
    for name, shape in input_shapes.items():
        if not isinstance(name, str):
            raise ConfigError(f"input_shapes keys must be input names (str), got {name!r} ({type(name).__name__})")
        if isinstance(shape, np.ndarray) and shape.ndim == 1:
            shape = shape.tolist() if shape.dtype.kind in "iu" else list(shape)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise ConfigError(f"input_shapes[{name!r}] must be a tuple or list of ints, got {shape!r} "
                              f"({type(shape).__name__})")
        bad = [d for d in shape if not is_int(d) or d < 1]
        if bad:
            raise ConfigError(f"input_shapes[{name!r}] must list positive ints, got {tuple(shape)!r} "
                              f"(bad dim {bad[0]!r}, {type(bad[0]).__name__})")
        out[name] = tuple(int(d) for d in shape)
    return out


def _check_batch(batch, what: str):
    """One calibration dict with str keys and numeric arrays (lists become arrays)."""
    if not isinstance(batch, Mapping):
        raise ConfigError(f"{what} is a {type(batch).__name__}, expected a dict {{input name: array}}")
    out = {}
    for name, value in batch.items():
        if not isinstance(name, str):
            raise ConfigError(f"{what}: keys must be input names (str), got {name!r} ({type(name).__name__})")
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{what}: input {name!r} is not an array of numbers ({err})") from None
        if arr.dtype.kind not in "biuf":
            raise ConfigError(f"{what}: input {name!r} has dtype {arr.dtype} ({type(value).__name__}); "
                              "expected an array of numbers")
        out[name] = arr
    return out


def check_calibration(calibration):
    """The calibration argument with its types checked (str keys, arrays of numbers; an iterator of
    dicts is read into a list). Shapes, input names and values are checked by the calibration."""
    if calibration is None:
        return None
    if isinstance(calibration, np.ndarray):
        if calibration.dtype.kind not in "biuf":
            raise ConfigError(f"calibration has dtype {calibration.dtype}; expected an array of numbers")
        return calibration
    if isinstance(calibration, Mapping):
        return _check_batch(calibration, "calibration")
    if isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, bytearray)):
        return [_check_batch(b, f"calibration item {k}") for k, b in enumerate(calibration)]
    raise ConfigError("calibration must be an array (single-input models), a dict {input name: array} or an "
                      f"iterable of such dicts, got {calibration!r} ({type(calibration).__name__})")


def check_sample_map(samples):
    """``samples`` of ``compile``: an int, or a dict whose keys are layer names (str) or "default"."""
    if isinstance(samples, Mapping):
        bad = [k for k in samples if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"samples keys must be layer names (str) or 'default', got {bad[0]!r} "
                              f"({type(bad[0]).__name__})")
    return samples


def check_tuning_db(tuning_db):
    """``None``, a directory path (str / os.PathLike) or a MetaSchedule database."""
    if tuning_db is None or isinstance(tuning_db, (str, os.PathLike)):
        return tuning_db
    from tvm.s_tir import meta_schedule as ms

    if isinstance(tuning_db, ms.database.Database):
        return tuning_db
    raise ConfigError(f"tuning_db must be the work_dir of psb_tvm.tune (a path) or a MetaSchedule database, "
                      f"got {tuning_db!r} ({type(tuning_db).__name__})")


#: Target kinds psb_tvm builds for.
TARGET_KINDS = ("llvm", "cuda")


def check_target(target):
    """``target`` resolved to a ``tvm.target.Target`` of a kind psb_tvm builds (llvm or cuda)."""

    tgt = resolve_target(target)
    if tgt.kind.name not in TARGET_KINDS:
        raise ConfigError(f"target {target!r}: kind {tgt.kind.name!r} is not supported; "
                          f"use one of {TARGET_KINDS} (CPU or CUDA)")
    return tgt
