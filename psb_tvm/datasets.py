"""Input sets and metrics shared by ``evaluate``, ``allocate`` and the CLI: loading a data set
(arrays, ``.npy`` / ``.npz``, folders of images, loaders) into ``{input: array [N, ...]}``,
running a module over it in chunks of its batch, and the metrics (accuracy, agreement, error).

Input sets: a numpy array (single-input model), ``{input name: array [N, ...]}``, a ``.npy`` /
``.npz`` file, a folder of ``.npy`` files or images (``Preprocess``: resize, scale, mean/std,
layout; class sub-folders give labels), or a loader: a callable returning, or an iterable of,
arrays, dicts or ``(x, y)`` pairs.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, InputError

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


def labels_from(obj) -> np.ndarray | None:
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
    data = check_set(data, specs)
    if labels is not None:
        labels = np.asarray(labels)
        n = len(next(iter(data.values())))
        if len(labels) != n:
            raise InputError(f"{len(labels)} labels for {n} inputs")
    return data, labels, desc


def check_set(data: dict, specs: list) -> dict:
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


def chunks(module_or_specs, data: dict):
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
    for chunk, valid in chunks(module, data):
        y = module.run(*chunk, samples=samples, seed=seed) if module.psb_layers and not module.metadata.frozen \
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


def metric_fn(metric, labels):
    """(name, fn(outputs, reference, labels) -> float, higher_is_better)."""
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


def top1_accuracy(output: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; the class axis is axis 1 ([N, C] or [N, C, H, W] with labels [N, H, W])."""
    return float(np.mean(np.asarray(output).argmax(axis=1) == np.asarray(labels)))
