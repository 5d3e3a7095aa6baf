"""Tutorial 1: compile an ONNX model into a PSB module, run it, export it, deploy it.

    python tutorials/01_compile_and_deploy.py [--fast] [--out-dir DIR] [--runner PATH/psb_run]

What happens, top to bottom:

1. compile the bundled digits CNN (an 8x8 handwritten-digit classifier, ONNX) into a progressive
   stochastic binarized (PSB) network, with real images as calibration data;
2. run it from Python and measure test accuracy (against the float model);
3. export everything (code, weights, PSB metadata) to one ``.so`` and load it back with
   ``psb_tvm.load``: the loaded module gives the same bits;
4. look inside the ``.so`` with ``psb-tvm info``;
5. run the ``.so`` without Python with the C++ runner ``psb_run`` on ``.npy`` files (built here
   with cmake via ``tools/build_runner.sh`` when cmake and g++ are available).

Nothing is written into the repository: files go to ``--out-dir`` (default: a temporary folder,
removed at the end).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

REPO = pathlib.Path(__file__).resolve().parents[1]  # tools/build_runner.sh lives in the source tree


def accuracy(module, x, y, batch, **run_kwargs):
    """Top-1 accuracy of ``module`` over ``x`` (its compiled batch size is fixed: run it in chunks)."""
    preds = [module.run(x[i:i + batch], **run_kwargs).argmax(1) for i in range(0, len(x), batch)]
    return float((np.concatenate(preds) == y).mean())


def psb_tvm_cli():
    """The ``psb-tvm`` command of this Python environment (or ``python -m psb_tvm.cli``)."""
    exe = pathlib.Path(sys.executable).with_name("psb-tvm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "psb_tvm.cli"]


def build_runner(build_dir: pathlib.Path) -> pathlib.Path | None:
    """Build psb_run for this machine with tools/build_runner.sh; None (and why) when impossible."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    script = REPO / "tools" / "build_runner.sh"
    if missing or not script.exists():
        why = f"missing {missing}" if missing else f"{script} not found (run from a source checkout)"
        print(f"SKIPPED the C++ runner: {why} (Debian: apt-get install cmake g++)")
        return None
    print(f"building psb_run with {script.relative_to(REPO)} host {build_dir} ...")
    env = dict(os.environ, PSB_PYTHON=sys.executable)  # the runner links the runtime of this venv's wheels
    proc = subprocess.run(["bash", str(script), "host", str(build_dir)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        raise SystemExit("building psb_run failed")
    return build_dir / "psb_run"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer test images and timing runs")
    parser.add_argument("--out-dir", help="where the .so and .npy files go (default: a temporary folder)")
    parser.add_argument("--runner", help="an already built psb_run (default: build one into the out dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # the TVM runtime defaults to 1 thread

    with tempfile.TemporaryDirectory(prefix="psb_tutorial01_") as tmp:
        out = pathlib.Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        run(args, out)


def run(args, out: pathlib.Path):
    # ------------------------------------------------------------------ 1. data and model
    # The scikit-learn digits: 8x8 grey images in [0, 1], shape [N, 1, 8, 8]. The CNN was trained
    # on x_train; x_test (450 images) is held out.
    x_train, _, x_test, y_test = load_digits_split()
    batch = 50
    n_test = 150 if args.fast else len(x_test)  # a multiple of the batch size
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    print(f"model: {DIGITS_ONNX.name}, {n_test} test images, batch {batch}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")

    # ------------------------------------------------------------------ 2. compile
    # * input_shapes fixes the dynamic batch dimension of the ONNX input "input";
    # * calibration: real inputs, run through the float model once to pick each PSB layer's
    #   activation scale (a power of two). Without it psb_tvm uses random inputs and warns;
    # * samples=16 is only the *default* n: the same module runs any power of two <= n_max (64)
    #   at run time (tutorial 2);
    # * target="llvm" means this machine's CPU (detected), never generic x86.
    t = time.perf_counter()
    module = psb_tvm.compile(DIGITS_ONNX, target="llvm", samples=16, seed=0,
                             input_shapes={"input": (batch, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    print(f"compiled in {time.perf_counter() - t:.1f} s: {module}")
    print(module.report())  # which layers became PSB, their lowering and activation type

    # The float model, compiled by the same pipeline with no PSB layer, is the reference.
    float_module = psb_tvm.compile(DIGITS_ONNX, input_shapes={"input": (batch, 1, 8, 8)},
                                   config=psb_tvm.PSBConfig(include=()))

    # ------------------------------------------------------------------ 3. run from Python
    acc_float = accuracy(float_module, x_test, y_test, batch)
    acc_psb = accuracy(module, x_test, y_test, batch)
    print(f"float accuracy: {100 * acc_float:.2f}%")
    print(f"PSB accuracy (n=16): {100 * acc_psb:.2f}%")
    x = np.ascontiguousarray(x_test[:batch])  # one batch: numpy in, numpy out
    logits = module.run(x)
    print(f"one batch: input {x.dtype} {x.shape} -> logits {logits.dtype} {logits.shape}; "
          f"predicted {logits.argmax(1)[:10].tolist()} ..., labels {y_test[:10].tolist()} ...")

    # ------------------------------------------------------------------ 4. export, load back
    # One file holds the machine code, the encoded weights and the PSB metadata (layers, n_max,
    # default n and seed, input shapes). The write is atomic: no half-written .so on failure.
    so_path = out / "digits_psb.so"
    module.export_library(so_path)
    print(f"exported {so_path} ({so_path.stat().st_size / 1024:.0f} KiB)")
    loaded = psb_tvm.load(so_path)
    same = loaded.run(x).tobytes() == logits.tobytes()
    print(f"loaded module matches the compiled one bit for bit: {same}")
    assert same
    print(f"loaded module at n=4, seed=3: accuracy {100 * accuracy(loaded, x_test, y_test, batch, samples=4, seed=3):.2f}%")

    # ------------------------------------------------------------------ 5. psb-tvm info
    cmd = psb_tvm_cli() + ["info", str(so_path)]
    print("\n$ psb-tvm info", so_path)
    info = subprocess.run(cmd, capture_output=True, text=True)
    print(info.stdout, end="")
    if info.returncode != 0:
        raise SystemExit(f"psb-tvm info failed: {info.stderr}")

    # ------------------------------------------------------------------ 6. the C++ runner
    # psb_run loads the .so with only libtvm_runtime.so / libtvm_ffi.so: no Python on the device.
    # Inputs and outputs are .npy files; --samples/--seed choose n and the draw as in Python.
    print()
    runner = pathlib.Path(args.runner) if args.runner else build_runner(out / "runner")
    if runner is None:
        return
    x_path, y_path = out / "x.npy", out / "y.npy"
    np.save(x_path, x)
    for extra, want in (([], logits), (["--samples", "4", "--seed", "3"], module.run(x, samples=4, seed=3))):
        cmd = [str(runner), str(so_path), "--input", str(x_path), "--output", str(y_path), *extra]
        print("$ psb_run", " ".join(cmd[1:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"psb_run failed: {proc.stderr}")
        got = np.load(y_path)
        same = got.dtype == want.dtype and got.tobytes() == want.tobytes()
        print(f"psb_run output matches Python bit for bit ({' '.join(extra) or 'compiled default n'}): {same}")
        assert same
    # --time R: median latency over R more runs (threads: TVM_NUM_THREADS)
    repeats = 10 if args.fast else 100
    proc = subprocess.run([str(runner), str(so_path), "--input", str(x_path), "--output", str(y_path),
                           "--time", str(repeats)], capture_output=True, text=True)
    print(f"psb_run --time {repeats}: {proc.stdout.strip()}")


if __name__ == "__main__":
    main()
