"""Activation statistics for every PSB layer input, from user calibration data or a fallback.

The fixed-point scale of each PSB layer input is ``2**f`` with the largest ``f`` that keeps the
chosen range (the largest ``|x|`` or a percentile, times a headroom) inside the activation integers
(``numerics.choose_frac_bits``). A subsample of every layer input is kept to estimate percentiles,
how much of the calibration data saturates, and the rounding error of each width.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from . import numerics
from .build import build
from .errors import ConfigError
from .passes import ExposeLayerInputs
from .target import host_target

#: The fallback when no calibration data is given: standard-normal inputs. A real input
#: distribution (images in [0, 1], tokens, audio) is usually different, hence the warning.
FALLBACK_NOTE = (
    "no calibration data given: activation scales come from {n} synthetic standard-normal inputs; "
    "accuracy will suffer. Pass calibration={{input_name: array}} with real samples."
)


#: Values of each layer input kept for percentiles and error estimates (a strided subsample).
SAMPLE_VALUES = 1 << 18


@dataclass(frozen=True)
class ActStats:
    """Observed range of one layer input and a subsample of its values."""

    max_abs: float
    min: float
    sample: np.ndarray | None = None

    @property
    def signed(self) -> bool:
        return self.min < 0

    def range(self, mode: str = "max", percentile: float = 99.99, headroom: float = 1.0) -> float:
        """The ``|x|`` the fixed point must hold: the max or a percentile, times ``headroom``."""
        r = self.max_abs
        if mode == "percentile" and self.sample is not None and self.sample.size:
            r = min(r, float(np.percentile(np.abs(self.sample), percentile)))
        return r * headroom

    def saturated_fraction(self, frac_bits: int, bits: int) -> float:
        """Fraction of the calibration values (estimated on the subsample) outside the integer range."""
        if self.sample is None or not self.sample.size:
            return 0.0
        return float(np.mean(numerics.saturated(self.sample, frac_bits, bits, self.signed)))

    def rounding_error(self, frac_bits: int, bits: int) -> float:
        """Relative L2 error of the fixed-point values (rounding and clipping) on the subsample."""
        if self.sample is None or not self.sample.size:
            return 0.0
        x = self.sample.astype(np.float64)
        xq = numerics.quantize_activations(self.sample, frac_bits, bits, self.signed) * 2.0 ** -frac_bits
        den = float(np.sum(x * x))
        return float(np.sqrt(np.sum((xq - x) ** 2) / den)) if den > 0 else 0.0


def choose_width(stats: ActStats, bits, mode: str, percentile: float, headroom: float, max_error: float) -> tuple[int, int]:
    """``(bits, frac_bits)`` of one layer input: ``bits`` 8 / 16, or ``"auto"``: 8 when its rounding
    error on the calibration data is at most ``max_error``, else 16."""
    r = stats.range(mode, percentile, headroom)
    if bits == "auto":
        f8 = numerics.choose_frac_bits(r, 8, stats.signed)
        if stats.rounding_error(f8, 8) <= max_error:
            return 8, f8
        bits = 16
    return bits, numerics.choose_frac_bits(r, bits, stats.signed)


def normalize_calibration(calibration, inputs: list, fallback_samples: int, seed: int = 0) -> tuple[list, bool]:
    """Return (list of {name: array [N, ...]}, used_fallback); validates names and shapes."""
    names = [n for n, _, _ in inputs]
    if calibration is None:
        rng = np.random.default_rng(seed)
        batch = {}
        for name, shape, dtype in inputs:
            if np.issubdtype(np.dtype(dtype), np.floating):
                batch[name] = rng.standard_normal((fallback_samples,) + tuple(shape[1:])).astype(dtype)
            else:
                batch[name] = np.zeros((fallback_samples,) + tuple(shape[1:]), dtype)
        warnings.warn(FALLBACK_NOTE.format(n=fallback_samples), stacklevel=3)
        return [batch], True
    if isinstance(calibration, np.ndarray):  # the single input's samples, stacked on axis 0
        if len(names) != 1:
            raise ConfigError(f"calibration is one array but the model has {len(names)} inputs {names}; "
                              "pass a dict {input name: array}")
        calibration = {names[0]: calibration}
    if isinstance(calibration, Mapping):
        batches = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, np.ndarray)):
        batches = list(calibration)
    else:
        raise ConfigError("calibration must be an array (single-input models), a dict {input name: array} or an "
                          f"iterable of such dicts, got {type(calibration).__name__}")
    if not batches:
        raise ConfigError("calibration is empty")
    result = []
    for k, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ConfigError(f"calibration item {k} is a {type(batch).__name__}, expected a dict {{input name: array}}")
        missing, unknown = sorted(set(names) - set(batch)), sorted(set(batch) - set(names))
        if missing or unknown:
            raise ConfigError(f"calibration item {k}: missing inputs {missing}, unknown inputs {unknown}; "
                              f"the model's inputs are {names}")
        arrays, count = {}, None
        for name, shape, dtype in inputs:
            arr = np.asarray(batch[name])
            if arr.ndim != len(shape) or tuple(arr.shape[1:]) != tuple(shape[1:]) or arr.shape[0] == 0:
                raise ConfigError(
                    f"calibration item {k}: input {name!r} has shape {arr.shape}; expected (N, {', '.join(map(str, shape[1:]))}) "
                    f"with samples stacked on the first axis (model input shape {tuple(shape)})"
                )
            if count is not None and arr.shape[0] != count:
                raise ConfigError(f"calibration item {k}: inputs have different sample counts ({count} vs {arr.shape[0]})")
            count = arr.shape[0]
            arr = arr.astype(dtype, copy=False)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = np.argwhere(~np.isfinite(arr))
                samples = np.unique(bad[:, 0])
                raise ConfigError(f"calibration item {k}: input {name!r} has {len(bad)} non-finite value(s) (first "
                                  f"{arr[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}) in {len(samples)} of "
                                  f"{count} sample(s), e.g. sample {int(samples[0])}; calibration data must be finite")
            arrays[name] = arr
        result.append(arrays)
    return result, False


def collect_stats(mod: tvm.IRModule, site_indices: list[int], batches: list, inputs: list) -> list[ActStats]:
    """Run the float model on the calibration data and record each site's input range."""
    if not site_indices:
        return []
    probe = ExposeLayerInputs(site_indices)(mod)
    vm = relax.VirtualMachine(build(probe, host_target())[0], tvm.cpu())
    max_abs = np.zeros(len(site_indices))
    mins = np.full(len(site_indices), np.inf)
    samples = [[] for _ in site_indices]
    for batch in batches:
        count = next(iter(batch.values())).shape[0]
        model_batch = inputs[0][1][0]
        for start in range(0, count, model_batch):
            idx = np.arange(start, start + model_batch) % count  # wrap: repeated samples add no range
            args = [tvm.runtime.tensor(np.ascontiguousarray(batch[name][idx]), tvm.cpu()) for name, _, _ in inputs]
            outs = vm["main"](*args)
            for i in range(len(site_indices)):
                x = outs[i].numpy()
                max_abs[i] = max(max_abs[i], float(np.abs(x).max()))
                mins[i] = min(mins[i], float(x.min()))
                flat = x.reshape(-1)
                samples[i].append(flat[:: max(1, flat.size // (SAMPLE_VALUES // 8))].astype(np.float32))
    rng = np.random.default_rng(0)
    stats = []
    for a, m, parts in zip(max_abs, mins, samples):
        sample = np.concatenate(parts)
        if sample.size > SAMPLE_VALUES:
            sample = rng.choice(sample, SAMPLE_VALUES, replace=False)
        stats.append(ActStats(float(a), float(m), sample))
    return stats
