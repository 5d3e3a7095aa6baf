"""The C++ runner ``psb_run`` (runner/, CMakeLists.txt, tools/build_runner.sh).

Host: psb_run is built once per session; its outputs must equal ``PSBModule.run`` bit for bit, and
every bad input must give a message, a non-zero exit status and no output file.
aarch64: the runner is cross built against the aarch64 wheels and run under qemu-user on modules
compiled with ``target="aarch64"``; PSB outputs are compared with the x86 run.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from conftest import tool_module
from onnx import TensorProto, helper
from onnx_models import conv_model, small_cnn

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.files import append_record, read_record

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build_runner.sh"
HOST_TOOLS = ("cmake", "g++")
ARM_TOOLS = ("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-linux-gnu-objdump")
QEMU = ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu")

# Tolerance for aarch64 vs x86 on whole networks: the integer PSB path must agree exactly, but the
# float glue between layers (batch-norm folding, average pooling, rescales) may be contracted into
# FMAs on Arm and differ in the last bits.
ARM_RTOL = 1e-5


def _missing(tools):
    return [t for t in tools if shutil.which(t) is None]


def _build(mode, build_dir):
    env = dict(os.environ, PSB_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), mode, str(build_dir)], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"tools/build_runner.sh {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    exe = build_dir / "psb_run"
    assert exe.is_file()
    return exe


def _compile(model, target, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return psb_tvm.compile(model, target=target, **kw)


def _two_output_model():
    """conv_model(relu=False) with a second output: y (the conv) and z = Relu(y)."""
    m = conv_model(relu=False, seed=3)
    m.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 10, 10]))
    onnx.checker.check_model(m)
    return m


def _model_specs(target):
    """name -> (onnx model, compile kwargs, input array). Calibration data is real or seeded."""
    rng = np.random.default_rng(7)
    x_train, _, x_test, _ = load_digits_split()
    specs = {
        "digits": (str(DIGITS_ONNX), dict(input_shapes={"input": (4, 1, 8, 8)},
                                          calibration={"input": x_train[:128]}), x_test[:4]),
        "small_cnn": (small_cnn(), dict(samples=8, calibration={"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)}),
                      rng.standard_normal((1, 3, 12, 12)).astype(np.float32)),
        "conv_relu": (conv_model(batch=2, seed=1),
                      dict(calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)}),
                      rng.standard_normal((2, 4, 10, 10)).astype(np.float32)),
        # The output is the PSB layer's output itself: float32(acc) * 2^e + bias.
        "conv_linear": (conv_model(relu=False, seed=2),
                        dict(samples=32, seed=5, calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)}),
                        rng.standard_normal((1, 4, 10, 10)).astype(np.float32)),
        # the i.i.d. sampler (the default is stratified): a linear PSB layer, so bit-exact across CPUs
        "conv_linear_iid": (conv_model(relu=False, seed=2),
                            dict(samples=8, seed=5, config=psb_tvm.PSBConfig(sampler="iid"),
                                 calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)}),
                            rng.standard_normal((1, 4, 10, 10)).astype(np.float32)),
        # int8 preset (int8 weights): conv2 and pwconv take uint8 activations (after a Relu) and
        # 16 | O, so they are the packed layout tensorized with vpdpbusd (x86) / sdot (aarch64).
        "small_cnn_int8": (small_cnn(seed=4), dict(samples=8, config=psb_tvm.PSBConfig.preset("int8"),
                                                   calibration={"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)}),
                           rng.standard_normal((1, 3, 12, 12)).astype(np.float32)),
        # One int8-preset layer alone, non-negative inputs (uint8 activations): the output is the
        # PSB layer's, so aarch64 (sdot + exact correction) must equal x86 (vpdpbusd) bit for bit.
        "conv_int8": (conv_model(in_ch=8, out_ch=16, relu=False, seed=6),
                      dict(samples=8, seed=3, config=psb_tvm.PSBConfig.preset("int8"),
                           calibration={"x": np.abs(rng.standard_normal((8, 8, 10, 10))).astype(np.float32)}),
                      np.abs(rng.standard_normal((1, 8, 10, 10))).astype(np.float32)),
    }
    if target == "llvm":
        # frozen: the draw is baked in, main takes no samples/seed (metadata "runtime_args": []).
        specs["frozen"] = (conv_model(relu=False, seed=2),
                           dict(samples=32, seed=5, frozen=True,
                                calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)}),
                           rng.standard_normal((1, 4, 10, 10)).astype(np.float32))
        specs["two_outputs"] = (_two_output_model(),
                                dict(samples=4, calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)}),
                                rng.standard_normal((1, 4, 10, 10)).astype(np.float32))
    return specs


class Compiled:
    def __init__(self, module, path, x, x_path):
        self.module, self.path, self.x, self.x_path = module, path, x, x_path


def _compile_all(target, directory):
    out = {}
    for name, (model, kw, x) in _model_specs(target).items():
        module = _compile(model, target, **kw)
        path = directory / f"{name}.so"
        module.export_library(path)
        x_path = directory / f"{name}_x.npy"
        np.save(x_path, x)
        out[name] = Compiled(module, path, x, x_path)
    return out


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def _run(exe, model, inputs=(), outputs=(), *extra, prefix=(), umask=None):
    cmd = [*prefix, str(exe), str(model)]
    for p in inputs:
        cmd += ["--input", str(p)]
    for p in outputs:
        cmd += ["--output", str(p)]
    cmd += [str(e) for e in extra]
    preexec = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _assert_bitwise_equal(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    if got.tobytes() != want.tobytes():
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
        pytest.fail(f"{what}: not bit-identical (max abs diff {diff:g})")


# ================================================================================ host
@pytest.fixture(scope="session")
def psb_run(tmp_path_factory):
    missing = _missing(HOST_TOOLS)
    if missing:
        pytest.skip(f"building psb_run needs {missing} (Debian: apt-get install cmake g++)")
    return _build("host", tmp_path_factory.mktemp("psb_run_host"))


@pytest.fixture(scope="module")
def host_models(tmp_path_factory):
    return _compile_all("llvm", tmp_path_factory.mktemp("host_models"))


@pytest.mark.parametrize("name", ["digits", "small_cnn", "conv_relu", "conv_linear", "frozen", "two_outputs"])
def test_host_outputs_equal_python_bit_for_bit(psb_run, host_models, name, tmp_path):
    m = host_models[name]
    want = _outputs(m.module.run(m.x))
    outs = [tmp_path / f"out{i}.npy" for i in range(len(want))]
    proc = _run(psb_run, m.path, [m.x_path], outs)
    assert proc.returncode == 0, proc.stderr
    for i, (out, w) in enumerate(zip(outs, want)):
        _assert_bitwise_equal(np.load(out), w, f"{name} output {i}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(o.name for o in outs)  # no temp files left


def test_npy_v2_header_and_numpy_identical_output_file(psb_run, host_models, tmp_path):
    m = host_models["conv_relu"]
    x_v2 = tmp_path / "x_v2.npy"
    with open(x_v2, "wb") as f:
        np.lib.format.write_array(f, m.x, version=(2, 0))
    out = tmp_path / "y.npy"
    proc = _run(psb_run, m.path, [x_v2], [out])
    assert proc.returncode == 0, proc.stderr
    # The writer produces the same bytes (header padding included) as numpy.save.
    ref = tmp_path / "ref.npy"
    np.save(ref, m.module.run(m.x))
    assert out.read_bytes() == ref.read_bytes()


def test_metadata_flag_prints_the_module_metadata(psb_run, host_models):
    m = host_models["digits"]
    proc = _run(psb_run, m.path, (), (), "--metadata")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == m.module.metadata.to_dict()


def test_time_flag_prints_median_latency(psb_run, host_models, tmp_path):
    m = host_models["small_cnn"]
    out = tmp_path / "y.npy"
    proc = _run(psb_run, m.path, [m.x_path], [out], "--time", 5)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"median latency: ([0-9.]+) ms over 5 runs", proc.stdout)
    assert match and float(match.group(1)) > 0, proc.stdout
    _assert_bitwise_equal(np.load(out), m.module.run(m.x), "small_cnn with --time")


# ------------------------------------------------------------------ run-time samples/seed
@pytest.mark.parametrize("name,samples,seed", [("digits", 4, 9), ("digits", 64, 0), ("small_cnn", 1, 123),
                                               ("two_outputs", 32, 2**32 - 1)])
def test_samples_and_seed_match_python_run(psb_run, host_models, name, samples, seed, tmp_path):
    m = host_models[name]
    assert m.module.metadata["runtime_args"]
    want = _outputs(m.module.run(m.x, samples=samples, seed=seed))
    outs = [tmp_path / f"out{i}.npy" for i in range(len(want))]
    proc = _run(psb_run, m.path, [m.x_path], outs, "--samples", samples, "--seed", seed)
    assert proc.returncode == 0, proc.stderr
    for i, (out, w) in enumerate(zip(outs, want)):
        _assert_bitwise_equal(np.load(out), w, f"{name} n={samples} seed={seed} output {i}")


def test_samples_alone_keeps_the_compiled_seed(psb_run, host_models, tmp_path):
    m = host_models["small_cnn"]
    out = tmp_path / "y.npy"
    proc = _run(psb_run, m.path, [m.x_path], [out], "--samples", 2)
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(np.load(out), m.module.run(m.x, samples=2), "small_cnn n=2")
    assert not np.array_equal(np.load(out), m.module.run(m.x))  # n=2 differs from the default n=8


def test_per_layer_default_samples_are_used_without_samples_flag(psb_run, host_models, tmp_path):
    """A module compiled with samples={layer: n, "default": n}: psb_run passes the per-layer
    defaults like module.run() does; --samples N still sets every layer to N."""
    m = host_models["small_cnn"]
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    module = _compile(small_cnn(), "llvm", samples={"conv1": 64, "default": 2}, calibration=calib)
    assert len(set(module.metadata["layer_samples"].values())) > 1
    path = tmp_path / "mixed.so"
    module.export_library(path)
    out = tmp_path / "y.npy"
    proc = _run(psb_run, path, [m.x_path], [out])
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(np.load(out), module.run(m.x), "per-layer defaults")
    assert not np.array_equal(np.load(out), module.run(m.x, samples=2))
    proc = _run(psb_run, path, [m.x_path], [out], "--samples", 4)
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(np.load(out), module.run(m.x, samples=4), "--samples 4 overrides the map")


@pytest.mark.parametrize("extra,message", [
    (("--samples", 3), "power of two"),
    (("--samples", 0), "power of two"),
    (("--samples", 128), "exceeds n_max=64"),
    (("--seed", -1), r"seed must be in \[0, 2\*\*32\)"),
    (("--seed", 2**32), r"seed must be in \[0, 2\*\*32\)"),
])
def test_bad_samples_or_seed_are_rejected(psb_run, host_models, tmp_path, extra, message):
    m = host_models["digits"]
    proc = _run(psb_run, m.path, [m.x_path], [tmp_path / "y.npy"], *extra)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr  # bad usage
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--samples", "--seed"])
def test_samples_seed_on_a_frozen_module_is_an_error(psb_run, host_models, tmp_path, flag):
    m = host_models["frozen"]
    assert m.module.metadata["runtime_args"] == []
    proc = _run(psb_run, m.path, [m.x_path], [tmp_path / "y.npy"], flag, 8)
    assert proc.returncode == 2  # an option this module cannot take: bad usage
    assert "fixes n and seed at compile time (samples=32, seed=5, frozen)" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


STUB_METADATA = {
    "inputs": [{"name": "x", "shape": [2], "dtype": "float32"}], "outputs": ["twice", "n", "seed"],
    "samples": 8, "seed": 3, "n_max": 64,
    "runtime_args": [{"name": "samples", "kind": "shape", "length": 2}, {"name": "seed", "kind": "int"}],
}


def _stub_module(path, metadata):
    """A Relax module main(x[2], s: Shape([n, m]), seed: int64) -> (x + x, zeros(n), [seed]),
    with ``metadata`` as its psb_metadata() (or none). Checks the runner's argument plumbing
    independently of psb_tvm.compile, including a scalar ("int") runtime argument."""
    import tvm
    from psb_tvm.passes.attach_psb_metadata import attach_string
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    from psb_tvm.target import host_target

    @I.ir_module
    class Stub:
        @T.prim_func
        def fill(k: T.int64, out: T.Buffer((1,), "int64")):
            out[0] = k

        @R.function
        def main(x: R.Tensor((2,), "float32"), s: R.Shape(["n", "m"]), seed: R.Prim("int64")):
            n = T.int64()
            cls = Stub
            a = R.add(x, x)
            b = R.zeros(R.shape([n]), "float32")
            c = R.call_tir(cls.fill, (seed,), out_ty=R.Tensor((1,), "int64"))
            return (a, b, c)

    mod = attach_string(Stub, psb_tvm.runtime.METADATA_FUNC, json.dumps(metadata)) if metadata else Stub
    tvm.compile(mod, target=host_target()).export_library(str(path))
    append_record(path)  # what PSBModule.export_library adds: psb_run checks it before loading
    return path


@pytest.fixture(scope="module")
def stub_modules(tmp_path_factory):
    d = tmp_path_factory.mktemp("stub")
    np.save(d / "x.npy", np.array([1.5, -2.0], np.float32))
    unknown = dict(STUB_METADATA, runtime_args=[{"name": "mask", "kind": "shape", "length": 2},
                                                 {"name": "seed", "kind": "int"}])
    return {"runtime_args": _stub_module(d / "runtime_args.so", STUB_METADATA),
            "unknown_arg": _stub_module(d / "unknown_arg.so", unknown),
            "no_metadata": _stub_module(d / "no_metadata.so", None), "x": d / "x.npy"}


def test_shape_and_int_runtime_args_reach_main(psb_run, stub_modules, tmp_path):
    outs = [tmp_path / f"{n}.npy" for n in ("twice", "n", "seed")]
    proc = _run(psb_run, stub_modules["runtime_args"], [stub_modules["x"]], outs, "--samples", 16, "--seed", 7)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(outs[0]), [3.0, -4.0])
    assert np.load(outs[1]).shape == (16,)  # Shape([16, 16]) reached main
    assert np.load(outs[2]).tolist() == [7]  # the int64 seed reached main
    proc = _run(psb_run, stub_modules["runtime_args"], [stub_modules["x"]], outs)  # defaults: metadata
    assert proc.returncode == 0, proc.stderr
    assert np.load(outs[1]).shape == (8,) and np.load(outs[2]).tolist() == [3]


def test_unknown_runtime_arg_is_reported_but_metadata_still_prints(psb_run, stub_modules, tmp_path):
    model = stub_modules["unknown_arg"]
    proc = _run(psb_run, model, (), (), "--metadata")
    assert proc.returncode == 0 and json.loads(proc.stdout)["runtime_args"][0]["name"] == "mask"
    outs = [tmp_path / f"{n}.npy" for n in ("twice", "n", "seed")]
    proc = _run(psb_run, model, [stub_modules["x"]], outs)
    assert proc.returncode == 1 and 'run-time argument "mask"' in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad inputs
def _bad_case(case, m, stub_modules, tmp):
    """-> (model, inputs, outputs, extra args, stderr regex, expected exit status or None)."""
    x = m.x
    inp = tmp / "in"
    inp.mkdir()

    def save(name, arr, **kw):
        p = inp / name
        np.save(p, arr, **kw)
        return p

    out = tmp / "out"
    out.mkdir()
    y = out / "y.npy"
    if case == "missing input file":
        return m.path, [inp / "nope.npy"], [y], (), r"cannot read .*nope\.npy", None
    if case == "no input":
        return m.path, [], [y], (), r"expected 1 input\(s\) \[input\], got 0", None
    if case == "two inputs":
        p = save("x.npy", x)
        return m.path, [p, p], [y], (), r"expected 1 input\(s\) \[input\], got 2", None
    if case == "wrong shape":
        return m.path, [save("x.npy", x[:2])], [y], (), r"input 'input': expected shape \(4, 1, 8, 8\), got \(2, 1, 8, 8\)", None
    if case == "wrong dtype":
        return m.path, [save("x.npy", x.astype(np.float64))], [y], (), "expected dtype float32, got float64", None
    if case == "int64 input":
        return m.path, [save("x.npy", x.astype(np.int64))], [y], (), "expected dtype float32, got int64", None
    if case == "fortran order":
        return m.path, [save("x.npy", np.asfortranarray(x))], [y], (), "Fortran-ordered arrays are not supported", None
    if case == "big endian":
        return m.path, [save("x.npy", x.astype(">f4"))], [y], (), "big-endian", None
    if case == "structured dtype":
        arr = np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")])
        return m.path, [save("x.npy", arr)], [y], (), "structured arrays", None
    if case == "object dtype":
        return (m.path, [save("x.npy", np.array([1, "a"], dtype=object), allow_pickle=True)], [y], (),
                "unsupported dtype '\\|O'", None)
    if case == "truncated npy":
        p = save("x.npy", x)
        p.write_bytes(p.read_bytes()[:-3])
        return m.path, [p], [y], (), "truncated data", None
    if case == "not an npy":
        p = inp / "x.npy"
        p.write_text("1 2 3\n")
        return m.path, [p], [y], (), r"not a \.npy file", None
    if case == "missing model":
        return tmp / "nope.so", [save("x.npy", x)], [y], (), r"cannot open module .*nope\.so", None
    if case == "garbage model":
        p = tmp / "garbage.so"
        p.write_text("not a shared library")
        return p, [save("x.npy", x)], [y], (), r"garbage\.so: no psb_tvm integrity record", None
    if case == "empty model":
        p = tmp / "empty.so"
        p.write_bytes(b"")
        return p, [save("x.npy", x)], [y], (), r"empty\.so: 0 bytes, too short", None
    if case == "garbage model with a record":  # passes the integrity check, then dlopen refuses it
        p = tmp / "garbage.so"
        p.write_text("not a shared library")
        append_record(p)
        return p, [save("x.npy", x)], [y], (), "cannot load as a TVM module", None
    if case in ("plain shared library", "plain shared library without a record"):
        src = tmp / "lib.c"
        src.write_text("int answer(void) { return 42; }\n")
        lib = tmp / "plain.so"
        subprocess.run(["g++", "-x", "c", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
        if case == "plain shared library":
            append_record(lib)
            return lib, [save("x.npy", x)], [y], (), "not a psb_tvm module", None
        return lib, [save("x.npy", x)], [y], (), "not written by PSBModule.export_library", None
    if case == "tvm module without psb metadata":
        return stub_modules["no_metadata"], [save("x.npy", x)], [y], (), "not a psb_tvm module .*psb_metadata", None
    if case == "output directory missing":
        return m.path, [save("x.npy", x)], [out / "sub" / "y.npy"], (), "does not exist", None
    if case == "unwritable output":
        return (m.path, [save("x.npy", x)], [pathlib.Path("/proc/psb_run_test_y.npy")], (),
                "cannot write /proc/psb_run_test_y.npy", None)
    if case == "output is a directory":
        return m.path, [save("x.npy", x)], [out], (), "is a directory", None
    if case == "output is a symlink to a directory":
        (tmp / "dlink").symlink_to(out)
        return m.path, [save("x.npy", x)], [tmp / "dlink"], (), "dlink: it is a directory", None
    if case == "output is a socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp / "sock"))
        sock.close()
        return m.path, [save("x.npy", x)], [tmp / "sock"], (), "not a regular file, character device or FIFO", None
    if case == "nan input":
        bad = x.copy()
        bad[1, 0, 2, 5] = np.nan
        return (m.path, [save("x.npy", bad)], [y], (),
                r"x\.npy \(input 'input'\): non-finite value nan at index \(1, 0, 2, 5\).*--nonfinite propagate", None)
    if case == "-inf input":
        bad = x.copy()
        bad[3, 0, 7, 7] = -np.inf
        return m.path, [save("x.npy", bad)], [y], (), r"non-finite value -inf at index \(3, 0, 7, 7\)", None
    if case == "too many outputs":
        return m.path, [save("x.npy", x)], [y, out / "y2.npy"], (), r"the model has 1 output\(s\) \[logits\], got 2", None
    if case == "no model argument":
        return None, [save("x.npy", x)], [y], (), "missing MODEL.so", 2
    if case == "unknown option":
        return m.path, [save("x.npy", x)], [y], ("--frobnicate",), "unknown option --frobnicate", 2
    if case == "bad --time":
        return m.path, [save("x.npy", x)], [y], ("--time", "0"), "--time needs a count", 2
    if case == "non-integer --samples":
        return m.path, [save("x.npy", x)], [y], ("--samples", "many"), "--samples needs an integer", 2
    if case == "negative --time":
        return m.path, [save("x.npy", x)], [y], ("--time", "-3"), "--time needs a count", 2
    if case == "--nonfinite bogus":
        return m.path, [save("x.npy", x)], [y], ("--nonfinite", "bogus"), "--nonfinite must be error or propagate, got 'bogus'", 2
    if case == "--nonfinite twice":
        return m.path, [save("x.npy", x)], [y], ("--nonfinite=propagate", "--nonfinite", "error"), "--nonfinite given twice", 2
    if case == "--allow-nonfinite (removed)":
        return m.path, [save("x.npy", x)], [y], ("--allow-nonfinite",), "unknown option --allow-nonfinite", 2
    if case == "no output":
        return m.path, [save("x.npy", x)], [], (), "missing --output", 2
    raise AssertionError(case)


BAD_CASES = ["missing input file", "no input", "two inputs", "wrong shape", "wrong dtype", "int64 input",
             "fortran order", "big endian", "structured dtype", "object dtype", "truncated npy", "not an npy",
             "nan input", "-inf input",
             "missing model", "garbage model", "empty model", "garbage model with a record", "plain shared library",
             "plain shared library without a record", "tvm module without psb metadata",
             "output directory missing", "unwritable output", "output is a directory",
             "output is a symlink to a directory", "output is a socket", "too many outputs", "no model argument",
             "unknown option", "bad --time", "negative --time", "non-integer --samples", "--nonfinite bogus",
             "--nonfinite twice", "--allow-nonfinite (removed)",
             "no output"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_fail_cleanly_without_output(psb_run, host_models, stub_modules, tmp_path, case):
    m = host_models["digits"]
    model, inputs, outputs, extra, message, status = _bad_case(case, m, stub_modules, tmp_path)
    cmd = [str(psb_run)] + ([str(model)] if model is not None else [])
    for p in inputs:
        cmd += ["--input", str(p)]
    for p in outputs:
        cmd += ["--output", str(p)]
    proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=120)
    # The documented exit status: 1 for a bad module, input or output, 2 for bad usage; never a
    # signal (a negative returncode).
    assert proc.returncode == (1 if status is None else status), f"{case}: exit {proc.returncode}\n{proc.stderr}"
    assert re.search(message, proc.stderr), f"{case}: stderr {proc.stderr!r} lacks {message!r}"
    assert proc.stdout == ""
    leftovers = [p for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert leftovers == [], f"{case}: left {leftovers}"


def test_failed_run_leaves_an_existing_output_untouched(psb_run, host_models, tmp_path):
    m = host_models["digits"]
    out = tmp_path / "y.npy"
    out.write_bytes(b"previous")
    bad = tmp_path / "x.npy"
    np.save(bad, m.x[:1])
    proc = _run(psb_run, m.path, [bad], [out])
    assert proc.returncode != 0 and "expected shape" in proc.stderr
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


# ------------------------------------------------------------------ metadata: Python writes, C++ reads
def _cpp_metadata(psb_run, path):
    proc = subprocess.run([str(psb_run.parent / "psb_call"), "--parse-metadata", str(path)],
                          capture_output=True, text=True, timeout=60)
    return proc, [line.split("=", 1) for line in proc.stdout.splitlines()]


def _expected_lines(md):
    lines = [["input", f"{i['name']}:{i['dtype']}:{','.join(map(str, i['shape']))}"] for i in md.inputs]
    per_layer = [md.layer_samples.get(n, md.samples) for n in md.psb_layers] if md.layer_samples else []
    lines += [["outputs", ",".join(md.outputs)], ["samples", str(md.samples)], ["seed", str(md.seed)],
              ["n_max", str(md.n_max)], ["layer_samples", ",".join(map(str, per_layer))], ["frozen", str(int(md.frozen))]]
    lines += [["runtime_arg", f"{a['name']}:{a['kind']}:{a.get('length', 0)}"] for a in md.runtime_args]
    return lines + [["unsupported", ""]]


def test_cpp_runner_reads_the_metadata_python_writes(psb_run, host_models, tmp_path):
    """ModuleMetadata.to_json (format_version 1) as ParseMetadata reads it, field by field, for
    sampled, frozen and per-layer-n modules; a version-0 module (no format_version, n_max only in
    config) still reads; a newer version is refused by both sides with the same reason."""
    from psb_tvm.metadata import FORMAT_VERSION, ModuleMetadata

    mds = [host_models[name].module.metadata for name in ("digits", "frozen", "two_outputs")]
    per_layer = dataclasses.replace(mds[0], layer_samples={mds[0].psb_layers[0]: 4, mds[0].psb_layers[-1]: 32})
    for i, md in enumerate(mds + [per_layer]):
        path = tmp_path / f"md{i}.json"
        path.write_text(md.to_json())
        assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION
        assert ModuleMetadata.from_json(path.read_text()) == md  # the Python round trip
        proc, lines = _cpp_metadata(psb_run, path)
        assert proc.returncode == 0, proc.stderr
        assert lines == _expected_lines(md)
    old = mds[0].to_dict()
    del old["format_version"], old["n_max"], old["sampler"]
    (tmp_path / "v0.json").write_text(json.dumps(old))
    proc, lines = _cpp_metadata(psb_run, tmp_path / "v0.json")
    assert proc.returncode == 0 and ["n_max", str(old["config"]["n_max"])] in lines, proc.stderr
    with pytest.raises(psb_tvm.ModelLoadError, match="missing \\['n_max'\\]"):
        ModuleMetadata.from_dict(old)  # Python needs n_max at the top (every module since 0.1 has it)
    assert ModuleMetadata.from_dict({**old, "n_max": 64}).sampler == "iid"  # before the stratified default
    newer = {**mds[0].to_dict(), "format_version": FORMAT_VERSION + 1}
    (tmp_path / "v2.json").write_text(json.dumps(newer))
    proc, _ = _cpp_metadata(psb_run, tmp_path / "v2.json")
    assert proc.returncode == 1 and f"format_version {FORMAT_VERSION + 1} was written by a newer psb_tvm" in proc.stderr
    with pytest.raises(psb_tvm.ModelLoadError, match=f"format_version {FORMAT_VERSION + 1} was written by a newer"):
        ModuleMetadata.from_dict(newer)
    kept = ModuleMetadata.from_dict({**mds[0].to_dict(), "future_field": [1, 2]})
    assert json.loads(kept.to_json())["future_field"] == [1, 2]  # unknown keys survive a round trip


# ------------------------------------------------------------------ module integrity
def test_sha256_known_vectors_and_hashlib_agreement(psb_run, tmp_path):
    """runner/sha256.cc (no OpenSSL: the runner cross compiles alone): the FIPS 180-4 vectors
    ("", "abc", the 448- and 896-bit messages, a million 'a'), and hashlib on every padding edge."""
    selftest = psb_run.parent / "psb_runner_selftest"
    proc = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == 5, proc.stdout
    assert 'sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad' in proc.stdout
    rng = np.random.default_rng(0)
    files = []
    for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 4099, 200_003):
        f = tmp_path / f"b{size}"
        f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        files.append(f)
    proc = subprocess.run([str(selftest), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = dict(reversed(line.split("  ", 1)) for line in proc.stdout.splitlines())
    for f in files:
        assert got[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest(), f.name


def _damage(data: bytes, how: str) -> bytes:
    if how == "cut to 10%":
        return data[: len(data) // 10]
    if how == "cut to 50%":
        return data[: len(data) // 2]
    if how == "record cut off":  # the library alone, as a plain TVM export would be
        return data[: _library_size(data)]
    if how in ("flipped byte in the middle", "flipped bit in the code"):
        i = len(data) // 2 if how == "flipped byte in the middle" else 4096 + 17
        return data[:i] + bytes([data[i] ^ (0xFF if "byte" in how else 0x01)]) + data[i + 1:]
    if how == "byte appended":  # the record no longer ends the file
        return data + b"\0"
    if how in ("record format 2", "record size edited"):
        n = int.from_bytes(data[-8:], "little")
        record = json.loads(data[-16 - n:-16])
        if how == "record format 2":
            record["format"] = 2
        else:
            record["library_bytes"] -= 1
        text = json.dumps(record, sort_keys=True).encode()
        return data[: -16 - n] + text + data[-16:-8] + len(text).to_bytes(8, "little")
    raise AssertionError(how)


def _library_size(data: bytes) -> int:
    return len(data) - 16 - int.from_bytes(data[-8:], "little")


DAMAGE = {
    "cut to 10%": "no psb_tvm integrity record",
    "cut to 50%": "no psb_tvm integrity record",
    "record cut off": "not written by PSBModule.export_library",
    "flipped byte in the middle": "SHA-256 mismatch: the module was damaged or edited",
    "flipped bit in the code": "SHA-256 mismatch",
    "byte appended": "no psb_tvm integrity record",
    "record format 2": "integrity record format 2",
    "record size edited": "integrity record is damaged or does not match the file size",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_module_is_refused_before_loading(psb_run, host_models, tmp_path, how):
    """An interrupted copy (a truncated .so gave SIGBUS) or a flipped bit (wrong outputs) is a
    clean error, exit 1, before the dynamic loader maps the file; no output is written."""
    m = host_models["digits"]
    assert read_record(m.path)["library_bytes"] == m.path.stat().st_size - 16 - len(
        json.dumps(read_record(m.path), sort_keys=True))
    bad = tmp_path / "damaged.so"
    bad.write_bytes(_damage(m.path.read_bytes(), how))
    out = tmp_path / "y.npy"
    for extra in ((), ("--metadata",)):
        proc = _run(psb_run, bad, [m.x_path], [out], *extra)
        assert proc.returncode == 1, f"{how}: exit {proc.returncode} (negative: a signal)\n{proc.stderr}"
        assert "damaged.so" in proc.stderr and DAMAGE[how] in proc.stderr, proc.stderr
        assert proc.stdout == "" and not out.exists()


def test_edited_n_max_with_a_fresh_record_is_stopped_by_the_kernels_check(psb_run, host_models, tmp_path):
    """The record catches accidents, not edits followed by a new record: an int8 module whose
    metadata says n_max=64 instead of 8 passes psb_run's own checks at --samples 64, and main's
    check of n against the compiled bound (an assert compiled into the kernels,
    passes/assert_sample_bounds.py) must still refuse to run."""
    m = host_models["conv_int8"]
    data = m.path.read_bytes()
    library = data[: read_record(m.path)["library_bytes"]]
    assert b'"n_max": 8,' in library
    edited = tmp_path / "edited.so"
    edited.write_bytes(library.replace(b'"n_max": 8,', b'"n_max":64,'))
    append_record(edited)
    out = tmp_path / "y.npy"
    proc = _run(psb_run, edited, [m.x_path], [out], "--samples", 64)
    assert proc.returncode == 1 and "n_max" in proc.stderr, proc.stderr
    assert not out.exists()
    proc = _run(psb_run, edited, [m.x_path], [out], "--samples", 8)  # within the compiled bound: runs
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(np.load(out), m.module.run(m.x, samples=8), "edited module at n=8")


# ------------------------------------------------------------------ output files
def test_output_to_dev_null_keeps_the_device(psb_run, host_models, tmp_path):
    m = host_models["conv_relu"]
    proc = _run(psb_run, m.path, [m.x_path], ["/dev/null"])
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_through_a_fifo_is_written_through(psb_run, host_models, tmp_path):
    m = host_models["conv_relu"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so psb_run's open does not block
    try:
        proc = _run(psb_run, m.path, [m.x_path], [fifo])
        assert proc.returncode == 0, proc.stderr
        data = b""
        while chunk := os.read(reader, 1 << 16):
            data += chunk
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    ref = tmp_path / "ref.npy"
    np.save(ref, m.module.run(m.x))
    assert data == ref.read_bytes()


@pytest.mark.parametrize("existing", [True, False])
def test_output_through_a_symlink_keeps_the_link(psb_run, host_models, tmp_path, existing):
    """The link's target is replaced (or created, for a dangling link); the link stays a link."""
    m = host_models["conv_relu"]
    target_dir = tmp_path / "data"
    target_dir.mkdir()
    target = target_dir / "y.npy"
    if existing:
        target.write_bytes(b"previous")
    link = tmp_path / "y_link.npy"
    link.symlink_to(os.path.relpath(target, tmp_path))
    proc = _run(psb_run, m.path, [m.x_path], [link])
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and link.resolve() == target.resolve()
    _assert_bitwise_equal(np.load(target), m.module.run(m.x), "output through a symlink")
    assert sorted(p.name for p in target_dir.iterdir()) == ["y.npy"]  # no temp file left


def test_directory_output_is_refused_before_running(psb_run, host_models, tmp_path):
    """A directory among the outputs: refused up front (exit 1, no output at all), even when the
    other output is fine and the input would also fail later."""
    m = host_models["two_outputs"]
    (tmp_path / "d").mkdir()
    bad = tmp_path / "x.npy"
    np.save(bad, np.full_like(m.x, np.nan))  # would be the error if the outputs were not checked first
    proc = _run(psb_run, m.path, [bad], [tmp_path / "y.npy", tmp_path / "d"], "--time", 1)
    assert proc.returncode == 1 and "cannot write" in proc.stderr and "it is a directory" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.npy"] and list((tmp_path / "d").iterdir()) == []


def test_two_outputs_into_one_file_are_refused(psb_run, stub_modules, tmp_path):
    a = tmp_path / "a.npy"
    (tmp_path / "link.npy").symlink_to("a.npy")
    proc = _run(psb_run, stub_modules["runtime_args"], [stub_modules["x"]], [a, tmp_path / "link.npy", tmp_path / "c.npy"])
    assert proc.returncode == 1 and "are the same file" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npy"]
    # /dev/null may take several outputs.
    proc = _run(psb_run, stub_modules["runtime_args"], [stub_modules["x"]], ["/dev/null", "/dev/null", tmp_path / "c.npy"])
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "c.npy").tolist() == [3]


def test_output_permissions_are_those_of_a_plain_write(psb_run, host_models, tmp_path):
    """New files: 0666 less the umask (0644 under 022, 0600 under 077; mkstemp would give 0600);
    a replaced file keeps its mode."""
    m = host_models["conv_relu"]
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        out = tmp_path / f"y_{umask:o}.npy"
        proc = _run(psb_run, m.path, [m.x_path], [out], umask=umask)
        assert proc.returncode == 0, proc.stderr
        assert stat.S_IMODE(out.stat().st_mode) == mode, (oct(umask), oct(out.stat().st_mode))
    out = tmp_path / "y_existing.npy"
    out.write_bytes(b"previous")
    out.chmod(0o640)
    proc = _run(psb_run, m.path, [m.x_path], [out], umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    _assert_bitwise_equal(np.load(out), m.module.run(m.x), "replaced output")


# ------------------------------------------------------------------ non-finite inputs
@pytest.mark.parametrize("extra", [(), ("--nonfinite", "error")])
def test_nonfinite_input_is_refused_by_default(psb_run, host_models, tmp_path, extra):
    m = host_models["conv_relu"]
    x = m.x.copy()
    x[1, 1, 2, 3], x[1, 0, 0, 0] = np.nan, np.inf
    bad = tmp_path / "x.npy"
    np.save(bad, x)
    out = tmp_path / "y.npy"
    proc = _run(psb_run, m.path, [bad], [out], *extra)
    assert proc.returncode == 1, proc.stderr
    assert f"{bad} (input 'x'): non-finite value inf at index (1, 0, 0, 0)" in proc.stderr, proc.stderr
    assert "--nonfinite propagate" in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_nonfinite_propagate_matches_python(psb_run, host_models, tmp_path):
    """--nonfinite propagate is run(..., nonfinite="propagate"): the batch item with a NaN/inf gets
    NaN outputs, the other is bit-identical to a run on the inputs with those values set to 0."""
    m = host_models["conv_relu"]
    assert m.x.shape[0] == 2
    x = m.x.copy()
    x[1, 1, 2, 3], x[1, 0, 0, 0], x[1, 3, 9, 9] = np.nan, np.inf, -np.inf
    x_clean = np.where(np.isfinite(x), x, np.float32(0))
    bad = tmp_path / "x.npy"
    np.save(bad, x)
    out = tmp_path / "y.npy"
    proc = _run(psb_run, m.path, [bad], [out], "--nonfinite", "propagate", "--time", 1)
    assert proc.returncode == 0, proc.stderr
    assert "median latency" in proc.stdout
    y = np.load(out)
    assert y.dtype == np.float32 and y.shape[0] == 2
    assert np.isnan(y[1]).all()
    _assert_bitwise_equal(y[0], m.module.run(x_clean)[0], "item 0 vs run(x_clean)")
    assert np.array_equal(y, m.module.run(x, nonfinite="propagate"), equal_nan=True)
    # Finite inputs: the same as without the option.
    proc = _run(psb_run, m.path, [m.x_path], [out], "--nonfinite=propagate")
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(np.load(out), m.module.run(m.x), "finite inputs with --nonfinite propagate")


def test_nonfinite_propagate_cannot_mark_an_integer_output(psb_run, stub_modules, tmp_path):
    """The stub: x[2] -> (x + x [2], zeros(n) [8], [seed] int64). Batch 2: item 1 of ``twice``
    becomes NaN, ``n`` (no batch axis) all NaN, and the int64 output cannot be marked: exit 1, as
    Python's InputError; nothing written."""
    bad = tmp_path / "x.npy"
    np.save(bad, np.array([1.5, np.nan], np.float32))
    outs = [tmp_path / f"{n}.npy" for n in ("twice", "n", "seed")]
    proc = _run(psb_run, stub_modules["runtime_args"], [bad], outs, "--nonfinite", "propagate")
    assert proc.returncode == 1, proc.stderr
    assert "nonfinite='propagate' cannot mark a int64 output NaN; pass finite inputs" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    # Without the int64 output (--time alone writes nothing, so nothing needs marking): runs.
    proc = _run(psb_run, stub_modules["runtime_args"], [bad], (), "--nonfinite", "propagate", "--time", 1)
    assert proc.returncode == 0 and "median latency" in proc.stdout, proc.stderr


# ================================================================================ aarch64 (qemu)
@pytest.fixture(scope="session")
def arm_psb_run(tmp_path_factory):
    missing = _missing(ARM_TOOLS)
    if missing:
        pytest.skip(f"the aarch64 runner tests need {missing} (Debian: apt-get install cmake "
                    "g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user)")
    return _build("aarch64", tmp_path_factory.mktemp("psb_run_aarch64"))


@pytest.fixture(scope="module")
def arm_models(arm_psb_run, tmp_path_factory):
    return _compile_all("aarch64", tmp_path_factory.mktemp("arm_models"))


def _run_arm(exe, m, tmp_path):
    out = tmp_path / "y_arm.npy"
    proc = _run(exe, m.path, [m.x_path], [out], prefix=QEMU)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def test_arm_runner_is_an_aarch64_binary(arm_psb_run, arm_models):
    for path in (arm_psb_run, arm_models["digits"].path):
        with open(path, "rb") as f:
            header = f.read(20)
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert "+dotprod" in arm_models["digits"].module.metadata["target"]


@pytest.mark.parametrize("name", ["digits", "small_cnn", "conv_relu", "small_cnn_int8"])
def test_arm_networks_match_x86(arm_psb_run, arm_models, host_models, name, tmp_path, record_property):
    arm, ref = arm_models[name], host_models[name]
    np.testing.assert_array_equal(arm.x, ref.x)
    got = _run_arm(arm_psb_run, arm, tmp_path)
    want = ref.module.run(ref.x)
    diff = float(np.abs(got.astype(np.float64) - want).max())
    record_property("max_abs_diff_vs_x86", diff)
    record_property("bit_exact_vs_x86", got.tobytes() == want.tobytes())
    print(f"{name}: aarch64 vs x86 max abs diff {diff:g}, bit-exact {got.tobytes() == want.tobytes()}")
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=ARM_RTOL, atol=ARM_RTOL * float(np.abs(want).max()))
    if name == "digits":
        assert (got.argmax(1) == want.argmax(1)).all()


def test_arm_runtime_samples_and_seed_match_x86(arm_psb_run, arm_models, host_models, tmp_path):
    arm, ref = arm_models["digits"], host_models["digits"]
    out = tmp_path / "y.npy"
    proc = _run(arm_psb_run, arm.path, [arm.x_path], [out], "--samples", 4, "--seed", 9, prefix=QEMU)
    assert proc.returncode == 0, proc.stderr
    got, want = np.load(out), ref.module.run(ref.x, samples=4, seed=9)
    print(f"digits n=4 seed=9: aarch64 vs x86 max abs diff {np.abs(got - want).max():g}, "
          f"bit-exact {got.tobytes() == want.tobytes()}")
    np.testing.assert_allclose(got, want, rtol=ARM_RTOL, atol=ARM_RTOL * float(np.abs(want).max()))


def test_arm_psb_layer_output_is_bit_exact(arm_psb_run, arm_models, host_models, tmp_path):
    """conv_model(relu=False): the output is float32(acc) * 2^e + bias. acc is an exact integer and
    the scale a power of two, so even a fused multiply-add rounds once, like x86: bit-identical."""
    arm, ref = arm_models["conv_linear"], host_models["conv_linear"]
    assert [l["status"] for l in arm.module.layers] == ["psb"]
    _assert_bitwise_equal(_run_arm(arm_psb_run, arm, tmp_path), ref.module.run(ref.x), "conv_linear aarch64 vs x86")


def test_arm_both_samplers_are_bit_exact(arm_psb_run, arm_models, host_models, tmp_path):
    """The stratified (default) and the i.i.d. sample streams on aarch64 draw the same integers as
    on x86 at every n and seed: a linear PSB layer's outputs are bit-identical."""
    for name in ("conv_linear", "conv_linear_iid"):
        arm, ref = arm_models[name], host_models[name]
        assert arm.module.metadata["sampler"] == ("iid" if name.endswith("iid") else "stratified")
        for n, seed in ((1, 0), (8, 7), (32, 123)):
            if n > arm.module.metadata["n_max"]:
                continue
            out = tmp_path / f"{name}_{n}_{seed}.npy"
            proc = _run(arm_psb_run, arm.path, [arm.x_path], [out], "--samples", n, "--seed", seed, prefix=QEMU)
            assert proc.returncode == 0, proc.stderr
            _assert_bitwise_equal(np.load(out), ref.module.run(ref.x, samples=n, seed=seed),
                                  f"{name} n={n} seed={seed} aarch64 vs x86")


@pytest.mark.slow  # 8 compiles; the default suite checks intdot with both samplers above
@pytest.mark.parametrize("lowering", ["shiftadd", "bitserial"])
def test_arm_other_lowerings_both_samplers_are_bit_exact(arm_psb_run, lowering, tmp_path):
    """shiftadd and bitserial layers, stratified and i.i.d., main and attend: aarch64 == x86 bit
    for bit."""
    rng = np.random.default_rng(11)
    model = conv_model(relu=False, seed=2)
    kw = dict(samples=8, seed=5, calibration={"x": rng.standard_normal((8, 4, 10, 10)).astype(np.float32)})
    x = rng.standard_normal((1, 4, 10, 10)).astype(np.float32)
    x_path = tmp_path / "x.npy"
    np.save(x_path, x)
    for sampler in ("stratified", "iid"):
        config = psb_tvm.PSBConfig(sampler=sampler, lowering=lowering)
        host = _compile(model, "llvm", config=config, **kw)
        arm = _compile(model, "aarch64", config=config, **kw)
        assert [l["lowering"] for l in arm.layers] == [lowering]
        path = tmp_path / f"{sampler}.so"
        arm.export_library(path)
        for n, seed in ((1, 0), (8, 7)):
            out = tmp_path / f"y_{sampler}_{n}.npy"
            proc = _run(arm_psb_run, path, [x_path], [out], "--samples", n, "--seed", seed, prefix=QEMU)
            assert proc.returncode == 0, proc.stderr
            _assert_bitwise_equal(np.load(out), host.run(x, samples=n, seed=seed),
                                  f"{lowering} {sampler} n={n} seed={seed} aarch64 vs x86")
        work = tmp_path / f"attend_{sampler}"  # the masked kernels (attention) of this lowering
        work.mkdir()
        args, want = _recorded_attend(host, x, work)
        proc = subprocess.run([*QEMU, str(arm_psb_run.parent / "psb_call"), str(path), "attend", str(work / "out"),
                               *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        _assert_bitwise_equal(np.load(work / "out0.npy"), want, f"{lowering} {sampler} attend aarch64 vs x86")


def _recorded_attend(module, x, directory):
    """Run ``module.attend`` (x86) recording the arguments of its VM ``attend`` call, as the GPU
    check does (tools/gpu_check.py ``_record_attend``): ``(psb_call arguments: .npy paths and
    shape:..., the call's output)``."""
    gpu_check = tool_module("gpu_check")
    name = gpu_check._record_attend(module, x, str(directory / "attend.npz"))
    assert name, "the mask selected everything or nothing: no masked kernels ran"
    data = np.load(directory / name)
    call_args = []
    for i, kind in enumerate(data["kinds"]):
        a = data[f"arg_{i}"]
        if kind == "shape":
            call_args.append("shape:" + ",".join(str(int(v)) for v in a))
        else:
            np.save(directory / f"arg{i}.npy", a)
            call_args.append(str(directory / f"arg{i}.npy"))
    return call_args, data["ref"]


def test_arm_attention_kernels_are_bit_exact(arm_psb_run, arm_models, host_models, tmp_path):
    """The masked (attention) kernels on aarch64, both samplers: psb_call runs the module's attend
    function under qemu with the arguments PSBModule.attend passed to it on x86 (low-n layer
    outputs, position lists, counts); same bits as x86."""
    psb_call = arm_psb_run.parent / "psb_call"
    for name in ("conv_linear", "conv_linear_iid"):
        arm, ref = arm_models[name], host_models[name]
        work = tmp_path / name
        work.mkdir()
        args, want = _recorded_attend(ref.module, ref.x, work)
        assert not np.array_equal(want, ref.module.run(ref.x, samples=16, seed=0))  # partly low n: masked
        proc = subprocess.run([*QEMU, str(psb_call), str(arm.path), "attend", str(work / "out"), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        _assert_bitwise_equal(np.load(work / "out0.npy"), want, f"{name} attend aarch64 vs x86")


def test_arm_runner_rejects_bad_input_without_output(arm_psb_run, arm_models, tmp_path):
    m = arm_models["digits"]
    bad = tmp_path / "x.npy"
    np.save(bad, m.x[:, :, :4])
    out = tmp_path / "y.npy"
    proc = _run(arm_psb_run, m.path, [bad], [out], prefix=QEMU)
    assert proc.returncode != 0 and "expected shape (4, 1, 8, 8), got (4, 1, 4, 8)" in proc.stderr
    assert not out.exists()


def _mnemonics(so):
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(so)],
                          capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and re.match(r"\s*[0-9a-f]+:$", parts[0]):
            op = parts[1].split()[0] if parts[1].split() else ""
            counts[op] = counts.get(op, 0) + 1
    return counts


def test_arm_int8_psb_layer_output_is_bit_exact(arm_psb_run, arm_models, host_models, tmp_path):
    """int8 preset, uint8 activations: sdot on (a - 128) plus the exact 128 * sum(w) correction on
    aarch64, vpdpbusd on x86: the same integers, so the same bits."""
    arm, ref = arm_models["conv_int8"], host_models["conv_int8"]
    assert [l["status"] for l in arm.module.layers] == ["psb"]
    _assert_bitwise_equal(_run_arm(arm_psb_run, arm, tmp_path), ref.module.run(ref.x), "conv_int8 aarch64 vs x86")
    for n, seed in ((1, 0), (4, 11)):
        out = tmp_path / f"y_{n}_{seed}.npy"
        proc = _run(arm_psb_run, arm.path, [arm.x_path], [out], "--samples", n, "--seed", seed, prefix=QEMU)
        assert proc.returncode == 0, proc.stderr
        _assert_bitwise_equal(np.load(out), ref.module.run(ref.x, samples=n, seed=seed),
                              f"conv_int8 n={n} seed={seed} aarch64 vs x86")


def _dot_counts(so):
    counts = _mnemonics(so)
    return {op: counts.get(op, 0) for op in ("sdot", "udot", "usdot")}


def test_arm_psb_kernels_use_dot_product_instructions(arm_models):
    """int8 preset on aarch64 +dotprod: the packed conv layers are tensorized to sdot
    (schedules/cpu/arm_dot.py). The int16 preset (default) has no 8-bit dot product to use."""
    for name in ("small_cnn_int8", "conv_int8"):
        dot = _dot_counts(arm_models[name].path)
        print(f"{name}: {dot}")
        assert dot["sdot"] > 0, f"{name}: no sdot in the aarch64 library ({dot})"
    for name in ("digits", "small_cnn"):
        print(f"{name} (int16 preset): {_dot_counts(arm_models[name].path)}")
