"""The ``psb-tvm`` command line: check | compile | run | eval | diagnose | bench | demo | info | tune.

Exit codes: 0 ok, 2 bad usage or bad input (the message names it), 1 internal error. Every
command takes ``--json`` (one JSON object on stdout; on failure ``{"error": ..., "exit_code": ...}``)
and writes no file when it fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sys
import zipfile

from .build import kernel_codegen_times
from .compiler import compile as psb_compile
from .compiler import lower
from .config import PSBConfig
from .data.digits import DIGITS_ONNX, load_digits_split
from .datasets import Preprocess, load_inputs
from .demo import digits_study, format_table, median_latency
from .diagnose import diagnose
from .errors import PSBError, UsageError
from .evaluate import evaluate
from .files import resolve_output, write_outputs
from .frontend import import_onnx
from .model_check import check
from .numerics import SAMPLERS
from .runtime import load
from .tuning import tune

# "auto" + schedules.kernels.LOWERINGS (spelled out: importing the kernels loads TVM; a test checks they agree)
LOWERING_CHOICES = ("auto", "intdot", "shiftadd", "bitserial")
ACCURACY_KNOB = (
    "PSB represents each weight as s*2^k*(1+B/n), B the ones among n samples of probability p: the sample count n "
    "(a power of two) is the accuracy knob. More samples = closer to float and more work."
)

SAMPLES_HELP = ("sample count n: an int (every PSB layer), or per layer 'LAYER=n,...,default=n' "
                "(ONNX node names, see 'psb-tvm info')")


# ---------------------------------------------------------------------------- argument types
def _samples_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one sample count")
    return values


def _samples_spec(text: str):
    """'8' -> 8; 'conv1=16,default=4' -> {"conv1": 16, "default": 4}."""
    text = text.strip()
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int or LAYER=n,...,default=n, got {text!r}") from None
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.rpartition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad per-layer sample count {part!r} (expected LAYER=n)") from None
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"bad per-layer sample count {part!r} (expected LAYER=n)")
    return out


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _size(text: str) -> tuple:
    """H,W: two positive integers."""
    values = _ints(text)
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W (two positive integers), got {text!r}")
    return values


def _number(kind, ok, what: str):
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else a usage error naming ``what``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def _input_shape(text: str) -> tuple:
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,..., got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,... with integer dims, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"dims must be positive integers, got {text!r}")
    return name, shape


def _emit(args, obj) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _require_file(path, what: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{what} not found: {path}")
    return path


def _require_out_dir(path) -> None:
    """Refuse an output path that cannot be written before any work is done (see ``files``)."""
    if not str(path):
        raise UsageError("an output path is empty")
    resolve_output(path)


def _act_bits(text: str):
    if text not in ("8", "16", "auto"):
        raise argparse.ArgumentTypeError(f"expected 8, 16 or auto, got {text!r}")
    return text if text == "auto" else int(text)


def _layer_bits(text: str):
    name, sep, bits = text.rpartition("=")
    if not sep or not name or bits not in ("8", "16"):
        raise argparse.ArgumentTypeError(f"expected LAYER=8 or LAYER=16, got {text!r}")
    return name, int(bits)


def _config(args):

    fields = {}
    if getattr(args, "exclude", None):
        fields["exclude"] = tuple(n for group in args.exclude for n in group.split(",") if n)
    if getattr(args, "exclude_first_last", False):
        fields["exclude_first_last"] = True
    if getattr(args, "lowering", None):
        fields["lowering"] = args.lowering
    if getattr(args, "n_max", None) is not None:  # 0 is an error (PSBConfig says so), not "the default"
        fields["n_max"] = args.n_max
    if getattr(args, "sampler", None):
        fields["sampler"] = args.sampler
    for name in ("act_bits", "act_range", "act_percentile", "act_headroom"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "layer_act_bits", None):
        fields["layer_act_bits"] = dict(args.layer_act_bits)
    if getattr(args, "preset", None):
        return PSBConfig.preset(args.preset, **fields)
    return PSBConfig(**fields)


def _onnx_input_names(path) -> list:
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"cannot read ONNX model {path}: {err}") from None
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _calibration(path, model, input_shapes):
    """--calibration: .npz {input: array}, .npy (single-input model), or a folder of samples."""
    import numpy as np

    if path is None:
        return None
    p = pathlib.Path(path)
    if p.is_dir():

        specs = [(n, tuple(s), d) for n, s, d in import_onnx(model, input_shapes).inputs]
        return load_inputs(p, specs)[0]
    _require_file(p, "calibration file")
    names = _onnx_input_names(model)
    try:
        if p.suffix == ".npz":
            z = np.load(p, allow_pickle=False)
            if isinstance(z, np.ndarray):
                raise UsageError(f"cannot read calibration file {p} as .npz: it is an .npy array (name it .npy)")
            with z:
                data = {k: z[k] for k in z.files if k in names}
                if not data and len(z.files) == 1 and len(names) == 1:
                    data = {names[0]: z[z.files[0]]}
        else:
            if len(names) != 1:
                raise UsageError(f"calibration {p}: the model has {len(names)} inputs {names}; use a .npz keyed by input name")
            arr = np.load(p, allow_pickle=False)
            if not isinstance(arr, np.ndarray):  # an .npz archive under another name
                arr.close()
                raise UsageError(f"cannot read calibration file {p} as .npy: it is an .npz archive (name it .npz)")
            data = {names[0]: arr}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"cannot read calibration file {p}: {type(err).__name__}: {err}") from None
    if not data:
        raise UsageError(f"calibration file {p} has no arrays named after the model inputs {names}")
    return data


def _input_set_options(p):
    p.add_argument("--max-inputs", type=_positive_int, help="use only the first N inputs")
    p.add_argument("--resize", type=_size, metavar="H,W", help="images: resize to H,W (default: the model input's)")
    p.add_argument("--mean", type=_floats, default=(0.0,), help="images: per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats, default=(1.0,), help="images: per-channel std, e.g. 0.229,0.224,0.225")
    p.add_argument("--scale", type=_positive_float, default=255.0, help="images: pixel values are divided by this (default 255)")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="images: model input layout (default NCHW)")


def _preprocess(args):

    return Preprocess(size=tuple(args.resize) if args.resize else None, mean=args.mean, std=args.std,
                      scale=1.0 / args.scale, layout=args.layout)


def _model_options(p, compile_only=False):
    p.add_argument("--target", default="llvm", help="TVM target: 'llvm' (this host's CPU), 'aarch64', 'cuda', or a target string")
    p.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME=D0,D1,...",
                   help="fix an input's shape (repeatable), e.g. input=1,3,224,224")
    p.add_argument("--calibration", metavar="FILE", help=".npz {input name: array [N, ...]}, .npy (single input) or a folder: "
                                                         "activation scales")
    p.add_argument("--preset", choices=["int8", "int16"], help="numeric preset (int8: E=3, n_max=8; int16: the default)")
    p.add_argument("--exclude", action="append", metavar="LAYER[,LAYER]", help="keep these layers float (repeatable)")
    p.add_argument("--exclude-first-last", action="store_true", help="keep the first and last convertible layers float")
    p.add_argument("--lowering", choices=LOWERING_CHOICES,
                   help="kernel lowering of every PSB layer (default auto: measured pick from --tuning-db, else intdot)")
    p.add_argument("--n-max", type=int, help="largest sample count the module accepts (power of two)")
    p.add_argument("--sampler", choices=list(SAMPLERS),
                   help="sample stream: stratified (default; error ~1/n) or iid (the paper's; error ~1/sqrt(n))")
    p.add_argument("--act-bits", type=_act_bits, help="activation width of every PSB layer: 8, 16 or auto (the default: "
                                                      "per layer, 8 where its rounding error stays small)")
    p.add_argument("--layer-act-bits", action="append", type=_layer_bits, metavar="LAYER=BITS",
                   help="activation width of one layer, 8 or 16 (repeatable)")
    p.add_argument("--act-range", choices=["max", "percentile"],
                   help="activation range from calibration: the largest |x| (default) or a percentile of |x|")
    p.add_argument("--act-percentile", type=float, help="percentile of |x| for --act-range percentile (default 99.99)")
    p.add_argument("--act-headroom", type=float, help="multiply the calibrated range by this (>= 1 leaves room for "
                                                       "inputs beyond calibration; default 1)")


# ---------------------------------------------------------------------------- commands
def cmd_tune(args) -> int:

    _require_file(args.model, "ONNX model")
    shapes = dict(args.input_shape) or None
    result = tune(args.model, target=args.target, work_dir=args.work_dir, trials=args.trials, samples=args.samples,
                  input_shapes=shapes, calibration=_calibration(args.calibration, args.model, shapes),
                  config=_config(args), trials_per_task=args.trials_per_task, num_threads=args.threads,
                  rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, timeout=args.timeout,
                  progress=not (args.no_progress or args.json))
    if args.json:
        import dataclasses

        _emit(args, dataclasses.asdict(result))
    else:
        print(result.table())
        print(f"{result.trials_run} trials in {result.seconds:.0f} s ({result.trials_total} in the database, "
              f"{result.num_threads} threads); reuse with: psb-tvm compile {args.model} --tuning-db {result.work_dir}")
    return 0


def cmd_check(args) -> int:
    """Exit 0 when the model compiles as checked, 2 (with the list) when something stops it."""
    _require_file(args.model, "ONNX model")
    result = check(args.model, input_shapes=dict(args.input_shape) or None, config=_config(args))
    if args.json:
        _emit(args, result.to_dict())
    else:
        print(result.report())
    return 0 if result.ok else 2


def cmd_compile(args) -> int:

    _require_file(args.model, "ONNX model")
    if args.output is not None and not args.output:
        raise UsageError("-o/--output is empty; give a path or leave it out for the default name")
    out = args.output if args.output is not None else pathlib.Path(args.model).stem + "_psb.so"
    _require_out_dir(out)
    shapes = dict(args.input_shape) or None
    calibration = _calibration(args.calibration, args.model, shapes)
    module = psb_compile(args.model, target=args.target, samples=args.samples, seed=args.seed, input_shapes=shapes,
                         calibration=calibration, config=_config(args), frozen=args.frozen, tuning_db=args.tuning_db,
                         cache=False if args.no_cache else None)
    module.export_library(out)
    kernels = []
    if args.kernel_report:
        mod, _, tgt = lower(args.model, args.target, args.samples, args.seed, shapes, calibration, _config(args),
                            args.frozen)
        kernels = kernel_codegen_times(mod, tgt, args.tuning_db)[:args.kernel_report]
    if args.json:
        _emit(args, {"output": out, "samples": args.samples, "seed": args.seed, "target": module.metadata.target,
                     "psb_layers": module.psb_layers, "layers": _layer_rows(module),
                     "compile_seconds": module.compile_seconds,
                     **({"kernel_codegen": [{"kernel": k, "seconds": round(t, 3), "asm_bytes": b} for t, k, b in kernels]}
                        if args.kernel_report else {})})
    else:
        print(module.report())
        seconds = module.compile_seconds or {}
        print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        for t, k, b in kernels:
            print(f"kernel {k}: code generation {t:.2f} s, {b} bytes of assembly")
        print(f"wrote {out}")
    return 0


def _layer_rows(module) -> list:
    keys = ("name", "op", "status", "reason", "lowering", "frac_bits", "act_bits", "act_dtype", "weight_shape",
            "additions_per_sample")
    return [{k: l.get(k) for k in keys} for l in module.layers]


def _load(path):

    _require_file(path, "compiled module")
    return load(path)


def cmd_run(args) -> int:
    import time

    import numpy as np

    module = _load(args.model)
    specs = module.inputs
    names = [n for n, _, _ in specs]
    arrays, positional = {}, []
    for item in args.inputs:
        name, sep, path = item.partition("=")
        if sep and name in names and not os.path.isfile(item):
            if name in arrays:
                raise UsageError(f"input {name!r} given twice")
            arrays[name] = path
        else:
            positional.append(item)
    free = [n for n in names if n not in arrays]
    if len(positional) > len(free):
        raise UsageError(f"{len(positional)} positional input file(s) for {len(free)} remaining input(s) {free}")
    arrays.update(zip(free, positional))
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"missing input file(s) for {missing}; the model's inputs are {names} (give NAME=path.npy)")
    xs = []
    for name, shape, dtype in specs:
        path = arrays[name]
        _require_file(path, f"input file for {name!r}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UsageError(f"cannot read {path} as .npy: {err}") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive
            arr.close()
            raise UsageError(f"cannot read {path} as .npy: it is an .npz archive (give one .npy per input)")
        if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
            raise UsageError(f"input {name!r} from {path}: expected {dtype} {tuple(shape)}, got {arr.dtype} {tuple(arr.shape)}")
        xs.append(arr)
    kwargs = {} if module.metadata.frozen and args.samples is None and args.seed is None else \
        {"samples": args.samples, "seed": args.seed}
    y = module.run(*xs, **kwargs, nonfinite=args.nonfinite)
    outs = list(y) if isinstance(y, tuple) else [y]
    out_names = module.metadata.outputs or [f"output_{i}" for i in range(len(outs))]
    if args.output:
        if len(args.output) != len(outs):
            raise UsageError(f"{len(args.output)} --output path(s) for {len(outs)} model output(s)")
        paths = list(args.output)
    else:
        safe = ["".join(c if c.isalnum() or c in "-_." else "_" for c in str(n)) or f"output_{i}"
                for i, n in enumerate(out_names)]
        paths = [os.path.join(args.out_dir, f"{s}.npy") for s in safe]
    for p in paths:
        _require_out_dir(p)
    timing = None
    if args.time:
        times = []
        for _ in range(args.time):
            t = time.perf_counter()
            module.run(*xs, **kwargs)
            times.append(time.perf_counter() - t)
        timing = {"repeats": args.time, "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times))}
    # all outputs to temp files first, renamed only when every one was written
    write_outputs([(p, lambda tmp, arr=arr: np.save(tmp, arr)) for arr, p in zip(outs, paths)], suffix=".npy")
    n_used = module.resolve_samples(kwargs.get("samples"))
    result = {"outputs": [{"name": n, "path": p, "shape": list(a.shape), "dtype": str(a.dtype)}
                          for n, p, a in zip(out_names, paths, outs)],
              "samples": dict(zip(module.psb_layers, n_used)), "seed": module._resolve_seed(kwargs.get("seed")),
              "timing": timing}
    if args.json:
        _emit(args, result)
    else:
        for o in result["outputs"]:
            print(f"wrote {o['path']} ({o['dtype']} {tuple(o['shape'])})")
        if timing:
            print(f"median latency {timing['median_ms']:.3f} ms over {timing['repeats']} runs "
                  f"(TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')})")
    return 0


def cmd_eval(args) -> int:

    if not os.path.isdir(args.out_dir):
        raise UsageError(f"output directory {args.out_dir} does not exist")
    shapes = dict(args.input_shape) or None
    labels, calibration, inputs = args.labels, None, args.inputs
    if args.model == "digits":  # the bundled example: test split, labels, train-split calibration

        x_train, _, x_test, y_test = load_digits_split()
        model = str(DIGITS_ONNX)
        shapes = shapes or {"input": (50, 1, 8, 8)}
        if inputs is None:
            inputs, labels = x_test, (y_test if labels is None else labels)
        calibration = {"input": x_train[:256]}
    else:
        model = _require_file(args.model, "model")
        if inputs is None:
            raise UsageError("--inputs is required (a folder, .npy or .npz file)")
    if isinstance(inputs, str) and not os.path.exists(inputs):
        raise UsageError(f"input set not found: {inputs}")
    if isinstance(labels, str):
        _require_file(labels, "labels file")
    compiled = model.endswith(".so")
    if compiled:
        model = _load(model)
    elif args.calibration:
        calibration = _calibration(args.calibration, model, shapes)
    pre = _preprocess(args)
    report = evaluate(model, inputs, labels, metric=args.metric, samples=args.samples, seeds=args.seeds,
                      target=args.target, input_shapes=shapes, calibration=calibration,
                      config=None if compiled else _config(args), preprocess=pre, attention=not args.no_attention,
                      attention_fractions=args.attention_fractions, allocate=args.allocate, out_dir=None,
                      plots=not args.no_plots, progress=not args.json and not args.no_progress,
                      max_inputs=args.max_inputs)
    _write_report(args, report)
    return 0


def _write_report(args, report) -> None:
    """Write an eval / diagnosis report into ``--out-dir``; print it (markdown) or its JSON."""
    files = report.write(args.out_dir, plots=not args.no_plots)
    if args.json:
        _emit(args, report.to_dict())
    else:
        print(report.markdown())
        print("wrote " + ", ".join(files.values()))


def cmd_diagnose(args) -> int:

    model = _require_file(args.model, "ONNX model")
    if not os.path.isdir(args.out_dir):
        raise UsageError(f"output directory {args.out_dir} does not exist")
    if not os.path.exists(args.inputs):
        raise UsageError(f"input set not found: {args.inputs}")
    shapes = dict(args.input_shape) or None
    report = diagnose(model, args.inputs, samples=args.samples, seed=args.seed, input_shapes=shapes,
                      calibration=_calibration(args.calibration, model, shapes), config=_config(args),
                      tolerance=args.tolerance, max_inputs=args.max_inputs, preprocess=_preprocess(args),
                      progress=not args.json and not args.no_progress)
    _write_report(args, report)
    return 3 if report.first_excess and args.fail_on_excess else 0


def _repo_benchmarks():
    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    return root if (root / "run.py").is_file() else None


def cmd_bench(args) -> int:
    import time

    import numpy as np

    if args.model is None:
        bench = _repo_benchmarks()
        if bench is None:
            raise UsageError("no benchmarks/ folder next to the package (not a repository checkout): "
                             "give a compiled module, e.g. psb-tvm bench model.so --samples 1,4,8,16")
        import importlib.util

        sys.path.insert(0, str(bench))
        spec = importlib.util.spec_from_file_location("psb_bench_run", bench / "run.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        argv = [] if args.full else ["--quick"]
        if args.models:
            argv += ["--models", args.models]
        if args.repeats is not None:
            argv += ["--repeats", str(args.repeats)]
        code = runner.main(argv)
        _emit(args, {"benchmarks": str(bench / "run.py"), "argv": argv, "exit_code": code,
                     "results": str(bench / "results" / "latest.json")})
        return 1 if code else 0

    module = _load(args.model)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(dtype) if np.issubdtype(np.dtype(dtype), np.floating)
          else np.zeros(shape, dtype) for _, shape, dtype in module.inputs]
    frozen = module.metadata.frozen or not module.psb_layers
    ns = [None] if frozen else (args.samples or [module.samples])
    repeats = 20 if args.repeats is None else args.repeats
    rows = []
    for n in ns:
        kwargs = {} if n is None else {"samples": n}
        module.run(*xs, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            module.run(*xs, **kwargs)
            times.append(time.perf_counter() - t)
        rows.append({"samples": n if n is not None else module.samples, "median_ms": 1e3 * float(np.median(times)),
                     "p10_ms": 1e3 * float(np.percentile(times, 10)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
                     "additions": module.cost(kwargs.get("samples"))["additions"] if module.psb_layers else 0})
    result = {"model": args.model, "threads": os.environ.get("TVM_NUM_THREADS", "1 (TVM default)"),
              "repeats": repeats, "rows": rows}
    if args.json:
        _emit(args, result)
    else:
        print(f"{args.model}: median latency over {result['repeats']} runs, TVM_NUM_THREADS={result['threads']}")
        print("| n | median ms | p10 ms | p90 ms | additions |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['samples']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {r['additions']:,} |")
    return 0


def cmd_info(args) -> int:
    module = _load(args.model)
    md = module.metadata
    if args.json:
        _emit(args, md.to_dict())
        return 0
    print(f"{args.model}: psb_tvm {md.psb_tvm_version} module from {md.source}")
    print(f"target: {md.target}")
    print(f"n_max: {md.n_max}  default samples: {md.layer_samples or md.samples}  seed: {md.seed}"
          f"  sampler: {md.sampler}  frozen: {md.frozen}  calibration: {md.calibration}")
    for i in md.inputs:
        print(f"input  {i['name']}: {i['dtype']} {tuple(i['shape'])}")
    for o in md.outputs:
        print(f"output {o}")
    print()
    print(module.report())
    return 0


def cmd_demo(args) -> int:
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    _require_out_dir(args.out)  # fail before minutes of compiling, not after
    if args.export_samples is not None and args.export_samples not in args.samples:
        raise UsageError(f"--export-samples {args.export_samples} is not one of the evaluated --samples "
                         f"{','.join(map(str, args.samples))}")

    study = digits_study(samples=args.samples, batch=args.batch, seed=args.seed, progress=not args.json)
    rows = study["rows"]
    keep = args.export_samples if args.export_samples is not None else 16 if 16 in study["modules"] else \
        max(study["modules"])
    module = study["modules"][keep]
    x = study["x_test"][: args.batch]
    latency = {"float_ms": median_latency(study["float_module"], x), f"psb_n{keep}_ms": median_latency(module, x)}
    module.export_library(args.out)
    if args.json:
        print(json.dumps({"rows": rows, "untuned_latency": latency, "exported": args.out, "exported_samples": keep}))
        return 0
    print("\nDigits CNN (scikit-learn digits test split, 450 images), PSB vs float, untuned TVM:\n")
    print(format_table(rows))
    print(f"\nUntuned latency, batch {args.batch}: float {latency['float_ms']:.3f} ms, "
          f"PSB n={keep} {latency[f'psb_n{keep}_ms']:.3f} ms")
    print(f"\n{module.report()}\n\nWrote {args.out} (n={keep}); load it with psb_tvm.load({args.out!r}).")
    return 0


# ---------------------------------------------------------------------------- parser
class _ParseError(Exception):
    """A command-line usage error found by argparse (exit code 2); the usage line is printed already."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting on a usage error, so ``main`` can add the ``--json``
    error object (sub-commands get this class too)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _ParseError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="psb-tvm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Compile ONNX models to PSB networks with TVM. {ACCURACY_KNOB}\n\n"
                    "One compiled module serves every n up to n_max (choose it per call, even per layer, with "
                    "--samples); 'psb-tvm eval' measures accuracy and cost at every n.",
        epilog="Exit codes: 0 ok, 2 bad usage or input, 1 internal error. Every command takes --json.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what psb_tvm does (stages, timings, cache) to stderr; also $PSB_TVM_LOG=info|debug")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="before compiling: every op and how it is handled, the PSB layers, the dynamic "
                                     "dims to fix; exit 2 when something is unsupported",
                       description="List every op of an ONNX model with how it is handled (imported, rewritten, "
                                   "unsupported), the dynamic input dimensions to fix and the linear layers that "
                                   "become PSB. Exit 0 when it compiles as checked, 2 with the list otherwise.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME=D0,D1,...",
                   help="fix an input's shape (repeatable), e.g. input=1,3,224,224")
    p.add_argument("--exclude", action="append", metavar="LAYER[,LAYER]", help="keep these layers float (repeatable)")
    p.add_argument("--exclude-first-last", action="store_true", help="keep the first and last convertible layers float")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compile", help="compile an ONNX model into one .so", description=f"Compile ONNX -> .so. {ACCURACY_KNOB}")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", help="output .so (default: <model>_psb.so in the current directory)")
    p.add_argument("--samples", type=_samples_spec, default=16, help=f"default {SAMPLES_HELP} (default 16)")
    p.add_argument("--seed", type=int, default=0, help="default draw of the sample stream (default 0)")
    p.add_argument("--frozen", action="store_true", help="bake one draw (samples, seed) into constants: no run-time n")
    p.add_argument("--tuning-db", metavar="DIR", help="reapply the schedules of 'psb-tvm tune --work-dir DIR'")
    p.add_argument("--no-cache", action="store_true", help="do not use or fill the compiled-module cache")
    p.add_argument("--kernel-report", type=_positive_int, metavar="N", default=0,
                   help="also generate each kernel's code alone and list the N slowest (finds a kernel that makes "
                        "the build slow; about one more build)")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled .so on .npy inputs", description=f"Run a compiled module. {ACCURACY_KNOB}")
    p.add_argument("model", help="compiled .so (psb-tvm compile / export_library)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input .npy files in input order, or NAME=path.npy")
    p.add_argument("-o", "--output", action="append", help="output .npy path (one per model output; default <output name>.npy)")
    p.add_argument("--out-dir", default=".", help="where default-named outputs go (default .)")
    p.add_argument("--samples", type=_samples_spec, default=None, help=f"{SAMPLES_HELP} (default: the compiled default)")
    p.add_argument("--seed", type=int, default=None, help="draw of the sample stream (default: the compiled seed)")
    p.add_argument("--nonfinite", choices=("error", "propagate"), default="error",
                   help="NaN / infinity in a float input: exit 2 naming it (default), or NaN outputs for that batch item")
    p.add_argument("--time", type=_positive_int, nargs="?", const=20, default=0, metavar="R",
                   help="also time R more runs (default 20) and print the median latency")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="accuracy / agreement / error vs n and cost; JSON, markdown, PNG plots",
                       description="Compile once, then measure the metric, top-1 agreement with float, relative output "
                                   f"error and cost (additions) at n = 1, 2, 4, ... n_max. {ACCURACY_KNOB}")
    p.add_argument("model", help="ONNX model, compiled .so, or 'digits' (the bundled CNN with its test split)")
    p.add_argument("--inputs", help="input set: a folder (.npy files or images; class sub-folders = labels), .npy or .npz")
    p.add_argument("--labels", help="labels: .npy or text file, one integer per line (or 'labels' in the .npz)")
    p.add_argument("--metric", choices=["accuracy", "top5", "agreement", "rel_error"],
                   help="default: accuracy with labels, else top-1 agreement with float")
    p.add_argument("--samples", type=_samples_list, default=None, help="n values, e.g. 1,2,4,8 (default: powers of two to n_max)")
    p.add_argument("--seeds", type=_ints, default=(0,), help="draws averaged per point, e.g. 0,1,2 (default 0)")
    _input_set_options(p)
    p.add_argument("--no-attention", action="store_true", help="skip the computational attention points")
    p.add_argument("--attention-fractions", type=_floats, default=(0.8, 1.0, 1.2),
                   help="attention thresholds (default 0.8,1,1.2)")
    p.add_argument("--allocate", action="store_true", help="add automatic per-layer allocations (psb_tvm.allocate) "
                                                           "at the error of each uniform n")
    p.add_argument("--out-dir", default=".", help="where eval.json, eval.md and the PNG plots go (default .)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("diagnose", help="per-layer error vs what sampling and activation rounding explain; saturation",
                       description="Compile for this host and compare, per PSB layer and at the outputs, the compiled "
                                   "error with the scheme's own (sampled weights, float activations) and with activation "
                                   "rounding alone; count inputs outside the calibrated range. Writes diagnosis.json, "
                                   "diagnosis.md and diagnosis.png.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--inputs", required=True, help="input set: a folder (.npy files or images), .npy or .npz")
    p.add_argument("--samples", type=_samples_spec, default=16, help=f"{SAMPLES_HELP} (default 16)")
    p.add_argument("--seed", type=int, default=0, help="draw of the sample stream (default 0)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="flag layers whose error exceeds (1 + tolerance) x (scheme + activation) (default 0.25)")
    _input_set_options(p)
    p.add_argument("--out-dir", default=".", help="where diagnosis.json, .md and .png go (default .)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fail-on-excess", action="store_true", help="exit 3 when some error is not explained")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("bench", help="median latency of a .so at given n (or the repository benchmarks)",
                       description="With a compiled module: median latency per n on random inputs. Without: "
                                   "benchmarks/run.py of a repository checkout (--quick unless --full).")
    p.add_argument("model", nargs="?", help="compiled .so (omit to run benchmarks/run.py)")
    p.add_argument("--samples", type=_samples_list, help="n values to time, e.g. 1,4,8,16 (default: the compiled n)")
    p.add_argument("--repeats", type=_positive_int, help="timed runs per n (default 20)")
    p.add_argument("--full", action="store_true", help="benchmarks/run.py: the full run (default --quick)")
    p.add_argument("--models", help="benchmarks/run.py: comma-separated models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="compile the bundled digits CNN at several n, print accuracy vs float, write the .so")
    p.add_argument("--samples", type=_samples_list, default=[1, 2, 4, 8, 16, 32],
                   help="sample counts to evaluate (default 1,2,4,8,16,32)")
    p.add_argument("--batch", type=_positive_int, default=50, help="compiled batch size (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sample stream seed (default 0)")
    p.add_argument("--out", default="digits_psb.so", help="where to write the compiled module (default digits_psb.so)")
    p.add_argument("--export-samples", type=int, default=None,
                   help="which n to export, one of --samples (default 16 if evaluated, else the largest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="a compiled module's metadata: layers, lowering, n_max, target, inputs/outputs")
    p.add_argument("model", help="compiled .so")
    p.add_argument("--json", action="store_true", help="the full metadata as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tune", help="tune the PSB kernels and float glue with MetaSchedule (XGBoost cost model)",
                       description="MetaSchedule tuning of the kernels 'compile' would build, into a resumable database "
                                   "that 'compile --tuning-db' reapplies. Pass the same model options to both.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--work-dir", default="psb_tuning", help="tuning database directory (default psb_tuning); rerun to resume")
    p.add_argument("--trials", type=_nonnegative_int, default=256, help="total measured candidates in the database (default 256)")
    p.add_argument("--trials-per-task", type=_positive_int, help="cap per kernel (default: no cap)")
    p.add_argument("--samples", type=int, default=8, help="n the kernels are compiled for (schedules serve every n; default 8)")
    p.add_argument("--threads", type=_positive_int, help="threads the kernels are timed with = the threads they will run with "
                                               "(default: the target's num-cores, else this machine's cores)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device registered with TVM's RPC tracker")
    p.add_argument("--rpc-key", help="the device key registered with the tracker")
    p.add_argument("--timeout", type=_positive_float, default=30.0,
                   help="seconds per build / run before a candidate fails (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tune)
    return parser


def _configure_logging(verbose: bool) -> None:
    """``--verbose`` or ``$PSB_TVM_LOG`` (a level name): psb_tvm's log on stderr."""
    level = os.environ.get("PSB_TVM_LOG", "").strip().upper() or ("INFO" if verbose else "")
    if not level:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"$PSB_TVM_LOG must be debug, info, warning or error, got {level.lower()!r}")
    log = logging.getLogger("psb_tvm")
    if not any(getattr(h, "_psb_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("psb_tvm %(levelname)s: %(message)s"))
        handler._psb_cli = True
        log.addHandler(handler)
    log.setLevel(level)


def main(argv=None) -> int:

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParseError as err:  # a usage error: exit 2 (with the JSON error object under --json)
        print(err, file=sys.stderr)
        if "--json" in (sys.argv[1:] if argv is None else [str(a) for a in argv]):
            print(json.dumps({"error": str(err), "exit_code": 2}))
        return 2
    except SystemExit as exc:  # --help, --version (0)
        return int(exc.code or 0)
    json_mode = getattr(args, "json", False)

    def fail(code, msg):
        # one line: messages that quote a multi-line error (TVM's, say) keep it on the same line
        msg = " | ".join(line.strip() for line in str(msg).strip().splitlines() if line.strip()) or repr(msg)
        print(f"psb-tvm {args.command}: error: {msg}", file=sys.stderr)
        if json_mode:
            print(json.dumps({"error": msg, "exit_code": code}))
        return code

    try:
        _configure_logging(args.verbose)
        return args.func(args)
    except (UsageError, PSBError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        return fail(2, str(err))
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 1
    except KeyboardInterrupt:
        return fail(1, "interrupted")
    except Exception as err:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        if os.environ.get("PSB_TVM_DEBUG"):
            raise
        return fail(1, f"internal error: {type(err).__name__}: {err} (set PSB_TVM_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
