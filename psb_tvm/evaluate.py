"""``psb_tvm.evaluate``: accuracy and cost of one compiled module at every run-time n.

The model is compiled once (or given compiled); for n = 1, 2, 4, ... n_max it reports the metric
(accuracy with labels), top-1 agreement with the float model, relative output error and the
paper's cost (``module.cost`` additions per run of the compiled batch), plus computational
attention points (``module.attend`` at a few fractions) and, optionally, automatic per-layer
allocations (``psb_tvm.allocate``) at the error of each uniform n: uniform vs allocated on one
cost axis. Writes JSON, a markdown table and PNG plots (matplotlib, optional).

Input sets: a numpy array (single-input model), ``{input name: array [N, ...]}``, a ``.npy`` /
``.npz`` file, a folder of ``.npy`` files or images (``Preprocess``: resize, scale, mean/std,
layout; class sub-folders give labels), or a loader: a callable returning, or an iterable of,
arrays, dicts or ``(x, y)`` pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .allocate import allocate as do_allocate
from .allocate import make_evaluator, sensitivity
from .compiler import compile as psb_compile
from .config import PSBConfig
from .datasets import (
    Preprocess,
    agreement,
    as_input_dict,
    check_set,
    chunks,
    labels_from,
    load_inputs,
    metric_fn,
    rel_error,
    run_dataset,
)
from .errors import ConfigError, InputError
from .files import write_text
from .frontend import import_onnx
from .runtime import PSBModule


# ---------------------------------------------------------------------------- report
@dataclass
class EvalReport:
    """What ``evaluate`` measured. ``rows``: uniform n; ``attention`` and ``allocated`` rows share
    the same columns (metric, agreement, rel_error, additions)."""

    metric: str
    higher_is_better: bool
    float_row: dict
    rows: list
    attention: list = field(default_factory=list)
    allocated: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("metric", "higher_is_better", "float_row", "rows", "attention",
                                             "allocated", "meta", "files")}

    def markdown(self) -> str:
        m = self.metric
        fmt = (lambda v: f"{100 * v:.2f}%") if m in ("accuracy", "top5", "agreement") else (lambda v: f"{v:.4f}")
        lines = [f"Model: {self.meta.get('model')}; inputs: {self.meta.get('inputs')}; "
                 f"seeds: {self.meta.get('seeds')}; reference: {self.meta.get('reference')}.",
                 f"Cost: the paper's measure, additions per run of the compiled batch ({self.meta.get('batch')}).", "",
                 f"| mode | n | {m} | top-1 agreement | relative output error | additions | vs n_max cost |",
                 "|---|---|---|---|---|---|---|"]
        top = max((r["additions"] for r in self.rows), default=0) or 1
        fr = self.float_row
        lines.append(f"| float | - | {fmt(fr['metric'])} | 100.00% | 0.0000 | - | - |")

        def row(mode, n, r):
            lines.append(f"| {mode} | {n} | {fmt(r['metric'])} | {100 * r['agreement']:.2f}% | {r['rel_error']:.4f} | "
                         f"{r['additions']:,.0f} | {r['additions'] / top:.3f} |")

        for r in self.rows:
            row("uniform", r["samples"], r)
        for r in self.allocated:
            row(f"allocated (error budget {r['budget']:.4f})", _fmt_samples(r["samples"]), r)
        for r in self.attention:
            row(f"attention {r['mode']} f={r['fraction']}", f"{r['low']}->{r['high']}", r)
        for note in self.meta.get("notes", []):
            lines.append(f"\nNote: {note}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir, plots: bool = True, prefix: str = "eval") -> dict:
        """Write ``<prefix>.json``, ``<prefix>.md`` and (matplotlib permitting) the PNG plots."""
        out = pathlib.Path(out_dir)
        if not out.is_dir():
            raise InputError(f"output directory {out} does not exist")
        files = {"json": str(out / f"{prefix}.json"), "markdown": str(out / f"{prefix}.md")}
        if plots:
            files.update(_plots(self, out, prefix))
        self.files = files
        write_text(files["markdown"], self.markdown())
        write_text(files["json"], json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n")
        return files


def _fmt_samples(samples) -> str:
    if isinstance(samples, dict):
        return "{" + ", ".join(f"{k.split('/')[-2] if k.count('/') >= 2 else k}:{v}" for k, v in samples.items()) + "}"
    return str(samples)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _plots(report: EvalReport, out: pathlib.Path, prefix: str) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no PNG plots (pip install 'psb-tvm[eval]')", stacklevel=3)
        return {}
    m = report.metric
    files = {}
    ns = [r["samples"] for r in report.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["metric"] for r in report.rows], "o-", label="PSB, uniform n")
    ax.axhline(report.float_row["metric"], color="gray", ls="--", label="float")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples n (run time)")
    ax.set_ylabel(m)
    ax.set_title(f"{m} vs n")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["plot_n"] = str(out / f"{prefix}_{m}_vs_n.png")
    fig.savefig(files["plot_n"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["additions"] for r in report.rows], [r["metric"] for r in report.rows], "o-", label="uniform n")
    for r in report.rows:
        ax.annotate(f"n={r['samples']}", (r["additions"], r["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if report.allocated:
        pts = sorted(report.allocated, key=lambda r: r["additions"])
        ax.plot([r["additions"] for r in pts], [r["metric"] for r in pts], "s-", label="allocated per layer")
    if report.attention:
        ax.plot([r["additions"] for r in report.attention], [r["metric"] for r in report.attention], "^",
                label=f"attention ({report.attention[0]['low']}->{report.attention[0]['high']})")
    ax.axhline(report.float_row["metric"], color="gray", ls="--", label="float")
    ax.set_xscale("log")
    ax.set_xlabel("cost: additions per run")
    ax.set_ylabel(m)
    ax.set_title(f"{m} vs cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["plot_cost"] = str(out / f"{prefix}_{m}_vs_cost.png")
    fig.savefig(files["plot_cost"], dpi=100)
    plt.close(fig)
    return files


# ---------------------------------------------------------------------------- evaluate
def _float_reference(model, module, target, input_shapes, config):
    """Compile the same model with every layer float, when the ONNX source is at hand."""

    cfg = PSBConfig.coerce(config if config is not None or module is None else module.metadata.config)
    shapes = input_shapes or {n: tuple(s) for n, s, _ in module.inputs}
    return psb_compile(model, target=target, samples=1, input_shapes=shapes, config=dataclasses.replace(cfg, include=()))


def evaluate(model, inputs, labels=None, *, metric=None, samples=None, seeds=(0,), target="llvm",
             input_shapes: dict | None = None, calibration=None, config=None, reference=None,
             preprocess: Preprocess | None = None, attention: bool = True, attention_fractions=(0.8, 1.0, 1.2),
             attention_low: int | None = None, attention_high: int | None = None,
             allocate: bool = False, allocation_inputs=None, allocation_seeds=(0, 1),
             out_dir=None, plots: bool = True, progress: bool = True, max_inputs: int | None = None) -> EvalReport:
    """Compile once and measure the metric, top-1 agreement with float, relative output error and
    cost at n = 1, 2, 4, ... n_max.

    ``model``: ONNX path/bytes/proto (compiled here with ``target``, ``input_shapes``,
    ``calibration`` (default: up to 256 of ``inputs``) and ``config``), or a compiled
    ``PSBModule``. ``inputs``/``labels``: see ``load_inputs`` (labels may also come from the
    input set). ``metric``: "accuracy" (default with labels), "top5", "agreement" (default
    without), "rel_error", or ``callable(output, labels) -> float``. ``samples``: the n values
    (default all powers of two up to n_max); ``seeds``: draws averaged per point.
    ``reference``: float outputs, a float module, or an ONNX path (default: the same compile
    with every layer float when the ONNX model is known, else the module's mean at n_max).
    ``attention``: add ``module.attend`` points (mean_entropy, ``attention_fractions``) from
    ``attention_low`` (default 2) to ``attention_high`` (default the largest n <= 16).
    ``allocate``: add per-layer allocations (``psb_tvm.allocate``, fitted on
    ``allocation_inputs``, default ``calibration`` or else the evaluation inputs) at the relative
    error of each uniform n > 1. ``out_dir``: write JSON, markdown and PNGs there.
    """
    from tqdm import tqdm


    notes = []
    ref_mod = None
    if out_dir is not None and not pathlib.Path(out_dir).is_dir():
        raise InputError(f"output directory {out_dir} does not exist")
    onnx_source = None
    if isinstance(model, PSBModule):
        module = model
        src = module.metadata.source
        if src and isinstance(src, str) and os.path.isfile(src):
            onnx_source = src
    else:
        onnx_source = model
        module = None
    steps = 3 if module is None else 1
    bar = tqdm(total=steps, desc="evaluate", disable=not progress, leave=False)

    def stage(text):
        bar.set_postfix_str(text)

    specs_for_loading = None
    if module is None:
        # The input set is needed for calibration before the module exists: read it against the
        # ONNX model's (fixed) input shapes.

        stage("import")
        imported = import_onnx(model, input_shapes)
        specs_for_loading = [(n, tuple(s), d) for n, s, d in imported.inputs]
    data, set_labels, desc = load_inputs(inputs, specs_for_loading or module, preprocess)
    labels = labels_from(labels) if labels is not None else set_labels
    if max_inputs is not None:
        data = {k: v[:max_inputs] for k, v in data.items()}
        labels = labels[:max_inputs] if labels is not None else None
    count = len(next(iter(data.values())))
    if labels is not None and len(labels) != count:
        raise InputError(f"{len(labels)} labels for {count} inputs")
    name, fn, higher = metric_fn(metric, labels)  # before compiling: a bad metric fails fast

    if module is None:
        stage("compile")
        if calibration is None:
            calibration = {k: v[:256] for k, v in data.items()}
            notes.append("calibrated on the first (up to 256) evaluation inputs; pass calibration= for a held-out set")
        elif not isinstance(calibration, Mapping):
            calibration = as_input_dict(calibration, specs_for_loading, preprocess)
        module = psb_compile(model, target=target, samples=1, input_shapes=input_shapes, calibration=calibration,
                             config=config)
        bar.update()
    if not module.psb_layers:
        raise ConfigError("the module has no PSB layers: nothing to evaluate over n")
    if module.metadata.frozen:
        raise ConfigError("a frozen module has one fixed n; evaluate needs run-time sampling (compile without frozen=True)")

    n_max = int(module.metadata.n_max)
    if samples is None:
        samples = [n for n in (2 ** k for k in range(11)) if n <= n_max]
    samples = sorted({int(n) for n in samples})
    module.resolve_samples(max(samples))  # validates (power of two, <= n_max)
    for n in samples:
        module.resolve_samples(n)
    seeds = [int(s) for s in seeds]

    # Float reference.
    stage("float reference")
    ref_desc = None
    if reference is not None and not isinstance(reference, (str, os.PathLike, PSBModule)):
        ref = [np.asarray(r) for r in (reference if isinstance(reference, (list, tuple)) else [reference])]
        ref_desc = "given reference outputs"
    else:
        ref_mod = None
        if isinstance(reference, PSBModule):
            ref_mod, ref_desc = reference, "given module"
        elif reference is not None or onnx_source is not None:
            ref_mod = _float_reference(reference or onnx_source, module, target, input_shapes, config)
            ref_desc = "float compile (every layer float, same compile call)"
        if ref_mod is not None:
            ref = run_dataset(ref_mod, data)
        else:
            runs = [run_dataset(module, data, samples=n_max, seed=1000 + s) for s in range(4)]
            ref = [np.mean([r[i] for r in runs], axis=0) for i in range(len(runs[0]))]
            ref_desc = f"mean of 4 runs at n_max={n_max} (no ONNX model for a float reference)"
            notes.append("no float reference available: agreement and error are measured against the module at n_max")
    bar.update()
    float_row = {"metric": fn(ref, ref, labels), "agreement": 1.0, "rel_error": 0.0}

    def measure(run_one) -> dict:
        vals = {"metric": [], "agreement": [], "rel_error": []}
        for s in seeds:
            out = run_one(s)
            vals["metric"].append(fn(out, ref, labels))
            vals["agreement"].append(agreement(out, ref))
            vals["rel_error"].append(rel_error(out, ref))
        return {k: float(np.mean(v)) for k, v in vals.items()} | (
            {"metric_std": float(np.std(vals["metric"]))} if len(seeds) > 1 else {})

    rows = []
    attn_rows = []
    conv = any(len(l.get("out_shape", [])) == 4 for l in module.layers if l["status"] == "psb")
    low = attention_low or (2 if 2 in samples or n_max >= 2 else 1)
    high = attention_high or max([n for n in samples if n <= 16] or [max(samples)])
    fractions = list(attention_fractions) if attention and conv and high > low else []
    if attention and not fractions:
        notes.append("no attention points: "
                     + ("the module has no PSB conv layer" if not conv else f"high n {high} <= low n {low}"))
    alloc_budgets = [] if not allocate else [n for n in samples if n > min(samples)]
    bar.total = bar.n + len(samples) + len(fractions) + (1 + len(alloc_budgets) if alloc_budgets else 0)
    bar.refresh()
    for n in samples:
        stage(f"n={n}")
        r = measure(lambda s: run_dataset(module, data, samples=n, seed=s))
        rows.append({"samples": n, **r, "additions": module.cost(n)["additions"]})
        bar.update()
    for f in fractions:
        stage(f"attention f={f}")
        adds = []

        def run_attend(seed):
            outs = []
            for chunk, valid in chunks(module, data):
                res = module.attend(*chunk, low=low, high=high, mode="mean_entropy", fraction=f, seed=seed)
                adds.append(res.additions["low_pass"] + res.additions["high_pass"])
                y = res.output if isinstance(res.output, tuple) else (res.output,)
                outs.append([o[:valid] for o in y])
            return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]

        r = measure(run_attend)
        attn_rows.append({"mode": "mean_entropy", "fraction": f, "low": low, "high": high, **r,
                          "additions": float(np.mean(adds))})
        bar.update()

    allocated = []
    if alloc_budgets:

        stage("sensitivity")
        if allocation_inputs is not None:
            fit = as_input_dict(allocation_inputs, module, preprocess)
        elif isinstance(calibration, Mapping):
            fit = {k: np.asarray(v) for k, v in calibration.items()}
            fit = check_set(fit, module.inputs)
        else:
            fit = data
            notes.append("allocations fitted on the evaluation inputs themselves (in-sample)")

        fit_ref = ref if fit is data else ref_mod  # None: the module's own mean at n_max
        ev, _ = make_evaluator(module, fit, fit_ref, None, allocation_seeds)
        sens = sensitivity(module, None, seeds=allocation_seeds, max_samples=max(samples), min_samples=min(samples),
                           _evaluator=ev)
        bar.update()
        by_n = {r["samples"]: r for r in rows}
        for n in alloc_budgets:
            stage(f"allocate (error of n={n})")
            # the budget: the uniform n's error on the fitting data, so both meet the same budget there
            budget = ev.measure({l: n for l in module.psb_layers})["error"]
            a = do_allocate(module, None, budget=budget, kind="error", sensitivity_table=sens,
                            min_samples=min(samples), max_samples=max(samples), _evaluator=(ev, "fit"))
            r = measure(lambda s: run_dataset(module, data, samples=a.samples, seed=s))
            allocated.append({"samples": a.samples, "budget": a.budget, "matches_uniform_n": n, **r,
                              "additions": a.cost, "uniform_additions": by_n[n]["additions"],
                              "fit_error": a.measured_error})
            bar.update()
    bar.close()

    report = EvalReport(metric=name, higher_is_better=higher, float_row=float_row, rows=rows, attention=attn_rows,
                        allocated=allocated,
                        meta={"model": str(onnx_source or module.metadata.source), "inputs": desc, "count": count,
                              "batch": module.inputs[0][1][0], "seeds": seeds, "reference": ref_desc,
                              "n_max": n_max, "labels": labels is not None, "target": module.metadata.target,
                              "psb_layers": module.psb_layers, "notes": notes})
    report.module = module  # not serialised: the compiled module, for reuse
    if out_dir is not None:
        report.write(out_dir, plots=plots)
    return report
