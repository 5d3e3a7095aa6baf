"""Activation statistics for every PSB layer input, from user calibration data or a fallback.

The fixed-point scale of each PSB layer input is ``2**f`` with the largest ``f`` that keeps the
chosen range (the largest ``|x|`` or a percentile, times a headroom) inside the activation integers
(``numerics.choose_frac_bits``). A subsample of every layer input is kept to estimate percentiles,
how much of the calibration data saturates, and the rounding error of each width.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

try:
    import onnxruntime as ort
except ImportError:  # optional: without it calibration builds a float TVM probe
    ort = None

from . import numerics
from .build import build
from .errors import ConfigError
from .onnx_rewrite import static_shapes
from .passes import ExposeLayerInputs, find_layer_sites
from .target import host_target

#: The fallback when no calibration data is given: standard-normal inputs. A real input
#: distribution (images in [0, 1], tokens, audio) is usually different, hence the warning.
LOG = logging.getLogger("psb_tvm")

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


def collect_stats(imported, sites: list, batches: list) -> list[ActStats]:
    """Run the float model on the calibration data and record the input range of each of ``sites``
    (``LayerSite``s of ``imported.mod``).

    In ONNX Runtime when every site's input is a tensor of the imported ONNX model (seconds: nothing
    is compiled); else in a float TVM module whose ``main`` returns the sites' inputs
    (``ExposeLayerInputs``: built, so it costs a compile). Both record the same statistics.
    """
    if not sites:
        return []
    tensors = onnx_layer_tensors(imported, sites)
    if tensors is not None and ort is not None:
        sizes = [int(np.prod([int(d) for d in s.data.ty.shape.values])) for s in sites]
        dtypes = [np.dtype(str(s.data.ty.dtype)) for s in sites]
        try:
            stats = _accumulate(_ort_runner(imported.proto, tensors, sizes, dtypes, imported.inputs), len(sites),
                                batches, imported.inputs)
        except Exception as err:  # noqa: BLE001 - ORT rejects some models TVM imports (e.g. > 2 GiB)
            LOG.info("calibration: ONNX Runtime cannot give the layer inputs (%s); using a float TVM probe", err)
        else:
            LOG.info("calibration: %d layer inputs from ONNX Runtime", len(sites))
            return stats
    LOG.info("calibration: %d layer inputs from a float TVM probe", len(sites))
    return _accumulate(_tvm_runner(imported.mod, [s.index for s in sites]), len(sites), batches, imported.inputs)


def onnx_layer_tensors(imported, sites: list) -> list | None:
    """The ONNX tensor that is each site's input, or ``None`` when one cannot be named for sure:
    the i-th site of a kind is the i-th linear node of that kind (as ``name_sites`` pairs them), and
    the tensor must hold as many values as the site's input."""
    if imported.proto is None:
        return None
    all_sites = find_layer_sites(imported.mod["main"])
    position = {s.index: sum(t.kind == s.kind for t in all_sites if t.index < s.index) for s in all_sites}
    counts = {kind: sum(t.kind == kind for t in all_sites) for kind in {t.kind for t in all_sites}}
    shapes = _value_sizes(imported.proto)
    names = []
    for site in sites:
        listed = imported.layer_inputs.get(site.kind, [])
        if len(listed) != counts[site.kind]:
            return None
        name = listed[position[site.index]]
        size = int(np.prod([int(d) for d in site.data.ty.shape.values]))
        if name is None or shapes.get(name, size) != size:
            return None
        names.append(name)
    return names


def _value_sizes(proto) -> dict:
    """Element counts of the model's tensors whose shapes are fully known."""
    return {name: int(np.prod(shape)) for name, shape in static_shapes(proto).items()
            if all(d is not None for d in shape)}


def _ort_runner(proto, tensors: list, sizes: list, dtypes: list, inputs: list):
    """``run(arrays in input order) -> [array per tensor]`` on an ONNX Runtime session of ``proto``
    with the tensors added as graph outputs (model inputs are taken from the feed); a tensor that
    is not a float array of its site's size is an error (the caller then uses the TVM probe)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph_inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    for name, dtype in dict(zip(tensors, dtypes)).items():
        if name not in graph_inputs and name not in outputs:
            elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = [name for name in dict.fromkeys(tensors) if name not in graph_inputs]
    names = [n for n, _, _ in inputs]

    def run(arrays):
        feed = dict(zip(names, arrays))
        got = dict(zip(fetch, session.run(fetch, feed))) if fetch else {}
        got.update({n: feed[n] for n in tensors if n in graph_inputs})
        values = [np.asarray(got[name]) for name in tensors]
        for name, v, size in zip(tensors, values, sizes):
            if v.dtype.kind != "f" or v.size != size:
                raise ValueError(f"ONNX tensor {name!r} is {v.dtype} {v.shape}, the layer input has {size} floats")
        return values

    return run


def _tvm_runner(mod: tvm.IRModule, site_indices: list):
    probe = ExposeLayerInputs(site_indices)(mod)
    vm = relax.VirtualMachine(build(probe, host_target())[0], tvm.cpu())

    def run(arrays):
        outs = vm["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays])
        return [outs[i].numpy() for i in range(len(site_indices))]

    return run


def _accumulate(run, n_sites: int, batches: list, inputs: list) -> list[ActStats]:
    """Run the model chunk by chunk (its compiled batch; the last chunk wraps around: repeated
    samples add no range) and keep each site's max |x|, min and a strided subsample."""
    max_abs = np.zeros(n_sites)
    mins = np.full(n_sites, np.inf)
    samples = [[] for _ in range(n_sites)]
    for batch in batches:
        count = next(iter(batch.values())).shape[0]
        model_batch = inputs[0][1][0]
        for start in range(0, count, model_batch):
            idx = np.arange(start, start + model_batch) % count
            outs = run([np.ascontiguousarray(batch[name][idx]) for name, _, _ in inputs])
            for i in range(n_sites):
                x = outs[i]
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
