"""GPU device check: ``prepare`` here (TVM compiler, no GPU), ``run`` there (GPU, runtime only).

Usage and the layout of OUT_DIR: see tools/gpu_check.sh. ``prepare`` imports psb_tvm and the full
TVM; ``run`` imports only numpy and ``tvm_ffi`` (plus torch on cuda), loads TVM's runtime
libraries from OUT_DIR/runtime/lib with ctypes and drives the Relax VM through its packed
functions, so the GPU side needs no TVM compiler and no ``tvm`` Python package.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = (1, 8, 16)  # PSB sample counts checked and timed (one module serves all: run-time n)
SEED = 0
CARRY_LIMIT = 64 * 2**20  # the device tool's working-tree limit; OUT_DIR travels inside it
# libcuda symbols that libtvm_runtime_cuda.so links against (nm -D --undefined-only, TVM 0.27)
_CUDA_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                        "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                        "cuTensorMapEncodeTiled")
#: Variants sampled at run time: (sampler, lowering). psb: the default (stratified, intdot where the
#: cost rule picks it); psb_iid: the i.i.d. sampler; _shiftadd / _bitserial: every layer in that lowering.
SAMPLED_VARIANTS = {"psb": ("stratified", "auto"), "psb_iid": ("iid", "auto"),
                    "psb_shiftadd": ("stratified", "shiftadd"), "psb_iid_shiftadd": ("iid", "shiftadd"),
                    "psb_bitserial": ("stratified", "bitserial"), "psb_iid_bitserial": ("iid", "bitserial")}
# pass criteria vs the CPU reference: max |err| <= rtol * max |ref|, and top-1 agreement
TOLERANCE = {**{v: {"rtol": 2e-2, "top1": 0.98} for v in SAMPLED_VARIANTS}, "psb_int8": {"rtol": 2e-2, "top1": 0.98},
             "fp32": {"rtol": 1e-3, "top1": 1.0}, "fp16": {"rtol": 5e-2, "top1": 0.95}}
#: psb*: sampled at run time (n = SAMPLES; SAMPLED_VARIANTS); psb_int8: the int8 preset frozen at INT8_SAMPLES (weights
#: prepacked for __dp4a); fp32 / fp16: TVM's float module of the same model.
VARIANTS = (*SAMPLED_VARIANTS, "psb_int8", "fp32", "fp16")
INT8_SAMPLES = 8
INPUT_GRID = 32  # image inputs are int8 codes / INPUT_GRID (see _model_data)
# MobileNetV2's fp32 module only at batch 64: with it at batch 1 too the check is over 64 MiB
DEFAULT_MODELS = "digits,mobilenetv2:psb_int8+fp16+fp32@64"


# ============================================================================ prepare (here)
def _cuda_runtime_for_build(workdir: str) -> str:
    """Make TVM's CUDA runtime (``libtvm_runtime_cuda.so``) load on a machine with no driver.

    With it loaded, ``tvm.compile`` for cuda calls ``tvm_callback_cuda_compile`` at *build* time
    and the exported library holds its binary output; without it the library holds CUDA source
    that the GPU side must compile at load time (NVRTC or nvcc through a Python callback).
    The runtime only needs ``libcuda.so.1`` to link: a stub whose functions return
    CUDA_ERROR_NO_DEVICE is enough, since nothing is launched here. Returns "fatbin" or "source".
    """
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            return "source"
        src = os.path.join(workdir, "cuda_stub.c")
        lib = os.path.join(workdir, "libcuda.so.1")
        with open(src, "w") as f:
            f.write("".join(f"int {s}(void) {{ return 100; }}\n" for s in _CUDA_DRIVER_SYMBOLS))
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", lib, src], check=True)
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    import tvm  # noqa: F401
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        import tvm.backend.cuda as backend_cuda

        backend_cuda.register_backend()
    if "tvm_runtime_cuda" not in _LOADED_LIBS or shutil.which("nvcc") is None:
        return "source"
    return "fatbin"


def _register_nvcc_callback(target, arch: str) -> None:
    """Build-time CUDA compile: nvcc -> fatbin with SASS for ``arch`` and PTX (JIT for newer GPUs)."""
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    number = arch.replace("sm_", "")
    virtual = number.rstrip("a")
    gencode = ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{virtual if number.endswith('a') else number}]"]
    if number.endswith("a"):  # sm_90a SASS is arch-specific; compute_90a PTX only JITs to sm_90a
        gencode = ["-gencode", f"arch=compute_{number},code=sm_{number}",
                   "-gencode", f"arch=compute_{virtual},code=compute_{virtual}"]

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        with target:
            return nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc")

    del tvm


def _cuda_target(arch: str):
    import tvm

    config = dict(tvm.target.Target("nvidia/nvidia-h100").export())
    config["arch"] = arch
    config.pop("tag", None)
    return tvm.target.Target(config)


def _fp16(onnx_model, target, input_shapes):
    """TVM fp16: the float module through ``relax.transform.ToMixedPrecision(out_dtype="float16")``
    (fp16 storage and compute; the fp32 input and output are cast in the module)."""
    from tvm import relax

    from psb_tvm.build import build
    from psb_tvm.compiler import lower
    from psb_tvm.config import PSBConfig
    from psb_tvm.runtime import PSBModule

    mod, metadata, tgt = lower(onnx_model, target, input_shapes=input_shapes, config=PSBConfig(include=()))
    mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    executable, metadata = build(mod, tgt, metadata=dataclasses.replace(metadata, extra={**metadata.extra, "precision": "fp16"}))
    return PSBModule(executable, metadata, executable=executable)


def _model_data(name: str, batch: int):
    """(onnx model, input [batch, ...] float32, calibration [N, ...] float32)."""
    sys.path.insert(0, REPO)
    from benchmarks import models

    if name == "digits":
        from psb_tvm.data.digits import load_digits_split

        x_train, _, x_test, _ = load_digits_split()
        return models.digits(), np.ascontiguousarray(x_test[:batch]), x_train[:256]
    rng = np.random.default_rng(1)
    shape = models.IMAGE_SHAPE[1:]
    model = models.BUILDERS[name]()
    for value in (model.graph.input[0], model.graph.output[0]):  # batch-1 graphs: make the batch free
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    # Inputs on a 1/32 grid (int8 codes / 32, exact in float32): they travel as int8, a quarter of
    # the carry limit's bytes (a float32 batch of 64 images is 38 MB).
    codes = np.clip(np.rint(rng.standard_normal((batch, *shape)) * INPUT_GRID), -128, 127)
    return model, (codes / INPUT_GRID).astype(np.float32), \
        rng.standard_normal((8, *shape)).astype(np.float32)


def _float_reference(model, x):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _copy_runtime(out: str, python_version: str) -> dict:
    """TVM's runtime libraries (no compiler), libcudart and the apache-tvm-ffi wheel for the GPU side."""
    import tvm

    rt = os.path.join(out, "runtime")
    os.makedirs(os.path.join(rt, "lib"), exist_ok=True)
    tvm_lib = os.path.join(os.path.dirname(tvm.__file__), "lib")
    copied = []
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so", "libtvm_runtime_extra.so"):
        if os.path.exists(os.path.join(tvm_lib, name)):
            shutil.copy2(os.path.join(tvm_lib, name), os.path.join(rt, "lib", name))
            copied.append(name)
    for cand in ("/usr/local/cuda/lib64/libcudart.so.13", "/usr/local/cuda-13.0/lib/libcudart.so.13",
                 "/usr/local/cuda/lib/libcudart.so.13"):
        if os.path.exists(cand):
            shutil.copy2(os.path.realpath(cand), os.path.join(rt, "lib", "libcudart.so.13"))
            copied.append("libcudart.so.13")
            break
    from importlib.metadata import version as dist_version

    version = dist_version("apache-tvm-ffi")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", rt, f"apache-tvm-ffi=={version}"]
    wheel = None
    try:
        subprocess.run(cmd, check=True, timeout=300, capture_output=True)
        wheel = next((f for f in os.listdir(rt) if f.endswith(".whl")), None)
    except (subprocess.SubprocessError, OSError) as err:
        print(f"warning: pip download of apache-tvm-ffi=={version} failed ({err}); the GPU side needs it installed",
              file=sys.stderr)
    return {"libs": copied, "tvm_ffi_wheel": wheel, "tvm_ffi_version": version, "tvm_version": tvm.__version__,
            "python_version": python_version}


def _model_variants(models: str, variants: str) -> list:
    """``"digits,mobilenetv2:psb_int8+fp16@64"`` -> [("digits", [default variants]), ("mobilenetv2",
    ["psb_int8", "fp16@64"])]: a variant with ``@b/b`` is built at those batches only; unknown
    names are errors."""
    sys.path.insert(0, REPO)
    from benchmarks.models import BUILDERS

    out = []
    for item in models.split(","):
        name, _, own = item.partition(":")
        chosen = own.split("+") if own else variants.split(",")
        if name not in BUILDERS:
            raise SystemExit(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
        bad = sorted({c.partition("@")[0] for c in chosen} - set(VARIANTS))
        if bad:
            raise SystemExit(f"unknown variants {bad} for {name}; expected some of {list(VARIANTS)}")
        out.append((name, chosen))
    return out


def _variants_at(variants: list, batch: int) -> list:
    """The variant names of ``variants`` (``name`` or ``name@b/b``) built at ``batch``, in order."""
    out = []
    for v in variants:
        name, _, only = v.partition("@")
        if not only or str(batch) in only.split("/"):
            out.append(name)
    return out


#: The attention call recorded at prepare time: a low-n pass everywhere, high n where the entropy
#: of the low pass is in the top half (the masked kernels compute only those positions).
ATTEND = {"low": 2, "high": 16, "fraction": 0.5}


def _record_attend(module, x: np.ndarray, path: str) -> str | None:
    """Run ``module.attend`` (CPU) once and save the arguments it passes to the VM's ``attend``
    function (the low-n layer outputs, the position lists, the counts) and its output, so the GPU
    side can call the same function with the same arguments and compare: the masked kernels. None
    when the module has no spatial PSB layer or the mask selected everything or nothing."""
    import tvm

    real, recorded = module._machine(), {}

    class _Recorder:  # the VM, with its "attend" function recording its arguments and result
        def __getitem__(self, name):
            func = real[name]
            if name != "attend":
                return func

            def call(*args):
                recorded["out"] = func(*args)
                recorded["args"] = args
                return recorded["out"]
            return call

    module._local.vm = _Recorder()
    try:
        module.attend(x, seed=SEED, **ATTEND)
    except Exception:  # noqa: BLE001 - no spatial PSB layer: nothing to record
        return None
    finally:
        module._local.vm = real
    if "args" not in recorded:
        return None
    arrays, kinds = {}, []
    for i, a in enumerate(recorded["args"]):
        if isinstance(a, tvm.runtime.ShapeTuple):
            arrays[f"arg_{i}"], kind = np.asarray(list(a), np.int64), "shape"
        else:
            arrays[f"arg_{i}"], kind = a.numpy(), "tensor"
        kinds.append(kind)
    arrays["ref"] = recorded["out"].numpy()
    np.savez(path, kinds=np.asarray(kinds), **arrays)
    return os.path.basename(path)


def prepare(args) -> int:
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    work = tempfile.mkdtemp(prefix="gpu_check_")
    binary = "source" if args.device == "cpu" else _cuda_runtime_for_build(work)
    import warnings

    import psb_tvm
    from psb_tvm.config import PSBConfig

    if args.device == "cpu":
        from psb_tvm.target import host_target

        target = host_target()
    else:
        target = _cuda_target(args.arch)
        if binary == "fatbin":
            _register_nvcc_callback(target, args.arch)
    manifest = {"device": args.device, "arch": args.arch if args.device == "cuda" else None,
                "cuda_binary": binary if args.device == "cuda" else None, "target": str(target),
                "samples": list(SAMPLES), "seed": SEED, "tolerance": TOLERANCE, "modules": [], "errors": []}
    batches = [int(b) for b in args.batches.split(",")]
    for name, variants in _model_variants(args.models, args.variants):
        for batch in batches:
            model, x, calib = _model_data(name, batch)
            shapes = {"input": tuple(x.shape)}
            stem = f"{name}_b{batch}"
            codes = x * INPUT_GRID
            if name != "digits" and np.array_equal(codes, np.rint(codes)) and np.abs(codes).max() <= 128:
                np.save(os.path.join(out, f"{stem}_input.npy"), codes.astype(np.int8))  # run divides by INPUT_GRID
                input_scale = 1.0 / INPUT_GRID
            else:
                np.save(os.path.join(out, f"{stem}_input.npy"), x)
                input_scale = None
            refs, attend_files = {}, {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.time()
                wanted = _variants_at(variants, batch)
                for variant, (sampler, lowering) in SAMPLED_VARIANTS.items():
                    if variant in wanted:
                        cpu = psb_tvm.compile(model, target="llvm", samples=16, seed=SEED, input_shapes=shapes,
                                              calibration={"input": calib},
                                              config=PSBConfig(sampler=sampler, lowering=lowering))
                        for n in SAMPLES:
                            refs[f"{variant}_n{n}"] = f"{stem}_ref_{variant}_n{n}.npy"
                            np.save(os.path.join(out, refs[f"{variant}_n{n}"]), cpu.run(x, samples=n, seed=SEED))
                        attend_files[variant] = _record_attend(cpu, x, os.path.join(out, f"{stem}_attend_{variant}.npz"))
                if "psb_int8" in wanted:  # the same frozen int8 module, built for the CPU
                    cpu = psb_tvm.compile(model, target="llvm", samples=INT8_SAMPLES, seed=SEED, input_shapes=shapes,
                                          calibration={"input": calib}, config=PSBConfig.preset("int8"), frozen=True)
                    refs["psb_int8"] = f"{stem}_ref_psb_int8.npy"
                    np.save(os.path.join(out, refs["psb_int8"]), cpu.run(x))
                if {"fp32", "fp16"} & set(wanted):
                    fref = _float_reference(model, x)
                    if fref is None:
                        fref = psb_tvm.compile(model, target="llvm", input_shapes=shapes,
                                               config=PSBConfig(include=())).run(x)
                    refs["float"] = f"{stem}_ref_float.npy"
                    np.save(os.path.join(out, refs["float"]), fref)
                print(f"{stem}: CPU references {time.time() - t0:.1f} s", flush=True)
                builders = {
                    **{v: (lambda sampler, lowering: lambda: psb_tvm.compile(
                        model, target=target, samples=16, seed=SEED, input_shapes=shapes, calibration={"input": calib},
                        config=PSBConfig(sampler=sampler, lowering=lowering)))(*sl) for v, sl in SAMPLED_VARIANTS.items()},
                    "psb_int8": lambda: psb_tvm.compile(model, target=target, samples=INT8_SAMPLES, seed=SEED,
                                                        input_shapes=shapes, calibration={"input": calib},
                                                        config=PSBConfig.preset("int8"), frozen=True),
                    "fp32": lambda: psb_tvm.compile(model, target=target, input_shapes=shapes, config=PSBConfig(include=())),
                    "fp16": lambda: _fp16(model, target, shapes),
                }
                for variant in wanted:
                    t0 = time.time()
                    try:
                        module = builders[variant]()
                        path = os.path.join(out, f"{stem}_{variant}.so")
                        module.export_library(path)
                    except Exception as err:  # noqa: BLE001 - report and continue (fp16 may not build)
                        msg = f"{stem} {variant}: build failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                        print(msg, flush=True)
                        manifest["errors"].append(msg)
                        continue
                    ref_keys = ([f"{variant}_n{n}" for n in SAMPLES] if variant in SAMPLED_VARIANTS
                                else ["psb_int8"] if variant == "psb_int8" else ["float"])
                    entry = {"model": name, "batch": batch, "variant": variant, "file": os.path.basename(path),
                             "input": f"{stem}_input.npy", "input_shape": list(x.shape), "input_scale": input_scale,
                             "refs": {k: refs[k] for k in ref_keys},
                             "runtime_args": bool(module.metadata.get("runtime_args")),
                             "n_psb_layers": len(module.psb_layers), "bytes": os.path.getsize(path),
                             "layouts": sorted({l.get("weight_layout") for l in module.layers if l["status"] == "psb"}),
                             "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
                    if attend_files.get(variant):
                        entry["attend"] = attend_files[variant]
                    manifest["modules"].append(entry)
                    print(f"{stem} {variant}: built {time.time() - t0:.1f} s, {entry['bytes'] / 2**20:.2f} MiB", flush=True)
    if not args.no_runtime:
        manifest["runtime"] = _copy_runtime(out, args.python_version)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    manifest["total_bytes"] = total
    manifest["prepare_seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}: {len(manifest['modules'])} modules, {total / 2**20:.1f} MiB in total"
          f" (carry limit {CARRY_LIMIT / 2**20:.0f} MiB), CUDA code as {manifest['cuda_binary']}")
    if total > CARRY_LIMIT:
        print(f"warning: {out} is over the device tool's {CARRY_LIMIT / 2**20:.0f} MiB carry limit", file=sys.stderr)
    return 0 if not manifest["errors"] or all(" fp16:" in e for e in manifest["errors"]) else 1


# ============================================================================ run (there)
def _load_runtime(out: str, device: str):
    """Import tvm_ffi and load TVM's runtime libraries (VM, and CUDA on cuda) without ``tvm``."""
    import tvm_ffi

    libdir = os.path.join(out, "runtime", "lib")
    if not os.path.isdir(libdir):  # dry run here: the installed tvm's libraries
        import importlib.util

        spec = importlib.util.find_spec("tvm")
        libdir = os.path.join(os.path.dirname(spec.origin), "lib")
    if os.path.exists(os.path.join(libdir, "libcudart.so.13")) and device == "cuda":
        try:
            ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            ctypes.CDLL(os.path.join(libdir, "libcudart.so.13"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(os.path.join(libdir, "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    for extra in ("libtvm_runtime_extra.so",) + (("libtvm_runtime_cuda.so",) if device == "cuda" else ()):
        if os.path.exists(os.path.join(libdir, extra)):
            ctypes.CDLL(os.path.join(libdir, extra), mode=ctypes.RTLD_LOCAL)
    if device == "cuda" and tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True) is None:
        _register_runtime_nvcc()
    return tvm_ffi


def _register_runtime_nvcc():
    """Only for modules that hold CUDA source (prepare found no way to compile here): nvcc there."""
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "k.cu"), os.path.join(d, "k.fatbin")
            with open(src, "w") as f:
                f.write(code)
            subprocess.run(["nvcc", "--fatbin", "-O3", "-arch=native", "--use_fast_math", "-o", dst, src], check=True)
            return bytearray(open(dst, "rb").read())


class _Machine:
    """The Relax VM of one exported module, driven through packed functions (no ``tvm`` package)."""

    def __init__(self, ffi, path: str, device: str):
        self.ffi, self.device = ffi, device
        lib = ffi.load_module(path)
        self.vm = lib["vm_load_executable"]()
        pooled = 2
        if device == "cuda":
            self.vm["vm_initialization"](2, 0, pooled, 1, 0, pooled)  # kDLCUDA 0, host kDLCPU 0
        else:
            self.vm["vm_initialization"](1, 0, pooled)
        self.main = self.vm["main"]
        if device == "cuda":
            import torch

            self.torch = torch

    def to_device(self, x: np.ndarray):
        if self.device == "cuda":
            return self.torch.from_numpy(x).cuda()
        return self.ffi.from_dlpack(x)

    def to_numpy(self, out) -> np.ndarray:
        if self.device == "cuda":
            return self.torch.from_dlpack(out).cpu().numpy()
        return np.from_dlpack(out).copy()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time(self, args, warmup: int, runs: int, budget_s: float) -> dict:
        for _ in range(warmup):
            self.main(*args)
        self.sync()
        times, t_end = [], time.perf_counter() + budget_s
        if self.device == "cuda":
            torch = self.torch
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(runs):
                start.record()
                self.main(*args)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
                if time.perf_counter() > t_end and len(times) >= 5:
                    break
        else:
            for _ in range(runs):
                t0 = time.perf_counter()
                self.main(*args)
                times.append((time.perf_counter() - t0) * 1e3)
                if time.perf_counter() > t_end and len(times) >= 3:
                    break
        return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def _profile(machine: "_Machine", args, iters: int = 5, top: int = 12) -> list:
    """Per-kernel GPU time of one call (torch.profiler / CUPTI sees every kernel in the process,
    TVM's too): ``[{kernel, us_per_call, launches_per_call}]``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    machine.main(*args)
    machine.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            machine.main(*args)
        machine.sync()
    rows = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows[ev.key] = (t / iters, ev.count / iters)
    total = sum(t for t, _ in rows.values())
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    return [{"kernel": k[:80], "us_per_call": round(t, 2), "share": round(t / total, 4) if total else 0.0,
             "launches_per_call": c} for k, (t, c) in ranked[:top]] + [{"kernel": "(all kernels)",
                                                                        "us_per_call": round(total, 2)}]


#: torchvision models of the same architecture as benchmarks/models.py (not the same weights):
#: cuDNN's timings as context for TVM's, where torchvision is installed.
TORCH_MODELS = {"mobilenetv2": "mobilenet_v2", "resnet18": "resnet18"}


def _torch_baseline(name: str, batch: int, warmup: int, runs: int, budget_s: float) -> list:
    """Time torchvision's ``name`` in fp32 and fp16 (channels last, cuDNN autotuned) at ``batch``."""
    import torch
    import torchvision

    rows = []
    torch.backends.cudnn.benchmark = True
    for dtype in (torch.float32, torch.float16):
        model = getattr(torchvision.models, TORCH_MODELS[name])(weights=None).eval().cuda()
        model = model.to(dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times, t_end = [], time.perf_counter() + budget_s
            for _ in range(runs):
                start.record()
                model(x)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
                if time.perf_counter() > t_end and len(times) >= 5:
                    break
        rows.append({"model": name, "batch": batch, "variant": f"torch {str(dtype).split('.')[-1]} (cuDNN)",
                     "median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)})
    return rows


def _compare(out: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = np.abs(out - ref)
    scale = max(float(np.abs(ref).max()), 1e-12)
    top1 = float(np.mean(out.reshape(out.shape[0], -1).argmax(-1) == ref.reshape(ref.shape[0], -1).argmax(-1)))
    finite = bool(np.isfinite(out).all())
    ok = finite and float(err.max()) <= tol["rtol"] * scale and top1 >= tol["top1"]
    return {"max_abs": float(err.max()), "max_rel": float(err.max() / scale), "top1_agree": top1,
            "finite": finite, "ok": bool(ok)}


def _check_attend(m: "_Machine", x, path: str, tol: dict, entry: dict, results: dict, rows: list) -> None:
    """Call the module's ``attend`` with the arguments recorded on the CPU (``_record_attend``; the
    input on this device) and compare with the CPU's output: the masked kernels."""
    what = f"attend n={ATTEND['low']}->{ATTEND['high']} f={ATTEND['fraction']}"
    name = f"{entry['model']} b{entry['batch']} {entry['variant']} {what}"
    try:
        data = np.load(path)
        call_args = []
        for i, kind in enumerate(data["kinds"]):
            a = data[f"arg_{i}"]
            call_args.append(x if i == 0 else m.ffi.Shape([int(v) for v in a]) if kind == "shape"
                             else m.to_device(np.ascontiguousarray(a)))
        got = m.to_numpy(m.vm["attend"](*call_args))
        check = _compare(got, data["ref"], tol)
    except Exception as err:  # noqa: BLE001 - record and go on
        results["checks"].append({"module": name, "error": f"{type(err).__name__}: {err}"[:500]})
        print(f"{name}: failed: {err}", flush=True)
        return
    results["checks"].append({"module": name, **check})
    rows.append((entry["model"], entry["batch"], f"{entry['variant']} {what}", "-", "-", "-",
                 f"{check['max_abs']:.3g}", f"{check['max_rel']:.3g}", f"{check['top1_agree']:.3f}",
                 "ok" if check["ok"] else "FAIL"))
    print(" | ".join(str(c) for c in rows[-1]), flush=True)


def run(args) -> int:
    out = os.path.abspath(args.out_dir)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    if args.device != manifest["device"]:
        print(f"error: {out} was prepared for {manifest['device']}, not {args.device}", file=sys.stderr)
        return 2
    t_start = time.time()
    ffi = _load_runtime(out, args.device)
    rows, results = [], {"device": args.device, "manifest": {k: manifest[k] for k in ("arch", "cuda_binary", "target")},
                         "checks": [], "timings": []}
    if args.device == "cuda":
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    for entry in manifest["modules"]:
        label = f"{entry['model']} b{entry['batch']} {entry['variant']}"
        try:
            t0 = time.perf_counter()
            m = _Machine(ffi, os.path.join(out, entry["file"]), args.device)
            x = np.load(os.path.join(out, entry["input"]))
            if entry.get("input_scale"):  # int8 codes on a grid: exact float32 values
                x = (x.astype(np.float32) * np.float32(entry["input_scale"])).astype(np.float32)
            x = m.to_device(np.ascontiguousarray(x))
            load_s = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - record and go on with the others
            results["checks"].append({"module": label, "error": f"load: {type(err).__name__}: {err}"[:500]})
            print(f"{label}: load failed: {err}", flush=True)
            continue
        tol = manifest["tolerance"][entry["variant"]]
        variants = [(n, [x, ffi.Shape([n] * entry["n_psb_layers"]), ffi.Shape([manifest["seed"]])])
                    for n in manifest["samples"]] if entry["runtime_args"] else [(None, [x])]
        for n, call_args in variants:
            key = f"{entry['variant']}_n{n}" if n is not None else next(iter(entry["refs"]))
            name = label + (f" n={n}" if n is not None else "")
            try:
                got = m.to_numpy(m.main(*call_args))
                check = _compare(got, np.load(os.path.join(out, entry["refs"][key])), tol)
                timing = m.time(call_args, args.warmup, args.runs, args.budget_s)
            except Exception as err:  # noqa: BLE001
                results["checks"].append({"module": name, "error": f"{type(err).__name__}: {err}"[:500]})
                print(f"{name}: failed: {err}", flush=True)
                continue
            if n == manifest["samples"][-1] and entry.get("attend"):
                _check_attend(m, x, os.path.join(out, entry["attend"]), tol, entry, results, rows)
            if args.profile and args.device == "cuda" and entry["variant"] in args.profile.split(","):
                try:
                    results.setdefault("profiles", {})[name] = _profile(m, call_args)
                    print(f"{name}: " + "; ".join(f"{r['kernel']} {r['us_per_call']} us"
                                                  for r in results["profiles"][name][:6]), flush=True)
                except Exception as err:  # noqa: BLE001 - the profile is extra information
                    print(f"{name}: profile failed: {err}", flush=True)
            results["checks"].append({"module": name, "load_s": round(load_s, 3), **check})
            results["timings"].append({"model": entry["model"], "batch": entry["batch"], "variant": entry["variant"],
                                       "samples": n, **timing})
            rows.append((entry["model"], entry["batch"], entry["variant"] + (f" n={n}" if n else ""),
                         f"{timing['median_ms']:.3f}", f"{timing['min_ms']:.3f}", timing["runs"],
                         f"{check['max_abs']:.3g}", f"{check['max_rel']:.3g}", f"{check['top1_agree']:.3f}",
                         "ok" if check["ok"] else "FAIL"))
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    if args.torch_baseline and args.device == "cuda":
        for model, batch in sorted({(e["model"], e["batch"]) for e in manifest["modules"] if e["model"] in TORCH_MODELS}):
            try:
                for row in _torch_baseline(model, batch, args.warmup, args.runs, args.budget_s):
                    results.setdefault("baselines", []).append(row)
                    rows.append((model, batch, row["variant"], f"{row['median_ms']:.3f}", f"{row['min_ms']:.3f}",
                                 row["runs"], "-", "-", "-", "other weights"))
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
            except Exception as err:  # noqa: BLE001 - context only (torchvision may be missing)
                print(f"torch baseline {model} b{batch}: {type(err).__name__}: {err}", flush=True)
    head = ("model", "batch", "variant", "median ms", "min ms", "runs", "max abs err", "max rel err", "top-1 agree", "check")
    table = (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
             + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
    results["table"] = "\n".join(table)
    results["seconds"] = round(time.time() - t_start, 1)
    failed = [c for c in results["checks"] if "error" in c or not c.get("ok")]
    results["passed"] = not failed
    print(f"\n{results.get('gpu', args.device)}; {len(results['checks'])} checks, {len(failed)} failed, "
          f"{results['seconds']} s\n")
    print(results["table"])
    dest = args.results or os.path.join(os.environ.get("OUT", out), "gpu_check_results.json")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.splitext(dest)[0] + ".md", "w") as f:
        f.write(results["table"] + "\n")
    print(f"\nwrote {dest}")
    return 0 if not failed else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="compile modules, references and runtime pieces into OUT_DIR (no GPU)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="sm_90", help="CUDA architecture of the fatbin's SASS (default sm_90; PTX included)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma list of models from benchmarks/models.py, each optionally with its own variants "
                        f"(name:v+v); default {DEFAULT_MODELS} (resnet18 modules are over the 64 MiB carry limit)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--variants", default=None,
                   help="default psb,psb_iid,psb_int8,fp32,fp16 (cpu: psb,psb_iid,psb_int8,fp32; an fp16 llvm "
                        "module crashes in its cast kernel when driven by the runtime-only libraries)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: llvm modules, for a dry run here")
    p.add_argument("--quick", action="store_true", help="digits, batch 1 and 64 only (the default set) and no wheel download")
    p.add_argument("--no-runtime", action="store_true", help="do not copy the runtime libraries / tvm-ffi wheel")
    p.add_argument("--python-version", default="3.12", help="Python of the GPU side, for the tvm-ffi wheel")
    r = sub.add_parser("run", help="check and time the modules of OUT_DIR (GPU side, runtime only)")
    r.add_argument("out_dir")
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--runs", type=int, default=200)
    r.add_argument("--budget-s", type=float, default=3.0, help="time budget per timed configuration")
    r.add_argument("--profile", default="", help="comma list of variants to profile per kernel (torch.profiler), e.g. psb_int8")
    r.add_argument("--torch-baseline", action="store_true",
                   help="also time torchvision's model of the same architecture (fp32/fp16, cuDNN) as context")
    r.add_argument("--results", default=None, help="results JSON path (default $OUT or OUT_DIR/gpu_check_results.json)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.quick:
            args.models, args.no_runtime = "digits", True
        if args.variants is None:
            args.variants = "psb,psb_iid,psb_int8,fp32,fp16" if args.device == "cuda" else "psb,psb_iid,psb_int8,fp32"
        return prepare(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
