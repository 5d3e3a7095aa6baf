"""``psb_tvm.compile``: frontend -> layer selection -> calibration -> PSB rewrite -> build."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import tvm

from . import checks, module_cache, numerics
from .abi import ATTR_INT8_HANDOFFS
from .build import build, build_objects_and_link
from .calibration import choose_width, collect_stats, normalize_calibration
from .config import PSBConfig
from .errors import ConfigError
from .frontend import from_relax, import_onnx
from .metadata import ModuleMetadata
from .passes import PSBLayer, find_layer_sites, name_sites, select_layers
from .pipeline import rewrite_passes
from .progress import CompileProgress, stage, tracking
from .runtime import PSBModule, load
from .schedules.kernels import KernelSpec
from .target import is_host_cpu, resolve_target
from .tuning_db import lowering_choices

__version__ = "0.1.0"
LOG = logging.getLogger("psb_tvm")


def _check_args(samples, seed, config) -> PSBConfig:
    config = PSBConfig.coerce(config)
    try:
        for n in (samples.values() if isinstance(samples, dict) else [samples]):
            numerics.check_samples(n, config.n_max)
        numerics.check_seed(seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config


def _default_samples(samples, names: list) -> tuple[int, list]:
    """(default n, per-PSB-layer n) from an int or ``{"layer": n, ..., "default": n}``."""
    if not isinstance(samples, dict):
        return int(samples), [int(samples)] * len(names)
    unknown = sorted(set(samples) - set(names) - {"default"})
    if unknown:
        raise ConfigError(f"samples names unknown or non-PSB layers {unknown}; the PSB layers are {names}")
    per_layer = [int(samples.get(n, samples.get("default", 16))) for n in names]
    return int(samples.get("default", max(per_layer, default=16))), per_layer


def _spec(site, lowering, config, act_bits, frac_bits, signed, gpu: bool, threshold_dtype: str = "int32") -> KernelSpec:
    common = dict(kind=site.kind, lowering=lowering, w_shape=tuple(site.weight.shape), n_max=config.n_max,
                  layer=site.index, E=config.E, P=config.P, act_bits=act_bits, act_signed=signed,
                  frac_bits=frac_bits, activation=site.activation, gpu=gpu, sampler=config.sampler,
                  threshold_dtype=threshold_dtype)
    shape = tuple(int(v) for v in site.data.ty.shape.values)
    if site.kind == "dense":
        rows = int(np.prod(shape[:-1]))
        return KernelSpec(x_shape=(rows, shape[-1]), **common)
    attrs = site.call.attrs
    pad = [int(p) for p in attrs.padding]
    return KernelSpec(x_shape=shape, stride=tuple(int(s) for s in attrs.strides),
                      padding=(pad[0], pad[1], pad[2], pad[3]), dilation=tuple(int(d) for d in attrs.dilation),
                      groups=int(attrs.groups), **common)


def compile(onnx_model, target="llvm", samples: int | dict = 16, seed: int = 0, input_shapes: dict | None = None,
            calibration=None, config: PSBConfig | dict | None = None, frozen: bool = False,
            tuning_db=None, cache=None, progress: bool | None = None) -> PSBModule:
    """Compile an ONNX model (path, bytes or ModelProto) into a PSB module.

    ``samples`` is the default sample count n (a power of two <= ``config.n_max``; ``run`` may pick
    another per call and per layer), or a per-layer map ``{"layer name": n, "default": n}`` (e.g.
    ``psb_tvm.allocate(...).samples``) baked in as the default of ``run(samples=None)``; ``seed``
    the default draw; ``input_shapes`` fixes dynamic input dims; ``calibration`` is ``{input: array [N, ...]}``
    (or an iterable of such dicts) used
    to choose the activation scales. ``frozen=True`` bakes the draw for (samples, seed) into
    constants: no sampling at run time, but n and seed are then fixed. ``tuning_db`` is the
    ``work_dir`` of ``psb_tvm.tune`` (or a MetaSchedule database): its schedules are reapplied
    without retuning; kernels it does not cover get the default schedules. ``cache``: where
    compiled host-CPU modules are kept (``psb_tvm.module_cache``: machine code generated here, not
    on the first call; a repeated compile loads it); ``False`` keeps the module in memory only.
    ``progress``: a bar of the stages (``None``: on a terminal only). The stage timings are logged
    (logger ``psb_tvm``, INFO) and kept as ``module.compile_seconds``; a compile running longer
    than a minute logs (WARNING) which stage and TVM pass it is in, every minute.
    """
    # The arguments only compile takes (ConfigError naming the argument) and the target, which the
    # tuning database is read for; plan checks the rest (input shapes, calibration, config).
    frozen = checks.check_flag("frozen", frozen)
    samples = checks.check_sample_map(samples)
    tuning_db = checks.check_tuning_db(tuning_db)
    target = checks.check_target(target)
    choices = lowering_choices(tuning_db, resolve_target(target)) if tuning_db is not None else None
    progress = CompileProgress(bar=progress)
    try:
        with tracking(progress):
            module = _compile(onnx_model, target, samples, seed, input_shapes, calibration, config, frozen, tuning_db,
                              cache, choices, progress)
            with stage("weights"):  # the default draw's weights: the first run costs what later ones do
                module.prepare()
    finally:
        seconds = progress.close()
    module.compile_seconds = seconds
    module.compile_kernels = progress.kernels
    LOG.info("compile: %.1f s in all (%s)", seconds["total"],
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total"))
    return module


def _compile(onnx_model, target, samples, seed, input_shapes, calibration, config, frozen, tuning_db, cache, choices,
             progress) -> PSBModule:
    mod, metadata, tgt = lower(onnx_model, target, samples, seed, input_shapes, calibration, config, frozen, choices)
    directory = module_cache.cache_dir(cache) if is_host_cpu(tgt) else None
    key = module_cache.module_key(mod, tgt, metadata, tuning_db) if directory is not None else None
    if key is not None:
        hit = module_cache.lookup(directory, key)
        if hit is not None:
            LOG.info("compile: module cache hit %s", hit)
            with stage("codegen"):
                return load(hit)
    if key is not None and module_cache.writable(directory):
        # Kernels generated in parallel (and reused) as object files, linked into the cache's .so
        # and loaded from there: machine code now, not on the first call.
        with stage("build"), progress.passes():
            executable, linked, objects, stats = build_objects_and_link(
                mod, tgt, module_cache.kernel_dir(directory), tuning_db=tuning_db, metadata=metadata, progress=progress)
        progress.kernels = stats
        with stage("codegen"):
            stored = module_cache.store(directory, key, PSBModule(executable, linked, executable=executable,
                                                                  objects=objects).export_library)
            if stored is not None:
                return load(stored)
    with stage("build"), progress.passes():
        executable, metadata = build(mod, tgt, tuning_db=tuning_db, metadata=metadata)
    return PSBModule(executable, metadata, executable=executable)


def default_lowering(target) -> str:
    """The cost rule behind ``lowering="auto"`` when nothing was measured: ``intdot`` everywhere.

    Measured here (2-thread Zen 4, 64-channel 3x3 conv at 56x56, n = 1 and 2): intdot 1.6-7 ms,
    bitserial 16-22 ms, shiftadd 26-39 ms; dense 512->1000: 0.2-0.6 / 11-14 / 0.4-1.2 ms. Every CPU
    and GPU target has integer multiply-add units, so the integer dot product wins at every n;
    ``tune(..., lowerings=(...))`` measures the alternatives per layer when in doubt.
    """
    return "intdot"


def _lowering(site, config: PSBConfig, choices: dict | None, target) -> tuple[str, str]:
    """(lowering, where the choice came from) for one layer."""
    explicit = config.lowerings.get(site.name, "auto")
    if explicit == "auto":
        explicit = config.lowering
    if explicit != "auto":
        return explicit, "config"
    if choices and site.name in choices:
        return choices[site.name], "measured (tuning_db)"
    return default_lowering(target), "cost rule"


@dataclass
class Plan:
    """Everything decided before the PSB rewrite: the imported model, its linear layer sites, which
    become PSB (``reasons[i] == ""``), their encoded weights and activation scales (``layers``)."""

    imported: object
    sites: list
    reasons: dict
    layers: list
    info: dict
    stats: list
    fallback: bool
    config: PSBConfig
    target: object
    input_ranges: dict = None  # {float input: [min, max]} over the user's calibration data


def plan(onnx_model, target="llvm", seed: int = 0, input_shapes: dict | None = None, calibration=None,
         config: PSBConfig | dict | None = None, lowering_choices: dict | None = None) -> Plan:
    """Import, select layers, calibrate and encode the weights (no code is generated). The entry of
    ``compile``, ``tune``, ``diagnose`` and ``allocate``: every public argument is checked here.

    ``onnx_model`` may also be a Relax ``IRModule`` you imported yourself (``frontend.from_relax``):
    the plan's ``layers`` then feed ``pipeline.rewrite_passes`` in your own pipeline."""
    input_shapes = checks.check_input_shapes(input_shapes)
    calibration = checks.check_calibration(calibration)
    target = checks.check_target(target)
    config = PSBConfig.coerce(config)
    try:
        numerics.check_seed(seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tgt = resolve_target(target)
    if isinstance(onnx_model, tvm.IRModule):
        if input_shapes:
            raise ConfigError("input_shapes applies to ONNX models; a Relax module's shapes are fixed by its import")
        imported = from_relax(onnx_model)
    else:
        with stage("import"):
            imported = import_onnx(onnx_model, input_shapes)
    sites = find_layer_sites(imported.mod["main"])
    name_sites(sites, imported.layer_names)
    reasons = select_layers(sites, config)
    chosen = [s for s in sites if not reasons[s.index]]

    batches, fallback = [], False
    with stage("calibration"):
        if chosen:  # an all-float module needs no activation scales (and no fallback warning)
            batches, fallback = normalize_calibration(calibration, imported.inputs, config.calibration_fallback_samples,
                                                      seed)
        stats = collect_stats(imported, chosen, batches)

    layers, info, encoded = [], {}, {}
    unknown = sorted(set(config.layer_act_bits) - {s.name for s in sites})
    if unknown:
        raise ConfigError(f"config.layer_act_bits names unknown layers {unknown}; the model's linear layers are "
                          f"{[s.name for s in sites]}")
    with stage("encode"):
        for site, st in zip(chosen, stats):
            act_bits, frac = choose_width(st, config.layer_act_bits.get(site.name, config.act_bits), config.act_range,
                                          config.act_percentile, config.act_headroom, config.act_auto_error)
            _warn_range(site.name, st, config, act_bits)
            lowering, lowering_source = _lowering(site, config, lowering_choices, tgt)
            enc, flushed = _encode(site, config, frac, encoded)
            _check_scale_range(site.name, enc, frac, config.n_max)
            spec = _spec(site, lowering, config, act_bits, frac, st.signed, gpu=tgt.kind.name == "cuda",
                         threshold_dtype="uint16" if int(enc.threshold.max(initial=0)) < 1 << 16 else "int32")
            bias = site.bias if site.bias is not None else np.zeros(site.weight.shape[0], np.float32)
            layers.append(PSBLayer(site.index, site.name, spec, enc, numerics.output_scale(enc.k_lo, frac, 1),
                                   bias.astype(np.float32)))
            info[site.index] = {"lowering": lowering, "lowering_source": lowering_source,
                                # the integer weights' layout in the kernel; "vnni": packed for vpdpbusd /
                                # sdot, "dp4a": the same packing for CUDA's __dp4a
                                "weight_layout": spec.weight_layout if lowering == "intdot" else lowering,
                                "frac_bits": frac, "act_dtype": spec.act_dtype,
                                "acc_dtype": spec.acc_dtype, "q_dtype": spec.q_dtype, "act_max_abs": st.max_abs,
                                "threshold_dtype": spec.threshold_dtype,
                                "act_bits": act_bits,
                                # output channels encoded as zero: weights below float32's scale range
                                # (numerics.negligible_channels)
                                "negligible_channels": flushed,
                                # the |x| the fixed point holds (max or percentile, times the headroom)
                                "act_range": st.range(config.act_range, config.act_percentile, config.act_headroom),
                                # estimated on a subsample of the calibration data
                                "calibration_saturated": st.saturated_fraction(frac, act_bits),
                                "act_rounding_error": st.rounding_error(frac, act_bits),
                                "layer_id": site.index, "out_shape": list(spec.out_shape),
                                # the paper's cost: one addition per weight, sample and output position
                                "additions_per_sample": int(np.prod(spec.out_shape)) * spec.reduction_size}
    ranges = {} if fallback else {
        name: [min(float(b[name].min()) for b in batches), max(float(b[name].max()) for b in batches)]
        for name, _, dtype in imported.inputs if np.dtype(dtype).kind == "f" and batches}
    return Plan(imported, sites, reasons, layers, info, stats, fallback, config, tgt, ranges)


def _warn_range(name: str, st, config: PSBConfig, bits: int) -> None:
    """Warn, naming the layer, when its activation scale is a guess: an input that was all zeros on
    the calibration data, or a range the fixed point cannot follow (``frac_bits`` clamped)."""
    r = st.range(config.act_range, config.act_percentile, config.act_headroom)
    if r <= 0:
        warnings.warn(f"layer {name!r}: its input was 0 on all calibration data; its activation scale (frac_bits=0) is "
                      "a guess (calibrate with inputs that exercise this layer)", stacklevel=3)
        return
    unclamped = numerics.unclamped_frac_bits(r, bits, st.signed)
    if not -numerics.MAX_FRAC_BITS <= unclamped <= numerics.MAX_FRAC_BITS:
        warnings.warn(f"layer {name!r}: calibration range {r:.3g} needs frac_bits={unclamped}, clamped to "
                      f"[-{numerics.MAX_FRAC_BITS}, {numerics.MAX_FRAC_BITS}]: most inputs will saturate or round to 0 "
                      "(are the calibration inputs scaled like the real ones?)", stacklevel=3)


def _encode(site, config: PSBConfig, frac: int, memo: dict | None = None):
    """``(encoded weights, channels encoded as zero)``: the weights whose scale float32 cannot hold
    (``numerics.negligible_channels``, e.g. BatchNorm-folded dead channels) become zero.

    ``memo``: layers with the same weights share one encoding (an unrolled recurrent node's steps:
    40 steps x 2 directions of a 2048 x 512 matrix took 2 of a 17 s compile), and the rewrite then
    one copy of its constants."""
    if memo is not None:
        w = np.ascontiguousarray(site.weight)
        key = (hashlib.sha256(w.view(np.uint8)).hexdigest(), w.shape, str(w.dtype), frac)
        if key not in memo:
            memo[key] = _encode(site, config, frac)
        return memo[key]
    try:
        enc = numerics.encode_weights(site.weight, config.E, config.P, config.per_channel)
        dead = numerics.negligible_channels(enc.k_lo, frac, config.n_max)
        if dead.any():
            w = np.array(site.weight, np.float32)
            w[dead] = 0
            enc = numerics.encode_weights(w, config.E, config.P, config.per_channel)
    except ValueError as err:
        raise ConfigError(f"layer {site.name!r}: {err}") from None
    return enc, int(dead.sum())


def _check_scale_range(name: str, enc, frac: int, n_max: int) -> None:
    """The dequantisation ``acc * 2**(k_lo - f - log2 n)`` must stay in float32's normal range for
    every accumulator up to 2**31 and every n <= n_max; else outputs would be inf or 0."""
    log2n = int(n_max).bit_length() - 1
    low = int(enc.k_lo.min()) - frac - log2n
    high = int(enc.k_lo.max()) - frac + 31
    if low < numerics.MIN_SCALE_EXP or high > 127:
        raise ConfigError(f"layer {name!r}: weight exponents [{int(enc.k_lo.min())}, {int(enc.k_lo.max()) + enc.E - 1}] "
                          f"with activation frac_bits={frac} give output scales 2**{low} .. 2**{high}, outside float32's "
                          "range [2**-126, 2**127]: weights or calibration inputs far out of range")


def lower(onnx_model, target="llvm", samples: int = 16, seed: int = 0, input_shapes: dict | None = None,
          calibration=None, config: PSBConfig | dict | None = None, frozen: bool = False,
          lowering_choices: dict | None = None):
    """Everything ``compile`` does before code generation: ``(relax module, metadata, target)``
    (the metadata is attached to the module by ``build``, once it knows the schedules).

    ``tune`` uses it so that tuning sees exactly the PrimFuncs that ``compile`` will build.
    """
    config = _check_args(samples, seed, config)
    p = plan(onnx_model, target, seed, input_shapes, calibration, config, lowering_choices)
    return lower_plan(p, samples, seed, frozen)


def lower_plan(p: Plan, samples: int | dict = 16, seed: int = 0, frozen: bool = False):
    """The PSB rewrite and metadata of a :func:`plan`: ``(relax module, metadata, target)``."""
    config, tgt, imported, sites, reasons, layers = p.config, p.target, p.imported, p.sites, p.reasons, p.layers
    _check_args(samples, seed, config)
    info = {i: {**v, "prepacked": bool(frozen and v["lowering"] == "intdot")} for i, v in p.info.items()}
    chosen = [s for s in sites if not reasons[s.index]]
    fallback = p.fallback
    samples, layer_samples = _default_samples(samples, [l.name for l in layers])
    frozen_draw = None
    if frozen:
        frozen_draw = {"samples": layer_samples,
                       "counts": [numerics.sample_counts(l.enc, n, seed, l.site_index, config.sampler)
                                  for l, n in zip(layers, layer_samples)]}
    with stage("rewrite"):
        mod = tvm.transform.Sequential(rewrite_passes(layers, frozen_draw))(imported.mod)
    names_by_site = {s.index: s.name for s in sites}
    for producer, consumer in (mod.attrs or {}).get(ATTR_INT8_HANDOFFS, []):
        info[int(producer)]["int8_output_to"] = names_by_site[int(consumer)]
        info[int(consumer)]["int8_input_from"] = names_by_site[int(producer)]

    names = [l.name for l in layers]
    metadata = ModuleMetadata(
        psb_tvm_version=__version__,
        source=imported.source,
        target=str(tgt),
        target_kind=tgt.kind.name,
        mtriple=str(tgt.attrs.get("mtriple", "") or ""),
        host_runnable=is_host_cpu(tgt),
        samples=int(samples),
        layer_samples=dict(zip(names, layer_samples)) if len(set(layer_samples)) > 1 else None,
        seed=int(seed),
        n_max=config.n_max,
        sampler=config.sampler,
        frozen=bool(frozen),
        psb_layers=names,
        weight_cache=bool(layers) and not frozen,
        runtime_args=[] if frozen or not layers else [
            {"name": "samples", "kind": "shape", "length": len(layers)},
            {"name": "seed", "kind": "shape", "length": 1},
        ],
        config=config.to_dict(),
        calibration="fallback (synthetic standard-normal)" if fallback else "user data" if chosen else "none",
        inputs=[{"name": n, "shape": list(s), "dtype": d} for n, s, d in imported.inputs],
        input_ranges=p.input_ranges or {},
        outputs=imported.output_names,
        layers=[
            {"name": s.name, "op": s.kind, "status": "float" if reasons[s.index] else "psb",
             "reason": reasons[s.index], "weight_shape": list(s.weight.shape) if s.weight is not None else None,
             "activation": s.activation if not isinstance(s.activation, tuple) else list(s.activation),
             "bias": s.bias is not None, **info.get(s.index, {})}
            for s in sites
        ],
    )
    return mod, metadata, tgt
