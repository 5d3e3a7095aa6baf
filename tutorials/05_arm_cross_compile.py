"""Tutorial 5: cross compile for 64-bit Arm, run under qemu, compare with x86 bit for bit.

    python tutorials/05_arm_cross_compile.py [--fast] [--out-dir DIR] [--arm-runner PATH]

1. compile the digits CNN twice with the same arguments: for this x86 host and for
   ``target="aarch64"`` (aarch64-linux-gnu, +neon +dotprod);
2. export the Arm module: ``export_library`` links it with the cross compiler
   ``aarch64-linux-gnu-g++`` (Debian: g++-aarch64-linux-gnu);
3. cross build the C++ runner ``psb_run`` for aarch64 (``tools/build_runner.sh aarch64``; it
   fetches the aarch64 apache-tvm wheels with pip, or set PSB_AARCH64_WHEELS to a folder holding
   them) and run the Arm module under user-mode emulation (``qemu-aarch64``, Debian: qemu-user);
4. compare the Arm outputs with the x86 ones: PSB layers are integer arithmetic with a
   counter-based sampler, so the same (n, seed) gives the same bits on both;
5. the int8 preset on Arm: packed conv layers become ``sdot`` dot-product instructions (not
   with ``--fast``: compiling those tensorized kernels for aarch64 takes minutes).

Steps 3-5 are skipped (with a message saying why) when the tools are missing. Files go to
``--out-dir`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

REPO = pathlib.Path(__file__).resolve().parents[1]
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]  # -L: where the aarch64 libc lives


def missing(*tools):
    return [t for t in tools if shutil.which(t) is None]


def build_arm_runner(build_dir: pathlib.Path) -> pathlib.Path | None:
    script = REPO / "tools" / "build_runner.sh"
    lacking = missing("cmake", "aarch64-linux-gnu-g++")
    if lacking or not script.exists():
        why = f"missing {lacking}" if lacking else f"{script} not found (run from a source checkout)"
        print(f"SKIPPED building the aarch64 runner: {why} (Debian: apt-get install cmake g++-aarch64-linux-gnu)")
        return None
    print(f"cross building psb_run with {script.relative_to(REPO)} aarch64 {build_dir} ...")
    env = dict(os.environ, PSB_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "aarch64", str(build_dir)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        raise SystemExit("building the aarch64 psb_run failed (no network for the aarch64 wheels? "
                         "set PSB_AARCH64_WHEELS or pass --arm-runner)")
    return build_dir / "psb_run"


def count_sdot(path) -> int:
    """Number of sdot instructions in an aarch64 shared library (disassembled with objdump)."""
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(path)],
                          capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\tsdot\s", text))


def elf_machine(path) -> str:
    with open(path, "rb") as f:
        header = f.read(20)
    machine = int.from_bytes(header[18:20], "little")
    return {62: "x86-64", 183: "aarch64"}.get(machine, f"e_machine={machine}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer images")
    parser.add_argument("--out-dir", help="where the .so and .npy files go (default: a temporary folder)")
    parser.add_argument("--arm-runner", help="an already built aarch64 psb_run (default: cross build one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="psb_tutorial05_") as tmp:
        out = pathlib.Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        run(args, out)


def run(args, out: pathlib.Path):
    x_train, _, x_test, y_test = load_digits_split()
    batch = 20 if args.fast else len(x_test)  # the whole batch runs in one psb_run call
    x, y = np.ascontiguousarray(x_test[:batch]), y_test[:batch]
    model_args = dict(samples=16, seed=0, input_shapes={"input": (batch, 1, 8, 8)}, calibration={"input": x_train[:256]})

    # ------------------------------------------------------------------ 1. two targets, one model
    x86 = psb_tvm.compile(DIGITS_ONNX, target="llvm", **model_args)
    arm = psb_tvm.compile(DIGITS_ONNX, target="aarch64", **model_args)
    print(f"x86 target:     {x86.metadata.target}")
    print(f"aarch64 target: {arm.metadata.target}")
    # Same calibration data -> same activation scales -> same integer kernels on both.
    same_scales = [l.get("frac_bits") for l in x86.layers] == [l.get("frac_bits") for l in arm.layers]
    print(f"same PSB layers and activation scales on both targets: {same_scales}")
    try:
        arm.run(x)
    except RuntimeError as err:
        print(f"arm.run() in this x86 process -> RuntimeError: {err}")
    y_x86 = x86.run(x)
    print(f"x86 accuracy on {batch} images (n=16): {100 * float((y_x86.argmax(1) == y).mean()):.2f}%")

    # ------------------------------------------------------------------ 2. export with the cross compiler
    x86_so, arm_so = out / "digits_x86.so", out / "digits_aarch64.so"
    x86.export_library(x86_so)
    if missing("aarch64-linux-gnu-g++"):
        print("SKIPPED the aarch64 export and run: aarch64-linux-gnu-g++ not found "
              "(Debian: apt-get install g++-aarch64-linux-gnu)")
        return
    arm.export_library(arm_so)  # picks aarch64-linux-gnu-g++ from the module's target triple
    print(f"exported {arm_so.name}: an {elf_machine(arm_so)} shared library ({arm_so.stat().st_size / 1024:.0f} KiB); "
          f"{x86_so.name}: {elf_machine(x86_so)}")

    # ------------------------------------------------------------------ 3. run under qemu
    if missing("qemu-aarch64"):
        print("SKIPPED running under qemu: qemu-aarch64 not found (Debian: apt-get install qemu-user)")
        return
    runner = pathlib.Path(args.arm_runner) if args.arm_runner else build_arm_runner(out / "runner-aarch64")
    if runner is None:
        return
    print(f"aarch64 runner: {runner} ({elf_machine(runner)})")
    x_path = out / "x.npy"
    np.save(x_path, x)
    for n, seed in ((16, 0), (4, 9), (64, 1)):
        y_path = out / f"y_arm_n{n}_s{seed}.npy"
        cmd = QEMU + [str(runner), str(arm_so), "--input", str(x_path), "--output", str(y_path),
                      "--samples", str(n), "--seed", str(seed)]
        print("$", " ".join(cmd[:1] + cmd[3:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"psb_run under qemu failed: {proc.stderr}")
        got, want = np.load(y_path), x86.run(x, samples=n, seed=seed)
        # ------------------------------------------------------------------ 4. compare
        bit_exact = got.dtype == want.dtype and got.tobytes() == want.tobytes()
        diff = float(np.abs(got.astype(np.float64) - want).max())
        acc = float((got.argmax(1) == y).mean())
        print(f"qemu aarch64 vs x86 at n={n} seed={seed}: bit-identical {bit_exact} (max abs diff {diff:g}); "
              f"aarch64 accuracy {100 * acc:.2f}%, same predictions {bool((got.argmax(1) == want.argmax(1)).all())}")
        # The integer PSB layers always agree; float glue between layers could in principle be
        # contracted into fused multiply-adds on Arm and differ in the last bits.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))

    # ------------------------------------------------------------------ 5. int8 preset: sdot
    # PSBConfig.preset("int8"): E=3 and n_max=8, so every sampled weight fits int8. Conv layers
    # with non-negative (uint8) inputs use a packed layout tensorized with sdot on aarch64
    # (+dotprod) and vpdpbusd on x86 VNNI.
    if args.fast:
        print("SKIPPED the int8 preset on aarch64 in --fast mode (its tensorized kernels compile slowly)")
        return
    if missing("aarch64-linux-gnu-objdump"):
        print("SKIPPED counting sdot instructions: aarch64-linux-gnu-objdump not found")
        return
    int8 = psb_tvm.compile(DIGITS_ONNX, target="aarch64", config=psb_tvm.PSBConfig.preset("int8"),
                           **{**model_args, "samples": 8})
    int8_so = out / "digits_aarch64_int8.so"
    int8.export_library(int8_so)
    print(f"sdot instructions in the aarch64 library: int8 preset {count_sdot(int8_so)}, "
          f"default (int16) preset {count_sdot(arm_so)} (no 8-bit dot product applies to int16 weights)")
    np.save(x_path, x)
    y_path = out / "y_arm_int8.npy"
    proc = subprocess.run(QEMU + [str(runner), str(int8_so), "--input", str(x_path), "--output", str(y_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"psb_run under qemu failed: {proc.stderr}")
    int8_x86 = psb_tvm.compile(DIGITS_ONNX, target="llvm", config=psb_tvm.PSBConfig.preset("int8"),
                               **{**model_args, "samples": 8})
    got, want = np.load(y_path), int8_x86.run(x)
    print(f"int8 preset, qemu aarch64 (sdot) vs x86: bit-identical {got.tobytes() == want.tobytes()} "
          f"(max abs diff {float(np.abs(got - want).max()):g}), aarch64 accuracy {100 * float((got.argmax(1) == y).mean()):.2f}%")

if __name__ == "__main__":
    main()
