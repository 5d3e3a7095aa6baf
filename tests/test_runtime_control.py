"""Accuracy chosen at run time: n per call and per layer, seeds, Monte Carlo, progressive refinement."""

import os
import subprocess
import sys

import numpy as np
import pytest
from psb_tvm.passes import find_layer_sites, name_sites

import psb_tvm
from psb_tvm import numerics
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.frontend import import_onnx

SHAPES = {"input": (10, 1, 8, 8)}
NAMES = ["/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/fc1/Gemm", "/fc2/Gemm"]


@pytest.fixture(scope="module")
def data():
    x_train, _, x_test, y_test = load_digits_split()
    return {"calib": {"input": x_train[:100]}, "x": x_test[:10], "x2": x_test[10:20], "y": y_test[:10]}


@pytest.fixture(scope="module")
def module(data):
    return psb_tvm.compile(DIGITS_ONNX, samples=8, seed=0, input_shapes=SHAPES, calibration=data["calib"])


def reference_forward(module, x, samples: dict, seed: int):
    """The digits CNN rebuilt from the numpy reference ops, with per-layer n."""
    imported = import_onnx(DIGITS_ONNX, SHAPES)
    sites = find_layer_sites(imported.mod["main"])
    name_sites(sites, imported.layer_names)
    info = {l["name"]: l for l in module.layers}

    def layer(i, h):
        s = sites[i]
        li, n = info[s.name], samples[s.name]
        enc = numerics.encode_weights(s.weight)
        q = numerics.integer_weights(enc, n, seed, s.index, module.metadata["sampler"])
        xi = numerics.quantize_activations(h, li["frac_bits"], 8, li["act_dtype"].startswith("int"))
        acc = numerics.conv2d_int(xi, q, padding=(1, 1, 1, 1)) if s.kind == "conv2d" else numerics.dense_int(xi, q)
        return numerics.epilogue(acc, numerics.output_scale(enc.k_lo, li["frac_bits"], n), s.bias, s.activation, 1)

    h = layer(1, layer(0, x)).reshape(10, 32, 4, 2, 4, 2).max(axis=(3, 5))
    return layer(4, layer(3, layer(2, h).reshape(10, 512)))


def same_bits(a, b):
    return np.array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))


@pytest.mark.parametrize("n", [1, 4, 32])
def test_run_time_n_equals_compile_time_n(module, data, n):
    baked = psb_tvm.compile(DIGITS_ONNX, samples=n, seed=3, input_shapes=SHAPES, calibration=data["calib"],
                            frozen=True)
    assert baked.metadata["frozen"] and not baked.metadata["runtime_args"]
    assert same_bits(module.run(data["x"], samples=n, seed=3), baked.run(data["x"]))


def test_per_layer_map_matches_the_reference(module, data):
    per_layer = {"/conv1/Conv": 2, "/fc2/Gemm": 64, "default": 16}
    samples = {name: per_layer.get(name, 16) for name in NAMES}
    out = module.run(data["x"], samples=per_layer, seed=7)
    assert same_bits(out, reference_forward(module, data["x"], samples, 7))
    assert not same_bits(out, module.run(data["x"], samples=16, seed=7))


def test_iid_sampler_module_matches_the_reference_and_refines(module, data):
    """A module compiled with the paper's i.i.d. stream: per-layer n against the numpy reference,
    refinement bit-identical to a direct run, and other bits than the stratified default."""
    iid = psb_tvm.compile(DIGITS_ONNX, samples=8, seed=0, input_shapes=SHAPES, calibration=data["calib"],
                          config=psb_tvm.PSBConfig(sampler="iid"))
    assert iid.metadata["sampler"] == "iid"
    per_layer = {"/conv1/Conv": 2, "/fc2/Gemm": 64, "default": 16}
    samples = {name: per_layer.get(name, 16) for name in NAMES}
    out = iid.run(data["x"], samples=per_layer, seed=7)
    assert same_bits(out, reference_forward(iid, data["x"], samples, 7))
    assert not same_bits(out, module.run(data["x"], samples=per_layer, seed=7))
    session = iid.session(data["x"], samples=2, seed=7)
    session.refine()
    session.refine()
    assert same_bits(session.output, iid.run(data["x"], samples=8, seed=7))


def test_defaults_come_from_compile_time(module, data):
    assert same_bits(module.run(data["x"]), module.run(data["x"], samples=8, seed=0))
    assert same_bits(module.run(data["x"]), reference_forward(module, data["x"], dict.fromkeys(NAMES, 8), 0))


def test_same_seed_same_bits_different_seed_different(module, data):
    a = module.run(data["x"], samples=4, seed=11)
    assert same_bits(a, module.run(data["x"], samples=4, seed=11))
    assert not same_bits(a, module.run(data["x"], samples=4, seed=12))


def test_same_bits_across_thread_counts_and_cpu_targets(module, data, tmp_path):
    """Generic x86-64 code (no AVX) and this host's CPU, 1 and 2 threads: identical outputs."""
    generic = psb_tvm.compile(DIGITS_ONNX, target={"kind": "llvm", "mcpu": "x86-64"}, samples=8, input_shapes=SHAPES,
                              calibration=data["calib"])
    want = module.run(data["x"], samples=16, seed=5)
    assert same_bits(generic.run(data["x"], samples=16, seed=5), want)
    path = tmp_path / "digits.so"
    module.export_library(path)
    np.save(tmp_path / "x.npy", data["x"])
    code = ("import sys, numpy as np, psb_tvm; m = psb_tvm.load(sys.argv[1]); "
            "np.save(sys.argv[3], m.run(np.load(sys.argv[2]), samples=16, seed=5))")
    for threads in ("1", "2"):
        out = tmp_path / f"y{threads}.npy"
        env = dict(os.environ, TVM_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(out)], check=True, env=env,
                       timeout=300)
        assert same_bits(np.load(out), want), f"TVM_NUM_THREADS={threads}"


def test_monte_carlo_spread_shrinks_with_n(module, data):
    spread = {n: module.sample_stats(data["x"], draws=12, samples=n, seed=100)["std"].mean() for n in (1, 4, 16, 64)}
    values = [spread[n] for n in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(values, values[1:])), spread
    assert values[-1] < values[0] / 4, spread  # ~1/sqrt(n): 64x samples -> ~8x less spread
    stats = module.sample_stats(data["x"], draws=3, samples=4, seed=100)
    assert stats["outputs"].shape == (3, 10, 10)
    assert same_bits(stats["outputs"][1], module.run(data["x"], samples=4, seed=101))
    np.testing.assert_allclose(stats["mean"], stats["outputs"].mean(0))


def test_refinement_equals_direct_run_bit_for_bit(module, data):
    session = module.session(data["x"], samples=1, seed=9)
    assert same_bits(session.output, module.run(data["x"], samples=1, seed=9))
    for n in (2, 4, 8, 16, 32, 64):
        out = session.refine()
        assert session.samples == [n] * 5
        assert same_bits(out, module.run(data["x"], samples=n, seed=9)), n
    with pytest.raises(psb_tvm.ConfigError, match="n_max"):
        session.refine()


def test_refinement_of_a_per_layer_map_caps_at_n_max(module, data):
    start = {"default": 4, "/fc2/Gemm": 32}
    session = module.session(data["x"], samples=start, seed=2)
    session.refine()
    session.refine()  # fc2 reaches n_max (64) after one step and then stays: an empty sample range
    assert session.samples == [16, 16, 16, 16, 64]
    assert same_bits(session.output, module.run(data["x"], samples={"default": 16, "/fc2/Gemm": 64}, seed=2))


def test_early_exit_stops_when_confident(module, data):
    session = module.session(data["x"], samples=1, seed=0)
    out = session.run_until_confident(margin=0.5, stable=2)
    n = session.samples[0]
    assert 2 <= n <= 64
    assert same_bits(out, module.run(data["x"], samples=n, seed=0))
    assert (out.argmax(1) == data["y"]).mean() >= 0.9
    strict = module.session(data["x"], samples=1, seed=0)
    strict.run_until_confident(margin=1.01)  # unreachable margin: refines up to the cap
    assert strict.samples[0] == 64


@pytest.mark.parametrize("samples,match", [
    (3, "power of two"), (0, "power of two"), (128, "n_max=64"), ({"conv9": 4}, "unknown layers"),
    ({"/conv1/Conv": 6}, "'/conv1/Conv'"), (2.0, "power of two"),
])
def test_invalid_samples_are_config_errors(module, data, samples, match):
    with pytest.raises(psb_tvm.ConfigError, match=match):
        module.run(data["x"], samples=samples)


def test_invalid_seed_and_draws(module, data):
    with pytest.raises(psb_tvm.ConfigError, match="seed"):
        module.run(data["x"], seed=-1)
    with pytest.raises(psb_tvm.ConfigError, match="draws"):
        module.sample_stats(data["x"], draws=1)


def test_frozen_module_refuses_other_n_and_seed(data):
    frozen = psb_tvm.compile(DIGITS_ONNX, samples=4, seed=1, input_shapes=SHAPES, calibration=data["calib"],
                             frozen=True)
    assert same_bits(frozen.run(data["x"], samples=4, seed=1), frozen.run(data["x"]))
    with pytest.raises(psb_tvm.ConfigError, match="frozen at samples=4"):
        frozen.run(data["x"], samples=8)
    with pytest.raises(psb_tvm.ConfigError, match="frozen at seed=1"):
        frozen.run(data["x"], seed=2)
    with pytest.raises(psb_tvm.ConfigError, match="frozen"):
        frozen.session(data["x"])
