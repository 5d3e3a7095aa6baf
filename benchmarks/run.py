"""Latency benchmark: psb_tvm vs TVM fp32 vs ONNX Runtime fp32 / static int8, 2 threads, one process.

    python benchmarks/run.py [--quick] [--repeats N] [--models resnet18,mobilenetv2,digits,ppocr_det,ppocr_rec,ppocr_cls]
                             [--out-dir benchmarks/results] [--markdown PATH]

Per model it builds, in this process:

* ``psb_n{1,4,8,16}``: one psb_tvm module (compiled once, n chosen at run time with ``run(samples=n)``;
  the default stratified sampler; repeated calls at one n reuse the weights from the weight cache);
* ``psb_iid_n{4,16}``: the same with ``PSBConfig(sampler="iid")`` (the paper's i.i.d. samples), for
  the error comparison;
* ``psb_frozen_n8``: psb_tvm compiled with ``frozen=True`` at n=8 (draw baked into constants);
* ``psb_int8_n8``: the ``PSBConfig.preset("int8")`` module (E=3, n_max=8: int8 weights x 8-bit
  activations on VNNI where the layer fits) at n=8 (weights from the cache after the first call);
* ``psb_int8_n8_new_draw``: the same module with a new seed every call (the weights are sampled and
  packed every time: the cost of the first call at a new configuration);
* ``psb_int8_frozen_n8``: the int8 preset compiled with ``frozen=True`` at n=8 (integer weights
  prepacked at compile time: the deployment form);
* ``tvm_fp32``: the same compiler with ``PSBConfig(include=())`` (every layer float);
* ``ort_fp32``: ONNX Runtime, default graph optimizations;
* ``ort_int8``: ONNX Runtime static int8 (``quant_pre_process`` then ``quantize_static``, QDQ,
  uint8 activations, per-channel int8 weights, MinMax calibration on 16 inputs);
* ``ov_fp32`` / ``ov_int8``: OpenVINO on the CPU, fp32 (``INFERENCE_PRECISION_HINT=f32``) and int8
  from NNCF's post-training quantization on the same 16 calibration inputs (``pip install '.[bench]'``).

With ``--tuning-trials N`` every psb_tvm module and TVM fp32 are tuned with ``psb_tvm.tune`` (MetaSchedule,
XGBoost cost model, 2 threads), N measured candidates each, and compiled with ``tuning_db``;
without it (the default) both use the default schedules: tuning budget zero for both.
Timing: warm-up, then interleaved rounds (every variant once per round, order rotated each round);
median and p10 / p90 over the rounds. Writes ``<out-dir>/latest.json``, ``<out-dir>/latest.md`` and
(full runs) the top-level ``BENCHMARKS.md``. Progress goes to stderr.
"""

from __future__ import annotations

import os

THREADS = 2
# Before tvm is imported (directly or through psb_tvm): the TVM runtime defaults to 1 thread.
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tools"))  # zoo.py: the PP-OCR models

import models as bench_models  # noqa: E402

ALL_MODELS = ("resnet18", "mobilenetv2", "digits", "ppocr_det", "ppocr_rec", "ppocr_cls")
#: The default models (the PP-OCR ones need the rapidocr wheel, fetched by tools/zoo.py: ask for them).
DEFAULT_MODELS = ("resnet18", "mobilenetv2", "digits")
PSB_SAMPLES = (1, 4, 8, 16)
FROZEN_SAMPLES = 8
IID_SAMPLES = (4, 16)
SAMPLED_VARIANTS = [f"psb_n{n}" for n in PSB_SAMPLES]  # one module, n chosen at run time
IID_VARIANTS = [f"psb_iid_n{n}" for n in IID_SAMPLES]
PSB_VARIANTS = (SAMPLED_VARIANTS + IID_VARIANTS
                + [f"psb_frozen_n{FROZEN_SAMPLES}", "psb_int8_n8", "psb_int8_n8_new_draw", "psb_int8_frozen_n8"])
BASELINES = ["tvm_fp32", "ort_fp32", "ort_int8", "ov_fp32", "ov_int8"]
VARIANTS = PSB_VARIANTS + BASELINES
RATIO_BASES = {"vs_ort_fp32": "ort_fp32", "vs_ort_int8": "ort_int8", "vs_tvm_fp32": "tvm_fp32",
               "vs_ov_int8": "ov_int8"}
DEFAULT_REPEATS = {"digits": 30, "resnet18": 20, "mobilenetv2": 20, "ppocr_det": 20, "ppocr_rec": 20, "ppocr_cls": 20}
QUICK_REPEATS = 3
WARMUP = 2
SETTLE_MS = 200.0
ORT_CALIBRATION_COUNT = 16
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------------- inputs
def synthetic_images(count: int, seed: int, shape=(3, 224, 224)) -> np.ndarray:
    """Image-like inputs: smooth random colour fields plus pixel noise in [0, 1], ImageNet-normalized."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    out = np.empty((count, c, h, w), np.float32)
    for i in range(count):
        coarse = rng.uniform(0, 1, (c, 8, 8)).astype(np.float32)
        # bilinear-ish upsampling by separable linear interpolation
        ys, xs = np.linspace(0, 7, h), np.linspace(0, 7, w)
        y0, x0 = np.floor(ys).astype(int).clip(0, 6), np.floor(xs).astype(int).clip(0, 6)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        a, b = coarse[:, y0][:, :, x0], coarse[:, y0][:, :, x0 + 1]
        cc, d = coarse[:, y0 + 1][:, :, x0], coarse[:, y0 + 1][:, :, x0 + 1]
        img = (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + cc * fy * (1 - fx) + d * fy * fx)
        img = img + 0.1 * rng.standard_normal((c, h, w))
        out[i] = np.clip(img, 0, 1)
    return ((out - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def model_inputs(name: str, quick: bool) -> dict:
    """Calibration (PSB and ORT int8), evaluation (agreement) and timing inputs, batch 1."""
    if name == "digits":
        from psb_tvm.data.digits import load_digits_split

        x_train, _, x_test, y_test = load_digits_split()
        count = 50 if quick else len(x_test)
        return {"proto": bench_models.digits(), "shape": (1, 1, 8, 8),
                "psb_calibration": x_train[:256], "psb_calibration_desc": "256 digits train images",
                "ort_calibration": x_train[:ORT_CALIBRATION_COUNT],
                "ort_calibration_desc": f"{ORT_CALIBRATION_COUNT} digits train images",
                "eval": x_test[:count], "labels": y_test[:count], "eval_desc": f"{count} digits test images",
                "timing": x_test[:1]}
    if name.startswith("ppocr_"):
        return _ppocr_inputs(name.removeprefix("ppocr_"), quick)
    proto = bench_models.resnet18_shaped() if name == "resnet18" else bench_models.mobilenetv2_shaped()
    calib = synthetic_images(ORT_CALIBRATION_COUNT, seed=1)
    count = 2 if quick else 8
    return {"proto": proto, "shape": bench_models.IMAGE_SHAPE,
            "psb_calibration": calib, "psb_calibration_desc": f"{len(calib)} synthetic images",
            "ort_calibration": calib, "ort_calibration_desc": f"{len(calib)} synthetic images (the same)",
            "eval": synthetic_images(count, seed=2), "labels": None, "eval_desc": f"{count} synthetic images",
            "timing": synthetic_images(1, seed=3)}


def _ppocr_inputs(which: str, quick: bool) -> dict:
    """PP-OCR's detector / recognizer / classifier (rapidocr-onnxruntime wheel, tools/zoo.py) at its
    benchmark shape, with rendered pages / text lines as calibration, evaluation and timing inputs."""
    import onnx
    import zoo

    from psb_tvm.onnx_rewrite import set_input_shapes

    shape = zoo.PPOCR_SHAPES[which]
    proto = set_input_shapes(onnx.load(str(zoo.ppocr_path(which))), {"x": shape})
    if which == "det":
        calib, _ = zoo.text_pages(8, shape[2], seed=100)
        x, _ = zoo.text_pages(2 if quick else 4, shape[2], seed=3)
    else:
        calib, _, _ = zoo.render_text_lines(16, shape[3], seed=100, rotate_odd=which == "cls")
        x, _, _ = zoo.render_text_lines(2 if quick else 8, shape[3], seed=1, rotate_odd=which == "cls")
    return {"proto": proto, "shape": shape, "input_name": "x",
            "psb_calibration": calib, "psb_calibration_desc": f"{len(calib)} rendered {'pages' if which == 'det' else 'lines'}",
            "ort_calibration": calib, "ort_calibration_desc": f"{len(calib)} (the same)",
            "eval": x, "labels": None, "eval_desc": f"{len(x)} rendered {'pages' if which == 'det' else 'lines'}",
            "timing": x[:1]}


# ---------------------------------------------------------------------------- builders
def ort_session(model_bytes_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def ort_int8_model(proto, calibration: np.ndarray, workdir: pathlib.Path, input_name: str = "input") -> pathlib.Path:
    """Static int8 QDQ model (per-channel weights) calibrated on ``calibration`` [N, ...]."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._it, None)

    src, pre, dst = workdir / "fp32.onnx", workdir / "fp32_pre.onnx", workdir / "int8.onnx"
    fixed = onnx.ModelProto.FromString(proto.SerializeToString())
    dim0 = fixed.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.HasField("dim_value"):  # digits: dynamic batch -> 1 (the shape we benchmark)
        dim0.Clear()
        dim0.dim_value = 1
    if fixed.opset_import[0].version < 13:  # per-channel QDQ needs opset >= 13
        fixed = onnx.version_converter.convert_version(fixed, 13)
    onnx.save(fixed, str(src))
    # shape inference + ORT graph optimizations (folds BN); ORT's symbolic shape inference asserts
    # on PP-OCR's Concat nodes, whose shapes are static anyway
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=input_name != "input")
    # uint8 activations x int8 weights (U8S8): the fast path of ORT's x86 VNNI kernels. The S8S8
    # default measured 3.5x slower on ResNet-18 and 2.2x on MobileNetV2 on this machine.
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def ov_compiled(proto, calibration: np.ndarray | None):
    """OpenVINO on the CPU with ``THREADS`` threads: fp32 (``INFERENCE_PRECISION_HINT=f32``; the
    default would be bf16 where the CPU has it) or, with ``calibration``, int8 by NNCF's
    post-training quantization on those inputs (default preset, as a user would call it)."""
    import openvino as ov

    fixed = _batch1(proto)
    model = ov.Core().read_model(fixed.SerializeToString())
    if calibration is not None:
        import nncf

        model = nncf.quantize(model, nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
                              subset_size=len(calibration))
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    if calibration is None:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0]


def _batch1(proto):
    import onnx

    fixed = onnx.ModelProto.FromString(proto.SerializeToString())
    dim0 = fixed.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.HasField("dim_value"):  # digits: dynamic batch -> 1 (the shape we benchmark)
        dim0.Clear()
        dim0.dim_value = 1
    return fixed


def build_variants(name: str, data: dict, workdir: pathlib.Path, bar, trials: int = 0) -> tuple[dict, dict, dict, dict]:
    """Returns (callables {variant: fn(x)}, compile seconds, errors {variant: message}, info).

    ``trials`` > 0: each psb_tvm / TVM fp32 module is first tuned with that many trials (tuning time is
    included in its build time and reported separately in ``info["tuning_s"]``)."""
    import psb_tvm

    proto, shape = data["proto"], data["shape"]
    input_name = data.get("input_name", "input")
    shapes = {input_name: shape}
    x_time = data["timing"]
    fns, compile_s, errors, info = {}, {}, {}, {"tuning_s": {}}

    def build(label, **kwargs):
        """psb_tvm.compile, after psb_tvm.tune with the same arguments when a budget is given."""
        db = None
        if trials:
            t = time.perf_counter()
            db = str(workdir / f"tuning_{label}")
            psb_tvm.tune(proto, work_dir=db, trials=trials, num_threads=THREADS, progress=False, **kwargs)
            info["tuning_s"][label] = round(time.perf_counter() - t, 1)
        return psb_tvm.compile(proto, tuning_db=db, **kwargs)

    def attempt(variants, label, fn):
        bar.set_postfix_str(f"{name}: {label}")
        t = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others still run
            msg = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            log(f"[{name}] {label} FAILED: {msg}\n{traceback.format_exc(limit=3)}")
            for v in variants:
                errors[v] = msg
            bar.update(1)
            return None
        compile_s[label] = time.perf_counter() - t
        bar.update(1)
        return result

    calib = {input_name: data["psb_calibration"]}
    psb = attempt(SAMPLED_VARIANTS, "psb", lambda: build("psb", samples=16, seed=0, input_shapes=shapes, calibration=calib))
    if psb is not None:
        for n in PSB_SAMPLES:
            fns[f"psb_n{n}"] = (lambda m, n: lambda x: m.run(x, samples=n))(psb, n)
        psb_layers = [l for l in psb.layers if l["status"] == "psb"]
        info.update(psb_additions_per_sample=int(psb.cost(samples=1)["additions"]),
                    psb_layers=len(psb_layers), linear_layers=len(psb.layers),
                    float_layers=[{"name": l["name"], "reason": l["reason"]} for l in psb.layers if l["status"] != "psb"])
    iid = attempt(IID_VARIANTS, "psb_iid", lambda: build("psb_iid", samples=16, seed=0, input_shapes=shapes,
                                                      calibration=calib, config=psb_tvm.PSBConfig(sampler="iid")))
    if iid is not None:
        for n in IID_SAMPLES:
            fns[f"psb_iid_n{n}"] = (lambda m, n: lambda x: m.run(x, samples=n))(iid, n)
    frozen_name = f"psb_frozen_n{FROZEN_SAMPLES}"
    frozen = attempt([frozen_name], frozen_name, lambda: build(
        frozen_name, samples=FROZEN_SAMPLES, seed=0, input_shapes=shapes, calibration=calib, frozen=True))
    if frozen is not None:
        fns[frozen_name] = frozen.run
    int8 = attempt(["psb_int8_n8"], "psb_int8_n8", lambda: build(
        "psb_int8_n8", samples=8, seed=0, input_shapes=shapes, calibration=calib, config=psb_tvm.PSBConfig.preset("int8")))
    if int8 is not None:
        fns["psb_int8_n8"] = (lambda m: lambda x: m.run(x, samples=8))(int8)
        draws = iter(range(1, 2**32))
        fns["psb_int8_n8_new_draw"] = (lambda m: lambda x: m.run(x, samples=8, seed=next(draws)))(int8)
        info["int8_vnni_layers"] = sum(1 for l in int8.layers if l.get("weight_layout") == "vnni")
        info["int8_vnni16_layers"] = sum(1 for l in int8.layers if l.get("weight_layout") == "vnni16")
    int8_frozen = attempt(["psb_int8_frozen_n8"], "psb_int8_frozen_n8", lambda: build(
        "psb_int8_frozen_n8", samples=8, seed=0, input_shapes=shapes, calibration=calib, frozen=True,
        config=psb_tvm.PSBConfig.preset("int8")))
    if int8_frozen is not None:
        fns["psb_int8_frozen_n8"] = int8_frozen.run
    fp32 = attempt(["tvm_fp32"], "tvm_fp32", lambda: build("tvm_fp32", input_shapes=shapes, config=psb_tvm.PSBConfig(include=())))
    if fp32 is not None:
        fns["tvm_fp32"] = fp32.run
    sess = attempt(["ort_fp32"], "ort_fp32", lambda: ort_session(proto.SerializeToString()))
    if sess is not None:
        fns["ort_fp32"] = (lambda s: lambda x: s.run(None, {input_name: x})[0])(sess)
    q = attempt(["ort_int8"], "ort_int8", lambda: ort_session(str(ort_int8_model(proto, data["ort_calibration"], workdir,
                                                                                 input_name))))
    if q is not None:
        fns["ort_int8"] = (lambda s: lambda x: s.run(None, {input_name: x})[0])(q)
    for variant, calib in (("ov_fp32", None), ("ov_int8", data["ort_calibration"])):
        fn = attempt([variant], variant, lambda calib=calib: ov_compiled(proto, calib))
        if fn is not None:
            fns[variant] = fn
    info["first_call_s"] = {}
    for v in list(fns):  # a variant that builds but cannot run is a failure too
        try:
            t = time.perf_counter()
            out = np.asarray(fns[v](x_time))
            # TVM generates the machine code of an in-process executable lazily, at the first call
            # psb_n1..n16 share one module, as do the i.i.d. ones and the int8 preset's two
            label = ("psb" if v in SAMPLED_VARIANTS else "psb_iid" if v in IID_VARIANTS
                     else "psb_int8_n8" if v == "psb_int8_n8_new_draw" else v)
            info["first_call_s"].setdefault(label, round(time.perf_counter() - t, 3))
            if not np.all(np.isfinite(out)):
                raise FloatingPointError("non-finite output")
        except Exception as err:  # noqa: BLE001
            errors[v] = f"{type(err).__name__}: {err}"
            log(f"[{name}] {v} FAILED at run time: {errors[v]}")
            del fns[v]
    return fns, compile_s, errors, info


# ---------------------------------------------------------------------------- measuring
def agreement(fns: dict, data: dict) -> dict:
    """Top-1 agreement with ORT fp32 (and accuracy where labels exist) on the evaluation inputs."""
    x_eval = data["eval"]
    outs = {v: np.stack([np.asarray(fn(np.ascontiguousarray(x_eval[i:i + 1])))[0] for i in range(len(x_eval))])
            for v, fn in fns.items()}
    result = {"inputs": data["eval_desc"], "top1_agreement_with_ort_fp32": {}, "rel_l2_error_vs_ort_fp32": {}}
    ref = outs.get("ort_fp32")
    for v, y in outs.items():
        if ref is not None:
            result["top1_agreement_with_ort_fp32"][v] = float((y.argmax(-1) == ref.argmax(-1)).mean())
            result["rel_l2_error_vs_ort_fp32"][v] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    if data["labels"] is not None:
        result["accuracy"] = {v: float((y.argmax(-1) == data["labels"]).mean()) for v, y in outs.items()}
    return result


def time_interleaved(fns: dict, x: np.ndarray, repeats: int, bar) -> dict:
    """Warm-up, then ``repeats`` rounds; each round times every variant once, order rotated per round.

    Before its timed run, each variant runs untimed for at least ``SETTLE_MS`` (one run at least):
    both thread pools spin-wait after a call (TVM's worker, pinned to a core, burns ~0.16 s of CPU
    after each call here), and a TVM call right after an ONNX Runtime call (or the reverse) otherwise
    fights the other pool's spinning threads for the 2 cores (measured: a 0.3 ms digits PSB call took
    20-70 ms right after an ORT call; a 4 ms MobileNetV2 ORT call 22 ms right after a PSB call).
    """
    names = list(fns)
    for _ in range(WARMUP):
        for v in names:
            fns[v](x)
    times = {v: [] for v in names}
    for r in range(repeats):
        k = r % len(names)
        for v in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[v](x)
            while 1e3 * (time.perf_counter() - t0) < SETTLE_MS:
                fns[v](x)
            t = time.perf_counter()
            fns[v](x)
            times[v].append(1e3 * (time.perf_counter() - t))
        bar.update(1)
    return {v: {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
                "repeats": len(t), "samples": [round(s, 4) for s in t]} for v, t in times.items()}


def ratios(latency: dict, stat: str = "median") -> dict:
    """``stat`` latency of each PSB variant divided by each baseline's (> 1: PSB is slower)."""
    out = {}
    for v in PSB_VARIANTS:
        out[v] = {key: (latency[v][stat] / latency[base][stat] if v in latency and base in latency else None)
                  for key, base in RATIO_BASES.items()}
    return out


class ForeignLoad:
    """CPU time used by other processes (system busy time minus this process's) over a span, in
    cores: 0 on a quiet machine; ~1 means another job had one of the 2 cores to itself."""

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
            with open("/proc/self/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            mine = int(parts[11]) + int(parts[12])  # utime + stime, all threads
            return busy, mine, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self.start, self.cores = self._read(), None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start and end:
            hz = os.sysconf("SC_CLK_TCK")
            other = (end[0] - self.start[0]) - (end[1] - self.start[1])
            self.cores = round(max(other, 0) / hz / (end[2] - self.start[2]), 3)


# ---------------------------------------------------------------------------- machine / report
def _optional_versions(*names) -> dict:
    import importlib.metadata

    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    import onnx
    import onnxruntime
    import tvm

    import psb_tvm
    from psb_tvm.target import host_cpu

    lscpu = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            lscpu[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = lscpu.get("Flags", "").split()
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu_model": lscpu.get("Model name", platform.processor() or "unknown"),
        "cpu_family_model": f"family {lscpu.get('CPU family', '?')} model {lscpu.get('Model', '?')}",
        "llvm_cpu": host_cpu(),
        "cpus": int(lscpu.get("CPU(s)", os.cpu_count() or 0)),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "simd": [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in flags],
        "memory_gib": mem_gib,
        "threads_used": THREADS,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                     **_optional_versions("openvino", "nncf"),
                     "numpy": np.__version__, "psb_tvm": psb_tvm.__version__},
        "git_commit": commit,
    }


def _fmt_ms(lat: dict | None) -> str:
    if not lat:
        return "failed"
    return f"{lat['median']:.3g} ({lat['p10']:.3g}–{lat['p90']:.3g})"


def _fmt_m(count: int) -> str:
    return f"{count / 1e6:,.1f} M" if count >= 1e7 else f"{count / 1e6:.3f} M"


def _fmt_load(cores) -> str:
    return "unknown" if cores is None else f"{cores:.2f} cores"


def _fmt_ratio(r) -> str:
    return "–" if r is None else f"{r:.2f}"


LABELS = {"psb_n1": "psb_tvm n=1", "psb_n4": "psb_tvm n=4", "psb_n8": "psb_tvm n=8", "psb_n16": "psb_tvm n=16",
          "psb_iid_n4": "psb_tvm i.i.d. sampler n=4", "psb_iid_n16": "psb_tvm i.i.d. sampler n=16",
          "psb_frozen_n8": "psb_tvm frozen n=8", "psb_int8_n8": "psb_tvm int8 preset n=8",
          "psb_int8_n8_new_draw": "psb_tvm int8 preset n=8, new draw every call",
          "psb_int8_frozen_n8": "psb_tvm int8 preset frozen n=8", "tvm_fp32": "TVM fp32", "ort_fp32": "ORT fp32",
          "ort_int8": "ORT int8 (static QDQ)", "ov_fp32": "OpenVINO fp32", "ov_int8": "OpenVINO int8 (NNCF PTQ)"}


#: variants of the tuned table -> the module (build label, tuning time) each runs: the int8
#: deployment form, the default configuration, TVM fp32
TUNED_VARIANTS = {"psb_int8_frozen_n8": "psb_int8_frozen_n8", "psb_int8_n8": "psb_int8_n8", "psb_n8": "psb",
                  "psb_frozen_n8": "psb_frozen_n8", "tvm_fp32": "tvm_fp32"}


def tuned_section(results: dict, tuned: dict) -> list[str]:
    """Default (this run) and tuned (``--tuned-from``: a ``--tuning-trials`` run's latest.json) rows
    side by side. The two runs are minutes apart on a noisy guest, so each latency is also given
    as a ratio to ORT int8 / fp32 of its own run."""
    meta = tuned["meta"]
    lines = ["", f"## Tuned: {meta['tuning_trials']} MetaSchedule trials", "",
             f"From `{meta['command']}` ({meta['date']}, git {meta['machine']['git_commit']}): every psb_tvm module"
             f" and TVM fp32 tuned with {meta['tuning_trials']} measured candidates in all (XGBoost cost model, the"
             " database starts from the default schedules), then timed like the default run above. Ratios are to"
             " the baselines of the same run.", "",
             "| model | variant | default ms | / ORT int8 | / ORT fp32 | tuned ms | / ORT int8 | / ORT fp32 | tuning s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in tuned["models"].items():
        if name not in results["models"]:
            continue
        for v, module in TUNED_VARIANTS.items():
            cells = []
            for r in (results["models"][name], t):
                lat = r.get("latency_ms", {})
                ms = lat.get(v, {}).get("median")
                cells.append("–" if ms is None else f"{ms:.3g}")
                for base in ("ort_int8", "ort_fp32"):
                    b = lat.get(base, {}).get("median")
                    cells.append("–" if ms is None or not b else f"{ms / b:.2f}")
            tuning = t.get("tuning_s", {}).get(module)
            lines.append(f"| {name} | {LABELS[v]} | " + " | ".join(cells) + f" | {'–' if tuning is None else f'{tuning:.0f}'} |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} (total run time {meta['total_seconds'] / 60:.1f} min,"
        f" git {m['git_commit']}).",
        "",
        "## Setup",
        "",
        f"- **Machine**: {m['cpu_model']} ({m['cpu_family_model']}; LLVM CPU `{m['llvm_cpu']}`"
        f"{', i.e. Zen 4' if m['llvm_cpu'] == 'znver4' else ''}) "
        f"under {m['hypervisor'] or 'no'} hypervisor, {m['cpus']} CPUs ({m['threads_per_core']} thread per core), "
        f"{m['memory_gib']} GiB RAM; SIMD: {', '.join(m['simd'])}; {m['os']}, Python {m['python']}.",
        f"- **Threads**: {m['threads_used']} everywhere (`TVM_NUM_THREADS={m['threads_used']}` set before importing tvm;"
        f" ONNX Runtime `intra_op_num_threads={m['threads_used']}, inter_op_num_threads=1`). Batch 1, float32 input.",
        f"- **Versions**: TVM {m['versions']['tvm']}, ONNX Runtime {m['versions']['onnxruntime']}, "
        f"onnx {m['versions']['onnx']}, OpenVINO {m['versions'].get('openvino', '-')}, NNCF "
        f"{m['versions'].get('nncf', '-')}, numpy {m['versions']['numpy']}, psb_tvm {m['versions']['psb_tvm']}.",
        f"- **Tuning budget**: {meta['tuning_budget']}",
        f"- **Timing**: {meta['timing']}",
        "- **Variants**: `psb_tvm n=k` is ONE module compiled once (default n=16) and run with"
        " `run(x, samples=k)`, sampling the weights at run time with the default stratified sampler (the first call"
        " at a configuration samples and packs the weights, later calls reuse them from the module's weight cache);"
        " `i.i.d. sampler` is the same with `PSBConfig(sampler=\"iid\")` (the paper's independent samples);"
        " `new draw every call` runs the int8 preset with a new seed each call, so every call samples and packs"
        " the weights (the cost of a first call); `frozen n=8` is compiled with `frozen=True`"
        " (the n=8 draw baked into constants, no sampling at run time, integer weights prepacked in the kernels'"
        " layouts); `int8 preset` uses `PSBConfig.preset(\"int8\")` (E=3, n_max=8: int8 weights, 8-bit activations,"
        " VNNI dot products), sampled at run time or `frozen`; `TVM fp32` is the same compiler with"
        " `PSBConfig(include=())` (all layers float); `ORT fp32` is ONNX Runtime with all graph optimizations;"
        " `ORT int8` is `quant_pre_process` + `quantize_static` (QDQ, per-channel int8 weights, uint8 activations,"
        f" MinMax calibration on {ORT_CALIBRATION_COUNT} inputs). U8S8 is the fast path of ONNX Runtime's x86 VNNI"
        " kernels: with int8 activations (S8S8, the quantizer's default) ORT int8 measured 3.5x slower on ResNet-18"
        " (22 vs 6.4 ms) and 2.2x slower on MobileNetV2 (4.4 vs 2.0 ms) here, slower than ORT fp32."
        " `OpenVINO fp32` is OpenVINO's CPU plugin with `INFERENCE_PRECISION_HINT=f32` (its default is bf16 where the"
        f" CPU has it), `OpenVINO int8` the model quantized by NNCF (`nncf.quantize`, default preset) on the same"
        f" {ORT_CALIBRATION_COUNT} inputs; both `PERFORMANCE_HINT=LATENCY`, `INFERENCE_NUM_THREADS={THREADS}`.",
        "- **Models**: random He-init weights (fixed seed), built by `benchmarks/models.py`: ResNet-18 and"
        " MobileNetV2 (width 1.0) topologies at 1x3x224x224 with BatchNormalization nodes, and the bundled digits"
        " CNN (1x1x8x8). Accuracy numbers on the random nets mean nothing; agreement with ORT fp32 is a sanity check."
        " `ppocr_*` (asked for with `--models`): the pretrained PP-OCR detector (1x3x320x320), recognizer"
        " (1x3x48x320) and direction classifier (1x3x48x192) of the `rapidocr-onnxruntime` wheel (`tools/zoo.py`),"
        " calibrated (all variants alike) and timed on rendered pages / text lines; their task accuracy is in"
        " `benchmarks/results/ppocr*/real_models.md`.",
        "- **Ratios** are median latency of the PSB variant divided by the baseline's median: > 1 means PSB is slower.",
    ]
    if meta.get("notes"):
        lines += [f"- **Note**: {n}" for n in meta["notes"]]
    for name, r in results["models"].items():
        lat = r.get("latency_ms", {})
        lines += ["", f"## {name}", "",
                  f"Input {tuple(r['input_shape'])}; float MACs {_fmt_m(r['float_macs'])} (Conv + Gemm, from the"
                  f" ONNX graph); PSB additions per sample {_fmt_m(r.get('psb_additions_per_sample', 0))}"
                  f" ({r.get('psb_layers', '?')} of {r.get('linear_layers', '?')} linear layers PSB); "
                  f"{r['repeats']} interleaved rounds; PSB calibration: {r['psb_calibration']}; CPU used by other"
                  f" processes while timing: {_fmt_load(r.get('foreign_cpu_load_cores'))}.",
                  ""]
        agree = r.get("quality", {}).get("top1_agreement_with_ort_fp32", {})
        err = r.get("quality", {}).get("rel_l2_error_vs_ort_fp32", {})
        acc = r.get("quality", {}).get("accuracy")
        head = ("| variant | latency ms, median (p10–p90) | / ORT fp32 | / ORT int8 | / TVM fp32 | / OpenVINO int8 "
                "| top-1 agree w/ ORT fp32 | rel. logit error |")
        sep = "|---|---|---|---|---|---|---|---|"
        if acc:
            head += " accuracy |"
            sep += "---|"
        lines += [head, sep]
        for v in VARIANTS:
            rat = r.get("ratios", {}).get(v, {})
            row = (f"| {LABELS[v]} | {_fmt_ms(lat.get(v))} | {_fmt_ratio(rat.get('vs_ort_fp32'))} | "
                   f"{_fmt_ratio(rat.get('vs_ort_int8'))} | {_fmt_ratio(rat.get('vs_tvm_fp32'))} | "
                   f"{_fmt_ratio(rat.get('vs_ov_int8'))} | "
                   f"{'–' if v not in agree else f'{100 * agree[v]:.0f}%'} | {'–' if v not in err else f'{err[v]:.3g}'} |")
            if acc:
                row += f" {'–' if v not in acc else f'{100 * acc[v]:.1f}%'} |"
            lines.append(row)
        cs = r.get("compile_s", {})
        lines += ["", "Build time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in cs.items())
                  + " (psb_tvm / TVM include calibration, tuning and compilation; ORT int8 includes quantization)."]
        if r.get("tuning_s"):
            lines.append("Tuning time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["tuning_s"].items()) + ".")
        if "int8_vnni_layers" in r:
            lines.append(f"int8 preset: {r['int8_vnni_layers']} of {r.get('psb_layers', '?')} PSB layers run on"
                         " `vpdpbusd` (8-bit activations x int8 weights, packed)"
                         + (f", {r['int8_vnni16_layers']} on `vpdpwssd` (weights as int16 words: dense layers, 16-bit"
                            " activations)" if "int8_vnni16_layers" in r else "")
                         + "; the others (depthwise convs, convs of fewer than 16 outputs) on their own integer"
                         " kernels.")
        fc = r.get("first_call_s", {})
        if fc:
            lines.append("First call (s), not included above: " + ", ".join(f"{k} {v:.2f}" for k, v in fc.items())
                         + " (a module compiled in memory, `cache=False`, generates its machine code at its"
                         " first call; a compiled module is loaded from the module cache and prepared, see"
                         " Compile time).")
        lines.append(f"Agreement inputs: {r.get('quality', {}).get('inputs', '–')}.")
        for v, msg in r.get("errors", {}).items():
            lines.append(f"- **{v} failed**: {msg}")
    if results.get("tuned"):
        lines += tuned_section(results, results["tuned"])
    compile_md = HERE / "results" / "compile_time.md"
    if compile_md.exists():  # benchmarks/compile_time.py: a separate run, its own machine line
        body = compile_md.read_text().split("\n", 2)[2].strip()
        lines += ["", "## Compile time", "", body]
    lines += ["", "## Reproduce", "", "```bash",
              "pip install -e '.[test]'            # psb_tvm, TVM, onnx, onnxruntime",
              "python benchmarks/run.py            # all models; writes benchmarks/results/latest.{json,md} and BENCHMARKS.md",
              "python benchmarks/run.py --quick    # digits only, 3 rounds: a smoke test",
              "python benchmarks/run.py --models resnet18 --repeats 20 --out-dir /tmp/bench",
              "```", "",
              "Raw per-round samples are in `benchmarks/results/latest.json`. This is a 2-vCPU KVM guest: besides the"
              " in-guest load reported per model, the host's other tenants (shared L3 and memory bandwidth) sometimes"
              " slow a variant by up to ~1.5-3x for seconds at a time, which shows up as wide p10-p90 ranges; the"
              " variants are interleaved so that such spells hit all of them alike. Compare variants within one run.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, digits only (unless --models)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default: 30 digits, 20 big nets)")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(ALL_MODELS)} (default "
                                                   f"{','.join(DEFAULT_MODELS)})")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--tuning-trials", type=int, default=0,
                    help="tune every psb_tvm module and TVM fp32 with this many MetaSchedule trials each (default 0: untuned)")
    ap.add_argument("--tuned-from", default=None,
                    help="latest.json of a --tuning-trials run: BENCHMARKS.md gets its rows next to this run's")
    ap.add_argument("--markdown", default=None,
                    help="also write the markdown here (default: BENCHMARKS.md at the repo root for full runs, "
                         "none for --quick); 'none' disables it")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    names = (args.models.split(",") if args.models else (["digits"] if args.quick else list(DEFAULT_MODELS)))
    names = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(names) - set(ALL_MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {','.join(ALL_MODELS)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    repeats = {n: args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[n]) for n in names}
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = args.markdown or (None if args.quick else str(ROOT / "BENCHMARKS.md"))
    if md_path == "none":
        md_path = None

    t_start = time.perf_counter()
    notes = []
    results = {"meta": {
        "command": " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "tuning_budget": (f"{args.tuning_trials} MetaSchedule trials (XGBoost cost model, 2 threads) for each psb_tvm"
                          " module and for TVM fp32, through psb_tvm.tune, whose database starts from the default schedules;"
                          " ONNX Runtime uses its hand-written MLAS kernels." if args.tuning_trials else
                          "none: psb_tvm and TVM fp32 both use the default (untuned) schedules, zero tuning trials"
                          " for either; ONNX Runtime uses its hand-written MLAS kernels."),
        "tuning_trials": args.tuning_trials,
        "timing": f"{WARMUP} warm-up runs of every variant, then interleaved rounds: each round times every"
                  " variant once, the order rotated by one each round; before its timed run a variant runs untimed"
                  f" for >= {SETTLE_MS:.0f} ms (at least once), so that the other runtime's spin-waiting thread pool"
                  " (TVM's worker spins ~0.16 s after each call) has gone quiet. Median and p10/p90 over the rounds of"
                  " one call each (numpy in, numpy out, for"
                  " every variant: `module.run(x, samples=n)` / `session.run`).",
        "variants": VARIANTS, "psb_samples": list(PSB_SAMPLES), "quick": args.quick,
        "notes": notes,
    }, "models": {}}

    steps = sum(8 + repeats[n] for n in names)  # inputs, 7 builds (ORT fp32 and int8 share one), agreement, rounds
    with tqdm(total=steps, desc="benchmark", file=sys.stderr, dynamic_ncols=True) as bar, \
            tempfile.TemporaryDirectory(prefix="psb_bench_") as tmp:
        for name in names:
            bar.set_postfix_str(f"{name}: inputs")
            data = model_inputs(name, args.quick)
            workdir = pathlib.Path(tmp) / name
            workdir.mkdir()
            fns, compile_s, errors, info = build_variants(name, data, workdir, bar, args.tuning_trials)
            bar.set_postfix_str(f"{name}: agreement")
            quality = agreement(fns, data)
            bar.set_postfix_str(f"{name}: timing")
            with ForeignLoad() as load:
                latency = time_interleaved(fns, data["timing"], repeats[name], bar)
            r = {"input_shape": list(data["shape"]),
                 "float_macs": bench_models.float_macs(data["proto"], {data.get("input_name", "input"): data["shape"]})["total"],
                 **info, "psb_calibration": data["psb_calibration_desc"],
                 "ort_calibration": data["ort_calibration_desc"], "repeats": repeats[name],
                 "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
                 "latency_ms": latency, "ratios": ratios(latency), "ratios_p10": ratios(latency, "p10"), "quality": quality,
                 "errors": errors,
                 "foreign_cpu_load_cores": load.cores}
            results["models"][name] = r
            log(f"[{name}] " + ", ".join(f"{v} {latency[v]['median']:.3g} ms" for v in latency))
            del fns

    results["meta"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.tuned_from:
        results["tuned"] = json.loads(pathlib.Path(args.tuned_from).read_text())
    import resource

    results["meta"]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out_dir / "latest.md").write_text(text)
    if md_path:
        pathlib.Path(md_path).write_text(text)
    log(f"wrote {out_dir / 'latest.json'}" + (f" and {md_path}" if md_path else "")
        + f" in {results['meta']['total_seconds']:.0f} s")
    return 1 if any(r["errors"] for r in results["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
