"""The compiled-module object: run, export to one ``.so`` with its PSB metadata inside, load back."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from . import attention
from .abi import METADATA_FUNC
from .errors import ConfigError, InputError, ModelLoadError, OutputError, TargetMismatchError
from .files import append_record, native_stderr_to_log, verify_module, write_output
from .metadata import ModuleMetadata
from .numerics import check_samples, check_seed
from .weight_cache import DEFAULT_MAX_BYTES, WeightCache

LOG = logging.getLogger("psb_tvm")

#: What ``run`` does with NaN / infinity in a float input.
NONFINITE = ("error", "propagate")


class PSBModule:
    """A compiled PSB model. ``run(*inputs)`` takes numpy arrays in the model's input order.

    Modules sampled at run time keep the weights of recent ``(samples, seed)`` configurations in
    ``weight_cache`` (LRU, ``weight_cache.max_bytes``, default 256 MiB; 0 disables it), so a
    repeated call runs only the integer network, like a frozen module. One module may be called
    from several threads: each thread gets its own virtual machine, the cache is shared.
    """

    def __init__(self, lib, metadata: ModuleMetadata | dict, executable=None, weight_cache_bytes: int = DEFAULT_MAX_BYTES,
                 objects: list | None = None):
        self._lib = lib
        self._executable = executable  # set when built in this process (export needs it)
        self._objects = list(objects or [])  # the executable's kernels, linked in at export (kernel_cache)
        self._source_path = None  # the exported .so this module was loaded from (export copies it)
        self._source_sha256 = None  # ... and its SHA-256 when loaded
        self.compile_seconds = None  # psb_tvm.compile's stage timings (None for a loaded module)
        self.compile_kernels = None  # ... and its kernels: {"kernels", "reused", "generated", "jobs", ...}
        self.metadata = ModuleMetadata.coerce(metadata)
        self._local = threading.local()  # one Relax VM per thread (a VM is not thread-safe)
        self.weight_cache = WeightCache(weight_cache_bytes)

    # ------------------------------------------------------------------ info
    @property
    def inputs(self) -> list:
        """``[(name, shape, dtype)]`` of the compiled model."""
        return [(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.metadata.inputs]

    @property
    def layers(self) -> list:
        """Per linear layer: name, op, status ("psb" or "float"), reason, lowering, activation scale."""
        return self.metadata.layers

    @property
    def samples(self) -> int:
        return self.metadata.samples

    def report(self) -> str:
        """A table of which layers became PSB and why the others stayed float."""
        rows = [("layer", "op", "status", "lowering", "frac bits", "act", "note")]
        for l in self.layers:
            # where activations stay integer between two layers (HandOffInt8Activations)
            handoff = "; ".join(t for t in (f"int8 from {l['int8_input_from']}" if l.get("int8_input_from") else "",
                                            f"int8 to {l['int8_output_to']}" if l.get("int8_output_to") else "") if t)
            rows.append((l["name"], l["op"], l["status"], l.get("lowering") or "-",
                         str(l.get("frac_bits", "-")), l.get("act_dtype") or "-", l.get("reason") or handoff))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        psb = sum(l["status"] == "psb" for l in self.layers)
        per_layer = self.metadata.layer_samples
        n_text = f"n={self.samples}" if not per_layer else "n per layer " + ", ".join(f"{k}={v}" for k, v in per_layer.items())
        lines.append(f"{psb} of {len(self.layers)} linear layers are PSB ({n_text}, seed={self.metadata.seed})")
        clipped = [f"{l['name']} {100 * l['calibration_saturated']:.2g}%" for l in self.layers
                   if l.get("calibration_saturated")]
        if clipped:
            lines.append("calibration inputs outside the fixed-point range (saturated): " + ", ".join(clipped))
        return "\n".join(lines)

    # ------------------------------------------------------------------ run
    def _machine(self):
        vm = getattr(self._local, "vm", None)
        if vm is None:
            import tvm
            from tvm import relax

            if self.metadata.target_kind != "llvm" or not self.metadata.host_runnable:
                raise TargetMismatchError(f"this module was built for {self.metadata.target}; it cannot run on this "
                                          "host CPU (export it and run it there, e.g. with psb_run)")
            vm = self._local.vm = relax.VirtualMachine(self._lib, tvm.cpu())
        return vm

    def _check_inputs(self, arrays, extrema: list | None = None) -> list:
        expected = self.inputs
        if len(arrays) != len(expected):
            names = [n for n, _, _ in expected]
            raise InputError(f"expected {len(expected)} input(s) {names}, got {len(arrays)}")
        checked = []
        for arr, (name, shape, dtype) in zip(arrays, expected):
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.dtype(dtype):
                raise InputError(f"input {name!r}: expected dtype {dtype}, got {arr.dtype}")
            if tuple(arr.shape) != shape:
                raise InputError(f"input {name!r}: expected shape {shape}, got {tuple(arr.shape)}")
            # min and max: NaN or infinity shows in them (NaN propagates), and they are the range
            # _check_range compares with the calibration: one pass each, no temporary
            lo, hi = (float(arr.min()), float(arr.max())) if arr.dtype.kind == "f" and arr.size else (0.0, 0.0)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise InputError(f"input {name!r}: non-finite value {arr[bad]} at index {bad} (pass "
                                 "nonfinite='propagate' to get NaN outputs for such batch items instead)")
            if extrema is not None:
                extrema.append((lo, hi) if arr.dtype.kind == "f" and arr.size else None)
            checked.append(np.ascontiguousarray(arr))
        return checked

    def _check_range(self, extrema) -> None:
        """Warn (once per input and direction) when an input lies far outside the range it was
        calibrated on: beyond 2x, the first layers saturate; below 1/64, they use a few codes
        only. Either way the output degrades without any error, e.g. when the calibration data
        was scaled 0..255 and the inputs 0..1. ``extrema``: per input, its (min, max) from
        ``_check_inputs`` (None for non-float or empty inputs)."""
        ranges = self.metadata.input_ranges or {}
        warned = self.__dict__.setdefault("_range_warned", set())
        for seen, (name, _, _) in zip(extrema, self.inputs):
            if name not in ranges or seen is None:
                continue
            lo, hi = ranges[name]
            cal = max(abs(lo), abs(hi))
            peak = max(abs(seen[0]), abs(seen[1]))
            if not cal:
                continue
            for kind, far in (("above", peak > 2 * cal), ("below", 0 < peak < cal / 64)):
                if far and (name, kind) not in warned:
                    warned.add((name, kind))
                    effect = ("the first PSB layers saturate" if kind == "above"
                              else "the first PSB layers resolve it with a few integer codes only")
                    warnings.warn(f"input {name!r}: max |x| = {peak:.3g} is far {kind} the calibration range "
                                  f"[{lo:.3g}, {hi:.3g}]; {effect} (calibrate with inputs scaled like these)",
                                  stacklevel=4)

    def _nonfinite_items(self, inputs, nonfinite: str):
        """For ``nonfinite="propagate"``: ``(inputs with non-finite values set to 0, batch items
        that had any)``; items are indexed along the first axis (all of it for a scalar input)."""
        if nonfinite not in NONFINITE:
            raise ConfigError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if nonfinite == "error":
            return list(inputs), None
        batch = {a.shape[0] for a in inputs if isinstance(a, np.ndarray) and a.ndim}
        items = np.zeros(batch.pop() if len(batch) == 1 else 1, bool)
        cleaned = []
        for a in inputs:
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                bad = ~np.isfinite(a)
                if bad.any():
                    per_item = bad.reshape(a.shape[0], -1).any(1) if a.ndim and a.shape[0] == len(items) else bad.any()
                    items |= per_item
                    a = np.where(bad, a.dtype.type(0), a)
            cleaned.append(a)
        return cleaned, (items if items.any() else None)

    @staticmethod
    def _poison(out, items):
        """NaN in the outputs of the batch items ``items`` (all of an output without that batch axis)."""
        def one(o):
            if o.dtype.kind != "f":
                raise InputError(f"nonfinite='propagate' cannot mark a {o.dtype} output NaN; pass finite inputs")
            o = np.array(o, copy=True)
            if o.ndim and o.shape[0] == len(items):
                o[items] = np.nan
            else:
                o[...] = np.nan
            return o

        return tuple(one(o) for o in out) if isinstance(out, tuple) else one(out)

    @property
    def psb_layers(self) -> list:
        """Names of the PSB layers, in the order of the per-layer sample counts."""
        return list(self.metadata.psb_layers)

    @property
    def default_samples(self) -> dict:
        """``{PSB layer: n}`` used by ``run(samples=None)``: ``compile(samples=...)``, per layer when
        that was a map (metadata ``layer_samples``)."""
        per_layer = self.metadata.layer_samples or {}
        return {name: int(per_layer.get(name, self.metadata.samples)) for name in self.psb_layers}

    @functools.cached_property
    def _compiled_samples(self) -> list:
        """``resolve_samples(None)``: the compiled per-layer n, checked."""
        return self.resolve_samples(self.default_samples)

    def resolve_samples(self, samples=None) -> list:
        """Per-PSB-layer sample counts from ``None`` (the compiled default), an int, or a map
        ``{"layer name": n, ..., "default": n}``; each a power of two <= n_max."""

        if samples is None:  # every call of most users: checked once (MobileNetV2: 0.019 ms a call)
            return list(self._compiled_samples)
        names = self.psb_layers
        compiled = self.default_samples
        if isinstance(samples, dict):
            unknown = sorted(set(samples) - set(names) - {"default"})
            if unknown:
                raise ConfigError(f"samples names unknown layers {unknown}; the PSB layers are {names}")
            per_layer = [samples.get(name, samples.get("default", compiled[name])) for name in names]
        else:
            per_layer = [samples] * len(names)
        for name, n in zip(names, per_layer):
            try:
                check_samples(n, self.metadata.n_max)
            except ValueError as err:
                raise ConfigError(f"layer {name!r}: {err}") from None
        if self.metadata.frozen and per_layer != [compiled[name] for name in names]:
            raise ConfigError(f"this module is frozen at samples={self.metadata.samples}; "
                              "compile without frozen=True to choose n at run time")
        return [int(n) for n in per_layer]

    def _resolve_seed(self, seed) -> int:

        if seed is None:
            return int(self.metadata.seed)

        try:
            seed = check_seed(seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.metadata.frozen and seed != self.metadata.seed:
            raise ConfigError(f"this module is frozen at seed={self.metadata.seed}; compile without frozen=True to re-sample")
        return int(seed)

    def _runtime_args(self, samples, seed) -> list:
        import tvm

        per_layer = self.resolve_samples(samples)
        seed = self._resolve_seed(seed)
        if not self.metadata.runtime_args:
            return []
        return [tvm.runtime.ShapeTuple(per_layer), tvm.runtime.ShapeTuple([seed])]

    @staticmethod
    def _to_numpy(out):
        if hasattr(out, "numpy"):
            return out.numpy()
        return tuple(o.numpy() for o in out)

    def _tensors(self, inputs) -> list:
        import tvm

        return [tvm.runtime.tensor(a, tvm.cpu()) for a in self._check_inputs(inputs)]

    def run(self, *inputs, samples=None, seed=None, nonfinite: str = "error"):
        """Run the model; returns one array for a single-output model, else a tuple of arrays.

        ``samples``: an int for every PSB layer, or ``{"layer": n, "default": n}``; ``seed``: the
        draw. Both default to the values given at compile time; neither recompiles anything. The
        weights of a configuration are made on its first call and kept in ``weight_cache``.
        ``nonfinite``: a NaN or infinity in a float input is an ``InputError`` ("error", the
        default), or ("propagate") makes the outputs of that batch item NaN, the others unchanged.
        """
        out, items = self._run(inputs, samples, seed, nonfinite)
        return out if items is None else self._poison(out, items)

    def _run(self, inputs, samples, seed, nonfinite):
        import tvm

        inputs, items = self._nonfinite_items(inputs, nonfinite)
        per_layer, seed = self.resolve_samples(samples), self._resolve_seed(seed)
        extrema = []
        args = [tvm.runtime.tensor(a, tvm.cpu()) for a in self._check_inputs(inputs, extrema)]
        self._check_range(extrema)
        vm = self._machine()
        if not self.metadata.runtime_args:
            return self._to_numpy(vm["main"](*args)), items
        samples_arg, seed_arg = tvm.runtime.ShapeTuple(per_layer), tvm.runtime.ShapeTuple([seed])
        if not self.metadata.weight_cache or not self.weight_cache.enabled:
            return self._to_numpy(vm["main"](*args, samples_arg, seed_arg)), items
        return self._to_numpy(vm["cached"](*args, samples_arg, *self._weights(vm, per_layer, seed))), items

    def _weights(self, vm, per_layer: list, seed: int) -> list:
        """The weight arguments of ``cached`` for (per-layer n, seed): from ``weight_cache``, made on a miss."""
        import tvm

        samples_arg, seed_arg = tvm.runtime.ShapeTuple(per_layer), tvm.runtime.ShapeTuple([seed])
        return self.weight_cache.get((tuple(per_layer), seed), lambda: list(vm["weights"](samples_arg, seed_arg)))

    def prepare(self, samples=None, seed=None) -> None:
        """Make the weights of a configuration (default: the compiled ``samples`` and ``seed``) now,
        keep them in ``weight_cache``, and run the model once on zeros (the virtual machine's
        functions and memory pools are set up on a first call), so the first ``run`` at it costs
        what later ones do. ``compile`` does this for the default configuration."""
        if self.metadata.target_kind != "llvm" or not self.metadata.host_runnable:
            return  # built for another machine: nothing can run here
        # through run() itself: its Python path (input checks, conversions) has first-call costs
        # too (Silero VAD: 0.46 ms first call vs 0.21 later when only the VM was warmed)
        zeros = [np.zeros(shape, dtype) for _, shape, dtype in self.inputs]
        if not self.metadata.runtime_args:
            self.run(*zeros)
            return
        self.run(*zeros, samples=samples, seed=seed)

    def layer_outputs(self, *inputs, samples=None, seed=None) -> tuple:
        """``(outputs, [output of every PSB layer])`` for one run: what ``psb_tvm.diagnose`` compares
        layer by layer (conv outputs NCHW, dense outputs flattened to ``[rows, out]``). Needs a
        module with run-time sampling (not frozen)."""

        if not self.metadata.runtime_args:
            raise ConfigError("layer outputs need a module compiled with run-time sampling (not frozen, with PSB layers)")
        out = self._machine()["probe"](*self._tensors(inputs), *self._runtime_args(samples, seed))
        result = self._to_numpy(out[0])
        return (result if isinstance(result, tuple) else (result,)), [o.numpy() for o in list(out)[1:]]

    def sample_stats(self, *inputs, draws: int = 8, samples=None, seed: int = 0) -> dict:
        """Monte-Carlo statistics over ``draws`` independent draws (seeds ``seed .. seed+draws-1``).

        Returns ``{"mean", "std", "outputs"}`` (arrays for one output, tuples for several).
        """

        if self.metadata.frozen:
            raise ConfigError("a frozen module has one fixed draw; compile without frozen=True for Monte-Carlo stats")
        if not isinstance(draws, int) or draws < 2:
            raise ConfigError(f"draws must be an int >= 2, got {draws!r}")
        runs = [self.run(*inputs, samples=samples, seed=seed + k) for k in range(draws)]
        if isinstance(runs[0], tuple):
            stacked = [np.stack([r[i] for r in runs]) for i in range(len(runs[0]))]
            return {"mean": tuple(s.mean(0) for s in stacked), "std": tuple(s.std(0, ddof=1) for s in stacked),
                    "outputs": tuple(stacked)}
        stacked = np.stack(runs)
        return {"mean": stacked.mean(0), "std": stacked.std(0, ddof=1), "outputs": stacked}

    def cost(self, samples=None) -> dict:
        """The paper's cost measure for one run: additions (one per weight, sample and output
        position) per PSB layer and in total, at the given per-layer sample counts."""
        per_layer = self.resolve_samples(samples)
        info = {l["name"]: l for l in self.layers}
        rows = [{"name": name, "samples": n, "additions_per_sample": info[name]["additions_per_sample"],
                 "additions": n * info[name]["additions_per_sample"]} for name, n in zip(self.psb_layers, per_layer)]
        return {"layers": rows, "additions": sum(r["additions"] for r in rows)}

    def attend(self, *inputs, low=2, high=16, mode="mean_entropy", fraction=1.0, dilation=0, mask=None,
               seed=None, mask_seed=0, gate=None) -> "AttentionResult":
        """Localized refinement: a ``low``-n pass everywhere, then ``high``-n only where a signal of
        that pass says the network is unsure (``mode``/``fraction``/``dilation``, or an explicit
        ``mask`` [N, H, W] at the last spatial PSB layer's resolution). Per-pixel modes:
        ``mean_entropy``, ``max_entropy``, ``random``, ``variance`` (a second low-n draw, counted as
        work), ``magnitude``; per-image modes on the classifier output: ``margin_gate`` (refine the
        whole images whose low-n top-1 softmax margin is below ``fraction``), ``random_gate``.
        ``gate=t`` keeps the mask only in the images whose margin is below ``t``. Conv layers compute
        only the masked positions (the rest is not computed and keeps its low-n value); a dense
        layer is refined for the images whose mask is not empty. See ``psb_tvm.attention``."""
        import time

        import tvm


        if not self.metadata.runtime_args:
            raise ConfigError("attention needs a module compiled with run-time sampling (not frozen, with PSB layers)")
        info = {l["name"]: l for l in self.layers}
        names = self.psb_layers
        shapes = [tuple(info[name]["out_shape"]) for name in names]
        spatial = [i for i, shp in enumerate(shapes) if len(shp) == 4]
        if not spatial:
            raise ConfigError("attention needs at least one PSB conv layer (an entropy map over pixels)")
        if mask is None:
            attention.check(mode, fraction, dilation, gate)
        else:
            attention.check("mean_entropy", 1.0, 0, gate)
        low_n, high_n = self.resolve_samples(low), self.resolve_samples(high)
        seed = self._resolve_seed(seed)
        args = self._tensors(inputs)
        vm = self._machine()
        adds = [info[name]["additions_per_sample"] for name in names]
        t0 = time.perf_counter()
        probe = vm["probe"](*args, tvm.runtime.ShapeTuple(low_n), tvm.runtime.ShapeTuple([seed]))
        t1 = time.perf_counter()
        low_out = PSBModule._to_numpy(probe[0])
        layer_outs = [probe[1 + l] for l in range(len(names))]
        last = shapes[spatial[-1]]
        want = (last[0], last[2], last[3])
        signal_adds, t_signal = 0, 0.0

        def margins():
            if isinstance(low_out, tuple):
                raise ConfigError("an image gate needs a single-output classifier (logits [N, K])")
            if low_out.ndim != 2 or low_out.shape[0] != want[0]:
                raise ConfigError(f"an image gate needs classifier logits [{want[0]}, K], got shape {low_out.shape}")
            return attention.margin(low_out)

        if mask is None:
            feats = layer_outs[spatial[-1]].numpy()
            if mode in attention.IMAGE_MODES:
                images = attention.image_gate(margins(), mode, fraction, mask_seed)
                mask = np.broadcast_to(images[:, None, None], want).copy()
            else:
                if mode == "variance":
                    s0 = time.perf_counter()
                    seed2 = (seed + attention.VARIANCE_SEED_OFFSET) % 2**32
                    second = vm["probe"](*args, tvm.runtime.ShapeTuple(low_n), tvm.runtime.ShapeTuple([seed2]))
                    score = attention.disagreement_map(feats, second[1 + spatial[-1]].numpy())
                    t_signal = time.perf_counter() - s0
                    signal_adds = sum(n * a for n, a in zip(low_n, adds))
                elif mode == "magnitude":
                    score = attention.magnitude_map(feats)
                else:
                    score = attention.entropy_map(feats)
                mask = attention.select(score, mode, fraction, dilation, mask_seed)
        else:
            mask = np.asarray(mask)
            if mask.shape != want or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
                raise ConfigError(f"mask must be a 0/1 array of shape {want} (the last spatial PSB layer "
                                  f"{names[spatial[-1]]!r}), got {mask.dtype} {mask.shape}")
            mask = mask.astype(bool)
        if gate is not None:
            mask = mask & (margins() < gate)[:, None, None]
        layer_masks = []
        for shp in shapes:
            if len(shp) == 4:
                layer_masks.append(attention.resize_nearest(mask, (shp[2], shp[3])))
            elif shp[0] == mask.shape[0]:
                layer_masks.append(mask.reshape(mask.shape[0], -1).any(axis=1))
            else:
                layer_masks.append(np.full(shp[0], bool(mask.any())))
        fractions = [float(lm.mean()) for lm in layer_masks]
        t2 = time.perf_counter()
        if not any(fractions):  # nothing to refine: the result is the low-n pass (bit for bit)
            out = tuple(o.copy() for o in low_out) if isinstance(low_out, tuple) else low_out.copy()
        elif all(f == 1.0 for f in fractions):  # everything: the plain kernels are faster (same bits)
            out = self._to_numpy(vm["main"](*args, tvm.runtime.ShapeTuple(high_n), tvm.runtime.ShapeTuple([seed])))
        else:
            pos, slot, counts = [], [], []
            for layer_mask in layer_masks:
                p, sl, m = attention.positions(layer_mask)
                pos.append(tvm.runtime.tensor(p, tvm.cpu()))
                slot.append(tvm.runtime.tensor(sl, tvm.cpu()))
                counts.append(m)
            out = PSBModule._to_numpy(vm["attend"](*args, tvm.runtime.ShapeTuple(high_n), tvm.runtime.ShapeTuple([seed]),
                                                   tvm.runtime.ShapeTuple(counts), *layer_outs, *pos, *slot))
        t3 = time.perf_counter()
        full_high = sum(n * a for n, a in zip(high_n, adds))
        high_done = sum(n * a * f for n, a, f in zip(high_n, adds, fractions))
        low_adds = sum(n * a for n, a in zip(low_n, adds))
        return AttentionResult(
            output=out, low_output=low_out, mask=mask,
            layer_fractions=dict(zip(names, fractions)),
            high_work_fraction=(high_done + signal_adds) / full_high if full_high else 0.0,
            additions={"low_pass": low_adds, "signal_pass": signal_adds, "high_pass": high_done,
                       "full_high": full_high},
            seconds={"low_pass": t1 - t0, "signal_pass": t_signal, "masks": t2 - t1 - t_signal,
                     "high_pass": t3 - t2},
            total_work_fraction=(low_adds + signal_adds + high_done) / full_high if full_high else 0.0,
        )

    def session(self, *inputs, samples=1, seed=None) -> "RefinementSession":
        """An anytime evaluation starting at ``samples``; ``.refine()`` doubles n incrementally."""
        return RefinementSession(self, inputs, samples, seed)

    # ------------------------------------------------------------------ persistence
    def export_library(self, path) -> str:
        """Write one ``.so`` holding code, weights and metadata, ending with an integrity record
        (size and SHA-256, checked by ``load`` and ``psb_run``). All-or-nothing, see ``files``."""
        if self._source_path is not None and self._source_unchanged():
            source = self._source_path  # already a library on disk: copy it, with its record

            def copy(tmp):
                shutil.copyfile(source, tmp)
                if verify_module(tmp)["library_sha256"] != self._source_sha256:
                    raise OutputError(f"cannot export {os.fspath(path)}: {source} changed while it was copied")

            return write_output(path, copy, suffix=".so", executable=True)
        lib = self._executable if self._executable is not None else self._lib
        options = self._export_options()

        def write(tmp):
            try:
                with native_stderr_to_log(LOG, f"export {os.fspath(path)}"):
                    lib.export_library(tmp, addons=list(self._objects), **options)
            except Exception as err:  # noqa: BLE001 - TVM's linker step raises TVMError / RuntimeError
                msg = str(err).strip().splitlines()
                raise OutputError(f"cannot export {os.fspath(path)}: {type(err).__name__}: "
                                  f"{msg[-1] if msg else ''}") from err
            append_record(tmp)

        return write_output(path, write, suffix=".so", executable=True)

    def _source_unchanged(self) -> bool:
        """The library this module was loaded from is still the one loaded (same SHA-256)."""
        try:
            return verify_module(self._source_path)["library_sha256"] == self._source_sha256
        except (OSError, ModelLoadError):
            return False

    def _export_options(self) -> dict:
        """Cross-compiled modules link with the target's toolchain (checked before anything is written)."""
        triple = self.metadata.mtriple or ""
        if not triple.startswith("aarch64"):
            return {}
        from tvm.support import cc

        compiler = "aarch64-linux-gnu-g++"
        if shutil.which(compiler) is None:
            raise ConfigError(f"exporting an {triple} module needs the cross compiler {compiler} "
                               "(Debian: apt-get install g++-aarch64-linux-gnu)")
        return {"fcompile": cc.cross_compiler(compiler)}

    def __repr__(self):
        psb = sum(l["status"] == "psb" for l in self.layers)
        return (f"<PSBModule {self.metadata.source} n={self.samples} psb_layers={psb}/{len(self.layers)} "
                f"target={self.metadata.target}>")


@dataclass
class AttentionResult:
    """Output of ``PSBModule.attend`` with its cost: the fraction of the full high-n work done
    (additions, the paper's measure) and the measured wall-clock of each step."""

    output: object
    low_output: object
    mask: np.ndarray
    layer_fractions: dict
    high_work_fraction: float  # (high-n additions done + any extra signal pass) / full high-n run
    additions: dict  # low_pass, signal_pass (e.g. the second draw of "variance"), high_pass, full_high
    seconds: dict  # low_pass, signal_pass, masks, high_pass
    total_work_fraction: float = 0.0  # everything (low + signal + high) / full high-n run


class RefinementSession:
    """Progressive refinement: from the result at n, sample only ``[n, 2n)`` and combine.

    The counts of ``[0, 2n)`` are those of ``[0, n)`` plus those of ``[n, 2n)`` (nested samples),
    so after ``refine()`` the output equals ``module.run(x, samples=2n, seed=seed)`` bit for bit.
    Each refinement samples n new bits per weight (not 2n) and runs one integer pass.
    """

    def __init__(self, module: PSBModule, inputs, samples, seed):

        if not module.metadata.runtime_args:
            raise ConfigError("progressive refinement needs a module compiled with run-time sampling "
                              "(not frozen, with PSB layers)")
        self.module = module
        self.seed = module._resolve_seed(seed)
        self._inputs = module._tensors(inputs)
        self.samples = module.resolve_samples(samples)
        self._counts = self._sample([0] * len(self.samples), self.samples)
        self.output = self._forward()
        self.history = [(list(self.samples), self.output)]

    def _sample(self, lo, hi) -> list:
        import tvm

        # the stratified sampler's closed form takes ranges from and to 0 or a power of two <= n_max
        for v in list(lo) + list(hi):
            if v:
                check_samples(v, self.module.metadata.n_max)
        vm = self.module._machine()
        out = vm["sample"](tvm.runtime.ShapeTuple(lo), tvm.runtime.ShapeTuple(hi), tvm.runtime.ShapeTuple([self.seed]))
        return [out[i].numpy() for i in range(len(lo))]

    def _forward(self):
        import tvm

        counts = [tvm.runtime.tensor(c, tvm.cpu()) for c in self._counts]
        vm = self.module._machine()
        return PSBModule._to_numpy(vm["forward"](*self._inputs, tvm.runtime.ShapeTuple(self.samples), *counts))

    def refine(self):
        """Double every layer's n (up to n_max) using only the new samples; returns the new output."""

        n_max = self.module.metadata.n_max
        if all(n >= n_max for n in self.samples):
            raise ConfigError(f"already at n_max={n_max}")
        hi = [min(2 * n, n_max) for n in self.samples]
        increment = self._sample(self.samples, hi)
        self._counts = [c + d for c, d in zip(self._counts, increment)]  # exact: int16 <= n_max
        self.samples = hi
        self.output = self._forward()
        self.history.append((list(self.samples), self.output))
        return self.output

    def run_until_confident(self, margin: float = 0.5, stable: int = 2, max_samples: int | None = None):
        """Early exit for classifiers: refine until the top-1 class of every row is unchanged over
        ``stable`` consecutive levels and the softmax gap between the best two classes is at
        least ``margin``, or n reaches ``max_samples`` (default n_max). Returns the output."""
        limit = max_samples or self.module.metadata.n_max
        while True:
            if self._confident(margin, stable) or max(self.samples) >= limit:
                return self.output
            self.refine()

    def _confident(self, margin: float, stable: int) -> bool:
        if len(self.history) < stable:
            return False
        tops = [np.asarray(out if not isinstance(out, tuple) else out[0]).argmax(-1) for _, out in self.history[-stable:]]
        if not all(np.array_equal(tops[0], t) for t in tops[1:]):
            return False
        logits = np.asarray(self.output if not isinstance(self.output, tuple) else self.output[0], np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top2 = np.sort(p, axis=-1)[..., -2:]
        return bool(np.all(top2[..., 1] - top2[..., 0] >= margin))


def load(path, weight_cache_bytes: int = DEFAULT_MAX_BYTES) -> PSBModule:
    """Load a ``.so`` written by ``PSBModule.export_library``, metadata included.
    ``weight_cache_bytes`` bounds the module's weight cache (0: none)."""
    import tvm
    from tvm import relax

    if not isinstance(path, (str, os.PathLike)):
        raise ModelLoadError(f"load expects the path of an exported .so, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"compiled module not found: {path}")
    record = verify_module(path)  # before the loader maps the file or runs any of its code
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load as a TVM module: {err}") from err
    try:
        vm = relax.VirtualMachine(lib, tvm.cpu())
        text = str(vm[METADATA_FUNC]())
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a psb_tvm module (no readable {METADATA_FUNC}): {err}") from err
    metadata = ModuleMetadata.from_json(text, where=f"{path}: {METADATA_FUNC}")
    module = PSBModule(lib, metadata, weight_cache_bytes=weight_cache_bytes)
    module._local.vm = vm
    module._source_path, module._source_sha256 = path, record["library_sha256"]
    return module
