"""Automatic per-layer sample allocation: which n for which layer, for a stated budget.

A sensitivity analysis on calibration data measures, per PSB layer and per sample count n, how
much output error that layer adds when only it runs at n and every other layer runs at the
reference count (``n_ref``, default ``n_max``), averaged over a few seeds. PSB noise of different
layers is (nearly) independent and its variance falls like 1/n, so squared errors add up:

    predicted_error(alloc)^2 = base^2 + sum_l delta_l(n_l)

with ``base`` the error with every layer at ``n_ref`` (activation quantization plus residual
sampling noise). A greedy pass halves, one step at a time, the layer whose halving adds the least
predicted squared error per addition saved (``module.cost``), from all-``n_ref`` down to
all-``min_samples``: a path of allocations of falling cost. The chosen point on that path is the
cheapest one whose *measured* error (or accuracy, with labels) meets the budget, or, for a cost
budget, the most accurate one that fits it. Measuring (binary search along the path) makes the
result robust to where the additive model is off.

"Keep a layer float" is possible only at compile time (``PSBConfig(exclude=...)``); when the
budget cannot be met even at ``n_ref``, the most sensitive layers are reported in
``Allocation.recommend_exclude``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .calibration import normalize_calibration
from .compiler import plan as compile_plan
from .config import PSBConfig
from .datasets import as_input_dict, chunks, run_dataset, top1_accuracy
from .emulate import Emulator
from .errors import ConfigError

KINDS = ("error", "accuracy", "cost")


@dataclass
class Sensitivity:
    """Per-layer sensitivity table: squared relative output error added by each layer at each n."""

    layers: list
    levels: list            # the n values measured (powers of two < n_ref)
    n_ref: int              # the n of every other layer while one layer is lowered
    seeds: list
    base_sq: float          # mean squared relative error with every layer at n_ref
    delta_sq: dict          # {layer: {n: added squared error}} (0 at n_ref, non-increasing in n)
    additions_per_sample: dict  # {layer: additions per sample (module.cost)}
    act_delta_sq: dict = field(default_factory=dict)  # {layer: added squared error at 8-bit activations}

    def predict(self, samples: dict) -> float:
        """Predicted relative output error of a per-layer allocation ``{layer: n}``."""
        total = self.base_sq + sum(self.delta_sq[l].get(samples[l], 0.0) for l in self.layers)
        return float(math.sqrt(max(total, 0.0)))

    def to_dict(self) -> dict:
        return {"layers": self.layers, "levels": self.levels, "n_ref": self.n_ref, "seeds": self.seeds,
                "base_error": math.sqrt(max(self.base_sq, 0.0)),
                "delta_sq": {l: {str(n): v for n, v in d.items()} for l, d in self.delta_sq.items()},
                "additions_per_sample": self.additions_per_sample, "act_delta_sq": self.act_delta_sq}


@dataclass
class Allocation:
    """Result of ``allocate``: ``module.run(x, samples=allocation.samples)`` uses it directly."""

    samples: dict           # {layer name: n} for every PSB layer
    kind: str               # "error", "accuracy" or "cost"
    budget: float
    cost: int               # module.cost(samples)["additions"]
    predicted_error: float
    measured_error: float   # mean over seeds of the relative output error on the calibration data
    measured_accuracy: float | None
    feasible: bool
    uniform: dict | None    # the cheapest uniform n meeting the same budget: samples, cost, error, accuracy
    reference: str          # what the error is measured against
    recommend_exclude: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    sensitivity: Sensitivity | None = None
    path: list = field(default_factory=list)  # the greedy path: [{"samples", "cost", "predicted_error"}]
    act_bits: dict | None = None  # {layer: 8 or 16} when widths were allocated too (cost in 8-bit additions)

    def config(self, base: PSBConfig | None = None) -> PSBConfig:
        """``base`` (default ``PSBConfig()``) with this allocation's activation widths per layer."""
        base = base or PSBConfig()
        if not self.act_bits:
            return base
        return dataclasses.replace(base, layer_act_bits=dict(self.act_bits))

    @property
    def savings(self) -> float | None:
        """Fraction of the uniform allocation's cost saved (None without a uniform comparison)."""
        if not self.uniform or not self.uniform.get("cost"):
            return None
        return 1.0 - self.cost / self.uniform["cost"]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("samples", "act_bits", "kind", "budget", "cost", "predicted_error",
                                          "measured_error", "measured_accuracy", "feasible", "uniform", "reference",
                                          "recommend_exclude", "notes")}
        d["savings_vs_uniform"] = self.savings
        d["sensitivity"] = self.sensitivity.to_dict() if self.sensitivity else None
        return d

    def report(self) -> str:
        lines = [f"Allocation for {self.kind} budget {self.budget:g} (error vs {self.reference}):"]
        width = max(len(l) for l in self.samples) if self.samples else 5
        for name, n in self.samples.items():
            bits = f"  act {self.act_bits[name]}-bit" if self.act_bits else ""
            lines.append(f"  {name.ljust(width)}  n={n}{bits}")
        acc = f", accuracy {100 * self.measured_accuracy:.2f}%" if self.measured_accuracy is not None else ""
        unit = "8-bit additions" if self.act_bits else "additions"
        lines.append(f"cost {self.cost:,} {unit}, error {self.measured_error:.4f} measured "
                     f"({self.predicted_error:.4f} predicted){acc}" + ("" if self.feasible else "  [budget NOT met]"))
        if self.uniform:
            lines.append(f"uniform n={self.uniform['samples']} meeting the same budget: cost {self.uniform['cost']:,}, "
                         f"error {self.uniform['error']:.4f}; saved {100 * (self.savings or 0):.1f}%")
        if self.recommend_exclude:
            lines.append(f"recommendation: keep float (compile with PSBConfig(exclude={self.recommend_exclude!r}))")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self):
        return self.report()


# ---------------------------------------------------------------------------- measuring
class _Evaluator:
    """Runs a module over a data set at per-layer sample counts; caches by (allocation, seed)."""

    def __init__(self, module, data: dict, reference: list, labels, seeds, metric=None):
        self._run = run_dataset
        self.module, self.data, self.reference, self.labels, self.seeds = module, data, reference, labels, list(seeds)
        self.metric = metric
        self._ref_norm_sq = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in reference)
        self._cache = {}

    def outputs(self, samples, seed):
        return self._run(self.module, self.data, samples=samples, seed=seed)

    def err_sq(self, outputs) -> float:
        diff = sum(float(np.sum(np.square(o.astype(np.float64) - r, dtype=np.float64))) for o, r in zip(outputs, self.reference))
        return diff / max(self._ref_norm_sq, 1e-300)

    def measure(self, samples: dict) -> dict:
        """Mean over seeds: relative error, its square, accuracy (with labels)."""
        key = tuple(sorted(samples.items()))
        if key not in self._cache:
            self._cache[key] = self._measure(samples)
        return self._cache[key]

    def _measure(self, samples: dict) -> dict:
        errs, accs = [], []
        for seed in self.seeds:
            out = self.outputs(samples, seed)
            errs.append(self.err_sq(out))
            if self.metric is not None:
                accs.append(self.score(out))
            elif self.labels is not None:
                accs.append(top1_accuracy(out[0], self.labels))
        return {"error": float(np.mean(np.sqrt(errs))), "error_sq": float(np.mean(errs)),
                "accuracy": float(np.mean(accs)) if accs else None}

    def score(self, outputs) -> float:
        """The user's metric of one run's outputs (higher is better), checked to be a finite number."""
        value = self.metric(list(outputs))
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"metric must return a number, got {type(value).__name__}") from None
        if not np.isfinite(value):
            raise ConfigError(f"metric returned {value}")
        return value


def _levels(lo: int, hi: int) -> list:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def _pow2(value, name, n_max) -> int:
    if not isinstance(value, (int, np.integer)) or value < 1 or value & (value - 1) or value > n_max:
        raise ConfigError(f"{name} must be a power of two in [1, n_max={n_max}], got {value!r}")
    return int(value)


def sensitivity(module, calibration_inputs, reference=None, seeds=(0, 1, 2), min_samples: int = 1,
                max_samples: int | None = None, progress: bool = False, _evaluator=None) -> Sensitivity:
    """Measure each PSB layer's added squared output error at n = min_samples .. max_samples/2
    while every other layer runs at ``max_samples`` (default ``n_max``). See ``allocate``."""
    ev = _evaluator or make_evaluator(module, calibration_inputs, reference, None, seeds)[0]
    names = module.psb_layers
    n_max = int(module.metadata.n_max)
    n_ref = _pow2(max_samples if max_samples is not None else n_max, "max_samples", n_max)
    lo = _pow2(min_samples, "min_samples", n_max)
    if lo > n_ref:
        raise ConfigError(f"min_samples={lo} exceeds max_samples={n_ref}")
    levels = [n for n in _levels(lo, n_ref) if n < n_ref]
    ref_alloc = {l: n_ref for l in names}
    base_sq = ev.measure(ref_alloc)["error_sq"]
    delta = {}
    from tqdm import tqdm

    with tqdm(total=len(names) * len(levels), desc="sensitivity", disable=not progress, leave=False) as bar:
        for name in names:
            d = {n_ref: 0.0}
            for n in sorted(levels, reverse=True):
                d[n] = max(ev.measure({**ref_alloc, name: n})["error_sq"] - base_sq, d[2 * n] if 2 * n in d else 0.0)
                bar.update()
            delta[name] = dict(sorted(d.items()))
    apc = {r["name"]: int(r["additions_per_sample"]) for r in module.cost(1)["layers"]}
    return Sensitivity(layers=list(names), levels=levels, n_ref=n_ref, seeds=list(ev.seeds), base_sq=base_sq,
                       delta_sq=delta, additions_per_sample=apc)


def greedy_path(sens: Sensitivity, min_samples: int | None = None) -> list:
    """Allocations from all-``n_ref`` down to all-``min_samples``, one halving at a time, each step
    the one adding the least predicted squared error per addition saved."""
    lo = min_samples if min_samples is not None else (min(sens.levels) if sens.levels else sens.n_ref)
    cur = {l: sens.n_ref for l in sens.layers}
    path = [dict(cur)]
    while True:
        best = None
        for l in sens.layers:
            n = cur[l]
            if n // 2 < lo or n // 2 not in sens.delta_sq[l]:
                continue
            saved = sens.additions_per_sample[l] * (n - n // 2)
            added = sens.delta_sq[l][n // 2] - sens.delta_sq[l][n]
            score = added / max(saved, 1)
            if best is None or score < best[0] or (score == best[0] and saved > best[1]):
                best = (score, saved, l)
        if best is None:
            return path
        cur[best[2]] //= 2
        path.append(dict(cur))


def make_evaluator(module, calibration_inputs, reference, labels, seeds, metric=None):
    if not module.psb_layers:
        raise ConfigError("the module has no PSB layers: nothing to allocate")
    if module.metadata.frozen:
        raise ConfigError("a frozen module has fixed samples; compile without frozen=True to allocate")
    data = as_input_dict(calibration_inputs, module)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    n_max = int(module.metadata.n_max)
    if reference is None:
        # The module's own best estimate: the mean output at n_max over the seeds.
        runs = [run_dataset(module, data, samples=n_max, seed=s + 1000) for s in seeds]
        ref = [np.mean([r[i] for r in runs], axis=0, dtype=np.float64) for i in range(len(runs[0]))]
        desc = f"mean of {len(seeds)} runs at n_max={n_max} (no float reference given)"
    elif hasattr(reference, "run") and hasattr(reference, "metadata"):
        ref = [o.astype(np.float64) for o in run_dataset(reference, data)]
        desc = "reference module" + (" (float)" if not reference.psb_layers else "")
    else:
        ref = [np.asarray(r, np.float64) for r in (reference if isinstance(reference, (tuple, list)) else [reference])]
        n = len(next(iter(data.values())))
        if any(len(r) != n for r in ref):
            raise ConfigError(f"reference outputs must have {n} rows (one per calibration input), got {[len(r) for r in ref]}")
        desc = "given reference outputs"
    if labels is not None:
        labels = np.asarray(labels)
        n = len(next(iter(data.values())))
        if len(labels) != n:
            raise ConfigError(f"labels has {len(labels)} rows, the calibration inputs {n}")
    if metric is not None and not callable(metric):
        raise ConfigError(f"metric must be a callable (outputs list -> number), got {type(metric).__name__}")
    return _Evaluator(module, data, ref, labels, seeds, metric), desc


def _check_budget(kind: str, budget, labels, metric) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(budget, (int, float, np.floating, np.integer)) or not np.isfinite(budget) or budget < 0:
        raise ConfigError(f"budget must be a non-negative number, got {budget!r}")
    if kind == "accuracy" and labels is None and metric is None:
        raise ConfigError("an accuracy budget needs labels or a metric")
    if metric is not None and kind != "accuracy":
        raise ConfigError(f"metric applies to kind='accuracy', not {kind!r}")


def _search_path(costs: list, kind: str, budget: float, ok, guess: int | None = None) -> tuple[bool, int]:
    """``(feasible, index)`` on a path of falling cost (and rising error): for a cost budget the first
    affordable point (else the last); otherwise the last point with ``ok(index)``, by binary search
    (``guess`` probed first), or 0 when even the first point fails."""
    if kind == "cost":
        affordable = [i for i, c in enumerate(costs) if c <= budget]
        return bool(affordable), affordable[0] if affordable else len(costs) - 1
    if not ok(0):
        return False, 0
    lo, hi = 0, len(costs) - 1
    if guess is not None and guess > lo:
        if ok(guess):
            lo = guess
        else:
            hi = guess - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return True, lo


def allocate(module, calibration_inputs, budget: float, kind: str = "error", labels=None, reference=None,
             seeds=(0, 1, 2), min_samples: int = 1, max_samples: int | None = None,
             sensitivity_table: Sensitivity | None = None, progress: bool = False, metric=None,
             act_bits=None, input_shapes: dict | None = None, config=None, _evaluator=None) -> Allocation:
    """Choose per-layer sample counts for ``module`` on ``calibration_inputs``.

    ``kind="error"``: the cheapest allocation (``module.cost``) whose relative output error vs
    ``reference`` (mean over ``seeds``) is <= ``budget``. ``kind="accuracy"`` (needs ``labels``):
    the cheapest allocation whose top-1 accuracy is >= reference accuracy - ``budget`` (the
    reference accuracy: of ``reference`` outputs, else of all layers at ``max_samples``).
    ``kind="cost"``: the lowest-error allocation costing <= ``budget`` additions.

    ``metric``: for ``kind="accuracy"``, the task's own score in place of top-1 accuracy:
    ``metric(outputs) -> float`` (higher is better; ``outputs`` is the list of the model's outputs
    over the calibration inputs), e.g. the fraction of face / speech decisions that agree with the
    float model. The layer ordering still comes from the output-error sensitivities; the budget
    is checked with the metric (reference score: ``metric(reference)`` when a reference is given,
    else the score with every layer at ``max_samples``).

    ``calibration_inputs``: an array (single-input model), ``{input name: array [N, ...]}``, a
    file or folder, or a loader (see ``psb_tvm.evaluate.load_inputs``). ``reference``: float
    outputs for those inputs (array or tuple), a module to produce them (e.g. the float compile),
    or None (the module's own mean output at n_max). ``sensitivity_table`` reuses an earlier
    analysis of the same module and data. The result's ``samples`` is a ``{layer: n}`` map for
    ``module.run(x, samples=...)`` or ``psb_tvm.compile(..., samples=...)``.

    ``act_bits=(8, 16)``: choose each layer's activation width together with its n. Widths are
    fixed at compile time, so ``module`` is then the ONNX model (with ``input_shapes`` and a base
    ``config``), see :func:`allocate_with_widths`; the result's ``act_bits`` and ``config()`` give
    the widths to compile with.
    """
    _check_budget(kind, budget, labels, metric)
    if act_bits is not None:
        if tuple(sorted(set(act_bits))) != (8, 16):
            raise ConfigError(f"act_bits must be (8, 16) (the widths to choose from), got {act_bits!r}")
        if hasattr(module, "metadata"):
            raise ConfigError("allocating activation widths needs the ONNX model (widths are fixed at compile time), "
                              "not a compiled module")
        return allocate_with_widths(module, calibration_inputs, budget, kind, labels, reference, seeds, min_samples,
                                    max_samples, metric, input_shapes, config, progress)
    ev, ref_desc = _evaluator or make_evaluator(module, calibration_inputs, reference, labels, seeds, metric)
    sens = sensitivity_table or sensitivity(module, None, seeds=seeds, min_samples=min_samples,
                                            max_samples=max_samples, progress=progress, _evaluator=ev)
    names = sens.layers
    if names != module.psb_layers:
        raise ConfigError("sensitivity_table was measured on another module (its layers differ)")
    path = greedy_path(sens, min_samples)
    costs = [module.cost(p)["additions"] for p in path]
    notes = []

    if kind == "accuracy":
        if reference is not None:
            ref_acc = ev.score(ev.reference) if metric is not None else top1_accuracy(ev.reference[0], ev.labels)
        else:
            ref_acc = ev.measure({l: sens.n_ref for l in names})["accuracy"]
            notes.append(f"accuracy budget relative to all layers at n={sens.n_ref} (no reference given)")
        target_acc = ref_acc - budget

        def ok(alloc):
            return ev.measure(alloc)["accuracy"] >= target_acc - 1e-12
    elif kind == "error":
        def ok(alloc):
            return ev.measure(alloc)["error"] <= budget
    else:
        def ok(alloc):
            return module.cost(alloc)["additions"] <= budget

    # first probe of the search: the predicted point, to converge quickly where the model is right
    guess = max([i for i, p in enumerate(path) if sens.predict(p) <= budget], default=0) if kind == "error" else None
    feasible, idx = _search_path(costs, kind, budget, lambda i: ok(path[i]), guess)
    chosen = path[idx]
    m = ev.measure(chosen)

    uniform = None
    levels = sorted({sens.n_ref, *sens.levels})
    if kind != "cost":
        for n in levels:  # cheapest uniform n meeting the same budget
            alloc = {l: n for l in names}
            if ok(alloc):
                um = ev.measure(alloc)
                uniform = {"samples": n, "cost": module.cost(n)["additions"], "error": um["error"], "accuracy": um["accuracy"]}
                break
    else:
        fits = [n for n in levels if module.cost(n)["additions"] <= budget]
        if fits:
            um = ev.measure({l: fits[-1] for l in names})
            uniform = {"samples": fits[-1], "cost": module.cost(fits[-1])["additions"], "error": um["error"],
                       "accuracy": um["accuracy"]}

    if uniform is not None and feasible and kind != "cost" and uniform["cost"] < costs[idx]:
        # the greedy path can miss a uniform point that already meets the budget more cheaply
        chosen, m = {l: uniform["samples"] for l in names}, ev.measure({l: uniform["samples"] for l in names})
        notes.append(f"the uniform allocation n={uniform['samples']} is the cheapest found")

    recommend = []
    if not feasible and kind != "cost":
        # Even at n_ref the budget is missed: the layers carrying most of the sampling noise are
        # the candidates to keep float (their n_ref share extrapolated from n_ref/2, variance ~ 1/n).
        share = {l: sens.delta_sq[l].get(sens.n_ref // 2, 0.0) for l in names}
        total = sum(share.values())
        acc = 0.0
        for l in sorted(names, key=lambda l: -share[l]):
            if total <= 0 or acc >= 0.5 * total:
                break
            recommend.append(l)
            acc += share[l]
        notes.append(f"budget not met even with every layer at n={sens.n_ref} (error {m['error']:.4g}); "
                     "recompile with a larger n_max or keep the recommended layers float")
    if not feasible and kind == "cost":
        notes.append(f"no allocation fits a cost of {budget:g}; the cheapest (every layer at n={min(levels)}) is returned")
    return Allocation(samples=dict(chosen), kind=kind, budget=float(budget), cost=module.cost(chosen)["additions"],
                      predicted_error=sens.predict(chosen), measured_error=m["error"],
                      measured_accuracy=m["accuracy"], feasible=feasible, uniform=uniform, reference=ref_desc,
                      recommend_exclude=recommend, notes=notes, sensitivity=sens,
                      path=[{"samples": p, "cost": c, "predicted_error": sens.predict(p)} for p, c in zip(path, costs)])


# ---------------------------------------------------------------------------- n and activation width together
class _EmulatedEvaluator(_Evaluator):
    """``_Evaluator`` over the float emulation of a compile plan: allocations are ``(samples, bits)``."""

    def __init__(self, emulator: Emulator, data: dict, reference: list, labels, seeds, metric=None):
        self.emulator = emulator
        super().__init__(None, data, reference, labels, seeds, metric)
        self.bits = None

    def outputs(self, samples, seed):

        names = [l.name for l in self.emulator.layers]
        n = [samples[name] for name in names]
        bits = [self.bits[name] for name in names]
        outs = []
        for chunk, valid in chunks(self.emulator.plan.imported.inputs, self.data):
            outs.append([o[:valid] for o in self.emulator.run(chunk, n, seed, bits)[0]])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]

    def measure_with(self, samples: dict, bits: dict) -> dict:
        """``measure`` of the allocation ``(samples, bits)`` (cached)."""
        key = (tuple(sorted(samples.items())), tuple(sorted(bits.items())))
        if key not in self._cache:
            self.bits = bits
            self._cache[key] = self._measure(samples)
        return self._cache[key]


def _width_cost(apc: dict, samples: dict, bits: dict) -> int:
    """Work in 8-bit additions: one per weight, sample and output position, twice for 16-bit inputs
    (the bit-plane count of the bitserial lowering, and the operand width of the dot products)."""
    return int(sum(apc[l] * samples[l] * bits[l] // 8 for l in samples))


def _width_path(sens: Sensitivity, lo: int) -> list:
    """Greedy (samples, bits) path from every layer at (n_ref, 16 bits): each step halves one
    layer's n or drops one layer to 8-bit activations, whichever adds the least predicted squared
    error per 8-bit addition saved."""
    cur = {l: sens.n_ref for l in sens.layers}
    bits = {l: 16 for l in sens.layers}
    path = [(dict(cur), dict(bits))]
    apc = sens.additions_per_sample
    while True:
        best = None
        for l in sens.layers:
            n = cur[l]
            moves = []
            if n // 2 >= lo and n // 2 in sens.delta_sq[l]:
                moves.append(("n", sens.delta_sq[l][n // 2] - sens.delta_sq[l][n], apc[l] * (n - n // 2) * bits[l] // 8))
            if bits[l] == 16:
                moves.append(("bits", sens.act_delta_sq[l], apc[l] * n))
            for kind, added, saved in moves:
                score = added / max(saved, 1)
                if best is None or score < best[0] or (score == best[0] and saved > best[1]):
                    best = (score, saved, l, kind)
        if best is None:
            return path
        if best[3] == "n":
            cur[best[2]] //= 2
        else:
            bits[best[2]] = 8
        path.append((dict(cur), dict(bits)))


def _predict(sens: Sensitivity, samples: dict, bits: dict) -> float:
    extra = sum(sens.act_delta_sq.get(l, 0.0) for l, b in bits.items() if b == 8)
    return math.sqrt(max(sens.predict(samples) ** 2 + extra, 0.0))


def allocate_with_widths(model, calibration_inputs, budget: float, kind: str = "error", labels=None, reference=None,
                         seeds=(0, 1, 2), min_samples: int = 1, max_samples: int | None = None, metric=None,
                         input_shapes: dict | None = None, config=None, progress: bool = False) -> Allocation:
    """Per-layer n *and* activation width (8 or 16 bits) for an ONNX ``model``: ``allocate(model,
    ..., act_bits=(8, 16))``. Sensitivities and the budget check run on the float emulation of the
    scheme (``psb_tvm.emulate``: the compiled kernels equal it up to float rounding), so no
    allocation is compiled while searching. ``calibration_inputs`` (an array or ``{input: array}``)
    also sets the activation ranges; cost is in 8-bit additions (``_width_cost``). Compile the
    result with ``psb_tvm.compile(model, samples=a.samples, config=a.config(config), ...)``.
    """
    from tqdm import tqdm


    _check_budget(kind, budget, labels, metric)
    if not isinstance(calibration_inputs, (dict, np.ndarray)):
        raise ConfigError("allocating activation widths needs calibration_inputs as an array or {input name: array}")
    base = PSBConfig.coerce(config)
    p = compile_plan(model, "llvm", 0, input_shapes, calibration_inputs, dataclasses.replace(base, act_bits=16,
                                                                                           layer_act_bits={}))
    names = [l.name for l in p.layers]
    if not names:
        raise ConfigError("the model has no PSB layers: nothing to allocate")
    data = normalize_calibration(calibration_inputs, p.imported.inputs, 1)[0][0]
    emulator = Emulator(p)
    count = len(next(iter(data.values())))
    if reference is None:
        float_ev = _EmulatedEvaluator(emulator, data, [np.zeros(1)], None, [0])
        float_ev.bits = {l: None for l in names}
        ref = [o.astype(np.float64) for o in float_ev.outputs({l: None for l in names}, 0)]
        ref_desc = "float (the emulation with float weights and activations)"
    else:
        ref = [np.asarray(r, np.float64) for r in (reference if isinstance(reference, (tuple, list)) else [reference])]
        if any(len(r) != count for r in ref):
            raise ConfigError(f"reference outputs must have {count} rows (one per calibration input), "
                              f"got {[len(r) for r in ref]}")
        ref_desc = "given reference outputs"
    if labels is not None and len(labels) != count:
        raise ConfigError(f"labels has {len(labels)} rows, the calibration inputs {count}")
    ev = _EmulatedEvaluator(emulator, data, ref, None if labels is None else np.asarray(labels), [int(s) for s in seeds],
                            metric)
    n_ref = _pow2(max_samples if max_samples is not None else base.n_max, "max_samples", base.n_max)
    lo = _pow2(min_samples, "min_samples", base.n_max)
    levels = [n for n in _levels(lo, n_ref) if n < n_ref]
    top = ({l: n_ref for l in names}, {l: 16 for l in names})
    base_sq = ev.measure_with(*top)["error_sq"]
    delta, act_delta = {}, {}
    with tqdm(total=len(names) * (len(levels) + 1), desc="sensitivity", disable=not progress, leave=False) as bar:
        for name in names:
            d = {n_ref: 0.0}
            for n in sorted(levels, reverse=True):
                d[n] = max(ev.measure_with({**top[0], name: n}, top[1])["error_sq"] - base_sq, d[2 * n] if 2 * n in d else 0.0)
                bar.update()
            delta[name] = dict(sorted(d.items()))
            act_delta[name] = max(ev.measure_with(top[0], {**top[1], name: 8})["error_sq"] - base_sq, 0.0)
            bar.update()
    apc = {l.name: int(p.info[l.site_index]["additions_per_sample"]) for l in p.layers}
    sens = Sensitivity(layers=names, levels=levels, n_ref=n_ref, seeds=list(ev.seeds), base_sq=base_sq, delta_sq=delta,
                       additions_per_sample=apc, act_delta_sq=act_delta)
    path = _width_path(sens, lo)
    costs = [_width_cost(apc, s, b) for s, b in path]
    notes = ["measured on the float emulation of the scheme; compile with samples=allocation.samples, "
             "config=allocation.config()"]
    if kind == "accuracy":
        ref_acc = ev.score(ref) if metric is not None else top1_accuracy(ref[0], ev.labels)

        def meets(alloc):
            return ev.measure_with(*alloc)["accuracy"] >= ref_acc - budget - 1e-12
    elif kind == "error":
        def meets(alloc):
            return ev.measure_with(*alloc)["error"] <= budget
    else:
        def meets(alloc):
            return _width_cost(apc, *alloc) <= budget
    feasible, idx = _search_path(costs, kind, budget, lambda i: meets(path[i]))
    if not feasible and kind != "cost":
        notes.append(f"budget not met even with every layer at n={n_ref} and 16-bit activations")
    samples, bits = path[idx]
    m = ev.measure_with(samples, bits)
    # the cheapest uniform n (16-bit activations) meeting the same budget; for a cost budget the largest that fits
    uniforms = [({l: n for l in names}, {l: 16 for l in names}) for n in sorted({n_ref, *levels})]
    u = next((u for u in (reversed(uniforms) if kind == "cost" else uniforms) if meets(u)), None)
    uniform = None
    if u is not None:
        um = ev.measure_with(*u)
        uniform = {"samples": next(iter(u[0].values())), "cost": _width_cost(apc, *u), "error": um["error"],
                   "accuracy": um["accuracy"]}
    return Allocation(samples=dict(samples), kind=kind, budget=float(budget), cost=costs[idx],
                      predicted_error=_predict(sens, samples, bits), measured_error=m["error"],
                      measured_accuracy=m["accuracy"], feasible=feasible, uniform=uniform, reference=ref_desc,
                      notes=notes, sensitivity=sens, act_bits=dict(bits),
                      path=[{"samples": s, "act_bits": b, "cost": c, "predicted_error": _predict(sens, s, b)}
                            for (s, b), c in zip(path, costs)])
