"""The bundled example: the digits CNN compiled to PSB at several sample counts, accuracy vs float."""

from __future__ import annotations

import time

import numpy as np

from .compiler import compile as psb_compile
from .config import PSBConfig
from .data.digits import DIGITS_ONNX, load_digits_split

DEFAULT_SAMPLES = (1, 2, 4, 8, 16, 32)


def run_batched(module, x: np.ndarray) -> np.ndarray:
    """Run a single-input module over ``x`` in chunks of its compiled batch (last chunk padded)."""
    batch = module.inputs[0][1][0]
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(module.run(np.ascontiguousarray(chunk))[: batch - pad])
    return np.concatenate(outs)


def median_ms(fn, repeats: int = 30) -> float:
    """Median wall time in ms of one call of ``fn()`` (after a warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def median_latency(module, x: np.ndarray, repeats: int = 30) -> float:
    """Median wall time in ms of one ``run`` (after a warm-up run)."""
    return median_ms(lambda: module.run(x), repeats)


def digits_study(samples=DEFAULT_SAMPLES, batch: int = 50, seed: int = 0, calibration_count: int = 256,
                 config: PSBConfig | None = None, progress: bool = False) -> dict:
    """Compile the digits CNN in float and at each n; accuracy, top-1 agreement, relative error."""
    from tqdm import tqdm

    x_train, _, x_test, y_test = load_digits_split()
    shapes = {"input": (batch, 1, 8, 8)}
    calib = {"input": x_train[:calibration_count]}
    float_mod = psb_compile(DIGITS_ONNX, samples=1, input_shapes=shapes, config=PSBConfig(include=()))
    y_float = run_batched(float_mod, x_test)
    rows = [{"samples": "float", "accuracy": float((y_float.argmax(1) == y_test).mean()),
             "agreement": 1.0, "rel_error": 0.0}]
    modules = {}
    for n in tqdm(samples, desc="compile + evaluate", disable=not progress):
        mod = psb_compile(DIGITS_ONNX, samples=n, seed=seed, input_shapes=shapes, calibration=calib, config=config)
        y = run_batched(mod, x_test)
        rows.append({
            "samples": n,
            "accuracy": float((y.argmax(1) == y_test).mean()),
            "agreement": float((y.argmax(1) == y_float.argmax(1)).mean()),
            "rel_error": float(np.linalg.norm(y - y_float) / np.linalg.norm(y_float)),
        })
        modules[n] = mod
    return {"rows": rows, "modules": modules, "float_module": float_mod, "x_test": x_test}


def format_table(rows) -> str:
    lines = ["| n | accuracy | top-1 agreement with float | relative output error |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['samples']} | {100 * r['accuracy']:.2f}% | {100 * r['agreement']:.2f}% | {r['rel_error']:.4f} |")
    return "\n".join(lines)
