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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, InputError
from .files import write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
METRICS = ("accuracy", "top5", "agreement", "rel_error")


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input: resize to ``size`` (H, W; default the model's),
    multiply by ``scale`` (default 1/255), subtract ``mean`` and divide by ``std`` per channel,
    then ``layout`` "NCHW" or "NHWC". Channels (1: grayscale, 3: RGB) come from the model input."""

    size: tuple | None = None
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"preprocess layout must be NCHW or NHWC, got {self.layout!r}")
        if any(s == 0 for s in self.std):
            raise ConfigError("preprocess std must not contain 0")

    def apply(self, path: pathlib.Path, shape: tuple) -> np.ndarray:
        """Load one image as an array of ``shape`` (the model input without its batch axis)."""
        try:
            from PIL import Image
        except ImportError:
            raise ConfigError(f"reading images ({path.name}) needs Pillow: pip install 'psb-tvm[eval]'") from None
        if len(shape) != 3:
            raise InputError(f"{path}: images need a 4-d model input (N, C, H, W) or (N, H, W, C), got {shape}")
        c, h, w = shape if self.layout == "NCHW" else (shape[2], shape[0], shape[1])
        if c not in (1, 3):
            raise InputError(f"{path}: images give 1 or 3 channels; the model input wants {c} ({self.layout})")
        size = tuple(self.size) if self.size else (h, w)
        try:
            img = Image.open(path).convert("L" if c == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable files
            raise InputError(f"cannot read image {path}: {err}") from None
        arr = np.asarray(img, np.float32).reshape(size[0], size[1], c) * np.float32(self.scale)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr)


def _input_specs(module_or_specs) -> list:
    if hasattr(module_or_specs, "inputs"):
        return list(module_or_specs.inputs)
    return list(module_or_specs)


def _labels_from(obj) -> np.ndarray | None:
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        path = pathlib.Path(obj)
        if not path.is_file():
            raise InputError(f"labels file not found: {path}")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        try:
            return np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError as err:
            raise InputError(f"labels file {path}: expected one integer per line ({err})") from None
    return np.asarray(obj)


def _folder(path: pathlib.Path, specs: list, preprocess: Preprocess | None):
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels = None
    if not files and subdirs:  # class folders: labels from the folder names (ints) or their order
        numeric = all(d.name.isdigit() for d in subdirs)
        entries = []
        for k, d in enumerate(subdirs):
            entries += [(p, int(d.name) if numeric else k) for p in sorted(d.iterdir()) if p.is_file()]
        files = [p for p, _ in entries]
        labels = np.asarray([k for _, k in entries], np.int64)
    usable = [p for p in files if p.suffix.lower() in (".npy",) + IMAGE_SUFFIXES]
    if not usable:
        raise InputError(f"input folder {path} holds no .npy or image files")
    if len(specs) != 1:
        raise InputError(f"input folder {path}: a folder feeds a single-input model; this one has {len(specs)} inputs")
    name, shape, dtype = specs[0]
    rows = []
    for p in usable:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.shape == tuple(shape):  # a whole batch in one file
                rows.extend(arr)
                continue
            if arr.shape != tuple(shape[1:]) and arr.shape != (1,) + tuple(shape[1:]):
                raise InputError(f"{p}: expected shape {tuple(shape[1:])} (one sample of input {name!r}), got {arr.shape}")
            rows.append(arr.reshape(shape[1:]))
        else:
            rows.append((preprocess or Preprocess()).apply(p, tuple(shape[1:])))
    if labels is not None and len(labels) != len(rows):
        labels = None
    desc = f"{len(rows)} files from {path}"
    return {name: np.stack(rows).astype(dtype)}, labels, desc


def _from_arrays(obj, specs) -> tuple[dict, np.ndarray | None]:
    """Normalise an array / dict / (x, y) pair to ({name: array}, labels)."""
    names = [n for n, _, _ in specs]
    labels = None
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], (int, float)):
        obj, labels = obj
    if isinstance(obj, Mapping):
        data = dict(obj)
        for key in ("labels", "label", "y"):
            if key in data and key not in names:
                labels = data.pop(key) if labels is None else labels
        if len(names) == 1 and names[0] not in data and len(data) == 1:
            data = {names[0]: next(iter(data.values()))}
        missing = [n for n in names if n not in data]
        if missing:
            raise InputError(f"input set lacks arrays for model inputs {missing} (has {sorted(data)})")
        return {n: np.asarray(data[n]) for n in names}, labels
    if len(names) != 1:
        raise InputError(f"the model has {len(names)} inputs {names}: give {{input name: array}}")
    return {names[0]: np.asarray(obj)}, labels


def load_inputs(source, module_or_specs, preprocess: Preprocess | None = None) -> tuple[dict, np.ndarray | None, str]:
    """Read an input set: returns ({input name: array [N, ...]}, labels or None, description).

    ``source``: array, dict, ``.npy``/``.npz`` path, folder (``.npy`` files or images; class
    sub-folders give labels), or a loader (callable or iterable of arrays, dicts or (x, y) pairs).
    Arrays must stack samples on axis 0 with the model input's other dims; dtypes are cast.
    """
    specs = _input_specs(module_or_specs)
    labels = None
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if path.is_dir():
            data, labels, desc = _folder(path, specs, preprocess)
        elif not path.exists():
            raise InputError(f"input set not found: {path}")
        elif path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    raw = {k: z[k] for k in z.files}
            except Exception as err:  # noqa: BLE001
                raise InputError(f"cannot read {path} as .npz: {err}") from None
            data, labels = _from_arrays(raw, specs)
            desc = f"{path}"
        elif path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
                if not isinstance(arr, np.ndarray):
                    arr.close()
                    raise ValueError("it is an .npz archive")
                data, labels = _from_arrays(arr, specs)
            except ValueError as err:
                raise InputError(f"cannot read {path} as .npy: {err}") from None
            desc = f"{path}"
        else:
            raise InputError(f"input set {path}: expected a folder, .npy or .npz file")
    elif isinstance(source, (np.ndarray, Mapping)) or (isinstance(source, tuple) and len(source) == 2
                                                       and isinstance(source[0], (np.ndarray, Mapping))):
        data, labels = _from_arrays(source, specs)
        desc = "arrays"
    elif callable(source) or isinstance(source, Iterable):
        items = source() if callable(source) else source
        if isinstance(items, (np.ndarray, Mapping)):
            items = [items]
        parts, lab = [], []
        for item in items:
            d, l = _from_arrays(item, specs)
            for n, shape, _ in specs:
                if np.asarray(d[n]).shape == tuple(shape[1:]):  # one sample without its batch axis
                    d[n] = np.asarray(d[n])[None]
            parts.append(d)
            if l is not None:
                lab.append(np.atleast_1d(np.asarray(l)))
        if not parts:
            raise InputError("the input loader yielded nothing")
        data = {n: np.concatenate([np.asarray(p[n]) for p in parts]) for n, _, _ in specs}
        labels = np.concatenate(lab) if len(lab) == len(parts) else None
        desc = f"loader ({len(parts)} items)"
    else:
        raise InputError(f"cannot read an input set from {type(source).__name__}")
    data = _check_set(data, specs)
    if labels is not None:
        labels = np.asarray(labels)
        n = len(next(iter(data.values())))
        if len(labels) != n:
            raise InputError(f"{len(labels)} labels for {n} inputs")
    return data, labels, desc


def _check_set(data: dict, specs: list) -> dict:
    out, count = {}, None
    for name, shape, dtype in specs:
        arr = np.asarray(data[name])
        if arr.shape == tuple(shape[1:]):
            arr = arr[None]
        if arr.ndim != len(shape) or tuple(arr.shape[1:]) != tuple(shape[1:]):
            raise InputError(f"input {name!r}: expected samples of shape {tuple(shape[1:])} stacked on axis 0 "
                             f"(model input {tuple(shape)}), got {arr.shape}")
        if count is not None and len(arr) != count:
            raise InputError(f"input {name!r} has {len(arr)} samples, the others {count}")
        count = len(arr)
        if count == 0:
            raise InputError("the input set is empty")
        out[name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
    return out


def as_input_dict(source, module, preprocess: Preprocess | None = None) -> dict:
    """Like ``load_inputs`` but only the inputs (labels dropped)."""
    return load_inputs(source, module, preprocess)[0]


def _chunks(module_or_specs, data: dict):
    """Yield (chunk arrays in input order, valid rows) in the compiled batch (last chunk padded)."""
    specs = _input_specs(module_or_specs)
    batch = specs[0][1][0]
    n = len(data[specs[0][0]])
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        chunk = []
        for name, _, _ in specs:
            part = data[name][start:stop]
            if stop - start < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - (stop - start), axis=0)])
            chunk.append(np.ascontiguousarray(part))
        yield chunk, stop - start


def run_dataset(module, data: dict, samples=None, seed=None) -> list:
    """Run ``module`` over a whole input set in chunks of its batch; a list with one array per output."""
    outs = []
    for chunk, valid in _chunks(module, data):
        y = module.run(*chunk, samples=samples, seed=seed) if module.psb_layers and not module.metadata.get("frozen") \
            else module.run(*chunk)
        y = y if isinstance(y, tuple) else (y,)
        outs.append([o[:valid] for o in y])
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


# ---------------------------------------------------------------------------- metrics
def rel_error(outputs: list, reference: list) -> float:
    num = sum(float(np.sum(np.square(o.astype(np.float64) - r.astype(np.float64)))) for o, r in zip(outputs, reference))
    den = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    return float(np.sqrt(num / max(den, 1e-300)))


def agreement(outputs: list, reference: list) -> float:
    return float(np.mean(outputs[0].argmax(axis=1) == reference[0].argmax(axis=1)))


def _metric_fn(metric, labels):
    """(name, fn(outputs, reference, labels) -> float, higher_is_better)."""
    from .allocate import top1_accuracy

    if metric is None:
        metric = "accuracy" if labels is not None else "agreement"
    if callable(metric):
        return getattr(metric, "__name__", "metric"), (lambda o, r, y: float(metric(o[0], y))), True
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS} or a callable(output, labels)")
    if metric in ("accuracy", "top5") and labels is None:
        raise ConfigError(f"metric {metric!r} needs labels")
    if metric == "accuracy":
        return metric, (lambda o, r, y: top1_accuracy(o[0], y)), True
    if metric == "top5":
        def top5(o, r, y):
            top = np.argsort(-o[0], axis=1)[:, :5]
            return float(np.mean((top == np.asarray(y).reshape(-1, 1)).any(axis=1)))
        return metric, top5, True
    if metric == "agreement":
        return metric, (lambda o, r, y: agreement(o, r)), True
    return metric, (lambda o, r, y: rel_error(o, r)), False


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
    from .compiler import compile as psb_compile
    from .config import PSBConfig

    cfg = PSBConfig.coerce(config if config is not None or module is None else module.metadata["config"])
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

    from .compiler import compile as psb_compile
    from .runtime import PSBModule

    notes = []
    ref_mod = None
    if out_dir is not None and not pathlib.Path(out_dir).is_dir():
        raise InputError(f"output directory {out_dir} does not exist")
    onnx_source = None
    if isinstance(model, PSBModule):
        module = model
        src = module.metadata.get("source")
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
        from .frontend import import_onnx

        stage("import")
        imported = import_onnx(model, input_shapes)
        specs_for_loading = [(n, tuple(s), d) for n, s, d in imported.inputs]
    data, set_labels, desc = load_inputs(inputs, specs_for_loading or module, preprocess)
    labels = _labels_from(labels) if labels is not None else set_labels
    if max_inputs is not None:
        data = {k: v[:max_inputs] for k, v in data.items()}
        labels = labels[:max_inputs] if labels is not None else None
    count = len(next(iter(data.values())))
    if labels is not None and len(labels) != count:
        raise InputError(f"{len(labels)} labels for {count} inputs")
    name, fn, higher = _metric_fn(metric, labels)  # before compiling: a bad metric fails fast

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
    if module.metadata.get("frozen"):
        raise ConfigError("a frozen module has one fixed n; evaluate needs run-time sampling (compile without frozen=True)")

    n_max = int(module.metadata["n_max"])
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
            for chunk, valid in _chunks(module, data):
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
        from .allocate import allocate as do_allocate
        from .allocate import sensitivity

        stage("sensitivity")
        if allocation_inputs is not None:
            fit = as_input_dict(allocation_inputs, module, preprocess)
        elif isinstance(calibration, Mapping):
            fit = {k: np.asarray(v) for k, v in calibration.items()}
            fit = _check_set(fit, module.inputs)
        else:
            fit = data
            notes.append("allocations fitted on the evaluation inputs themselves (in-sample)")
        from .allocate import _make_evaluator

        fit_ref = ref if fit is data else ref_mod  # None: the module's own mean at n_max
        ev, _ = _make_evaluator(module, fit, fit_ref, None, allocation_seeds)
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
                        meta={"model": str(onnx_source or module.metadata.get("source")), "inputs": desc, "count": count,
                              "batch": module.inputs[0][1][0], "seeds": seeds, "reference": ref_desc,
                              "n_max": n_max, "labels": labels is not None, "target": module.metadata.get("target"),
                              "psb_layers": module.psb_layers, "notes": notes})
    report.module = module  # not serialised: the compiled module, for reuse
    if out_dir is not None:
        report.write(out_dir, plots=plots)
    return report
